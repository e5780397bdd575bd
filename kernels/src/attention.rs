//! Causal self-attention with a fused causal softmax (owned by agent brief "attention").
use candle_core::{bail, Result, Tensor};
pub fn causal_softmax(_scores: &Tensor, _scale: f64) -> Result<Tensor> { bail!("not implemented yet") }
pub fn causal_softmax_reference(_scores: &Tensor, _scale: f64) -> Result<Tensor> { bail!("not implemented yet") }
pub fn causal_attention(_q: &Tensor, _k: &Tensor, _v: &Tensor) -> Result<Tensor> { bail!("not implemented yet") }
pub fn causal_attention_reference(_q: &Tensor, _k: &Tensor, _v: &Tensor) -> Result<Tensor> { bail!("not implemented yet") }
