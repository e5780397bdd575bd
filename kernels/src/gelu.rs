//! GELU, tanh approximation (owned by agent brief "adamw").
use candle_core::{bail, Result, Tensor};
pub fn gelu(_x: &Tensor) -> Result<Tensor> { bail!("not implemented yet") }
pub fn gelu_reference(_x: &Tensor) -> Result<Tensor> { bail!("not implemented yet") }
