//! AdamW on flat f32 buffers (owned by agent brief "adamw").
use candle_core::{bail, Result, Tensor};

/// AdamW hyper-parameters (decoupled weight decay, Loshchilov & Hutter 2019).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

pub fn adamw_step(_param: &mut [f32], _grad: &[f32], _exp_avg: &mut [f32], _exp_avg_sq: &mut [f32], _hp: &AdamWHyper, _step: u64, _grad_scale: f32) -> Result<()> {
    bail!("adamw_step: not implemented yet")
}

pub fn adamw_step_reference(_param: &Tensor, _grad: &Tensor, _exp_avg: &Tensor, _exp_avg_sq: &Tensor, _hp: &AdamWHyper, _step: u64, _grad_scale: f32) -> Result<(Tensor, Tensor, Tensor)> {
    bail!("adamw_step_reference: not implemented yet")
}
