//! AdamW on flat f32 buffers, with the semantics of `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, eps added after the square root).
//!
//! The trainer keeps each rank's shard of parameters and optimizer state as plain f32 slices, so the
//! step works on slices in place: one fused pass reads param, grad, m and v and writes param, m and v
//! (28 bytes per element), parallel over fixed-size chunks, instead of candle-nn's chain of about a
//! dozen allocating tensor ops per parameter. `adamw_step_reference` is the spec in candle tensor ops.

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: 32K f32 x 4 buffers = 512 KiB per task, large enough that scheduling
/// is negligible next to streaming that memory, small enough to balance across cores.
const TASK_ELEMS: usize = 32 * 1024;

/// AdamW hyper-parameters (decoupled weight decay, Loshchilov & Hutter 2019), named as in
/// `torch.optim.AdamW`. `Default` gives PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    /// Learning rate (the step size before bias correction). PyTorch default 1e-3.
    pub lr: f32,
    /// Decay rate of the first moment (running mean of gradients). PyTorch default 0.9.
    pub beta1: f32,
    /// Decay rate of the second moment (running mean of squared gradients). PyTorch default 0.999.
    pub beta2: f32,
    /// Added to the bias-corrected sqrt of the second moment, guarding the division. Default 1e-8.
    pub eps: f32,
    /// Decoupled weight decay: each step first scales the parameter by `1 - lr * weight_decay`
    /// (not added to the gradient, unlike L2 in Adam). PyTorch's AdamW default 0.01.
    pub weight_decay: f32,
}

impl Default for AdamWHyper {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Per-step scalars, computed once in f64 (as PyTorch does with Python floats) and used in f32.
struct StepScalars {
    decay: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
}

fn step_scalars(hp: &AdamWHyper, step: u64, op: &str) -> Result<StepScalars> {
    if step == 0 {
        bail!("{op}: step must be >= 1 (it is 1-based: the first update is step 1), got 0");
    }
    // powi takes an i32; beyond i32::MAX steps the bias corrections are exactly 1 anyway.
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    if !(bc1 > 0.0 && bc2 > 0.0) {
        bail!(
            "{op}: beta1 {} and beta2 {} must be in [0, 1)",
            hp.beta1,
            hp.beta2
        );
    }
    Ok(StepScalars {
        decay: (1.0 - hp.lr as f64 * hp.weight_decay as f64) as f32,
        step_size: (hp.lr as f64 / bc1) as f32,
        inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
    })
}

/// One in-place AdamW step (`step` is 1-based) on flat f32 buffers of equal length:
/// `g = grad * grad_scale; p -= lr*wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
/// p -= lr * (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)`.
/// `grad_scale` folds gradient clipping and averaging into the same pass.
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    hp: &AdamWHyper,
    step: u64,
    grad_scale: f32,
) -> Result<()> {
    let n = param.len();
    if grad.len() != n || exp_avg.len() != n || exp_avg_sq.len() != n {
        bail!(
            "adamw_step: buffer lengths differ: param {n}, grad {}, exp_avg {}, exp_avg_sq {}",
            grad.len(),
            exp_avg.len(),
            exp_avg_sq.len()
        );
    }
    let s = step_scalars(hp, step, "adamw_step")?;
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let (one_minus_b1, one_minus_b2) = (1.0 - b1, 1.0 - b2);
    param
        .par_chunks_mut(TASK_ELEMS)
        .zip(exp_avg.par_chunks_mut(TASK_ELEMS))
        .zip(exp_avg_sq.par_chunks_mut(TASK_ELEMS))
        .zip(grad.par_chunks(TASK_ELEMS))
        .for_each(|(((p, m), v), g)| {
            // Plain zipped loop (no bounds checks, no branches) so LLVM vectorizes it.
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let g = g * grad_scale;
                let mi = b1 * *m + one_minus_b1 * g;
                let vi = b2 * *v + one_minus_b2 * (g * g);
                *m = mi;
                *v = vi;
                let denom = vi.sqrt() * s.inv_bc2_sqrt + eps;
                *p = *p * s.decay - s.step_size * mi / denom;
            }
        });
    Ok(())
}

/// The spec: the same step composed from candle tensor ops on 1-D f32 tensors. Returns
/// `(new_param, new_exp_avg, new_exp_avg_sq)`.
pub fn adamw_step_reference(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    hp: &AdamWHyper,
    step: u64,
    grad_scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    for (name, t) in [
        ("param", param),
        ("grad", grad),
        ("exp_avg", exp_avg),
        ("exp_avg_sq", exp_avg_sq),
    ] {
        if t.rank() != 1 || t.dtype() != DType::F32 {
            bail!(
                "adamw_step_reference: {name} must be a 1-D f32 tensor, got {:?} {:?}",
                t.dtype(),
                t.dims()
            );
        }
    }
    let n = param.elem_count();
    if grad.elem_count() != n || exp_avg.elem_count() != n || exp_avg_sq.elem_count() != n {
        bail!(
            "adamw_step_reference: lengths differ: param {n}, grad {}, exp_avg {}, exp_avg_sq {}",
            grad.elem_count(),
            exp_avg.elem_count(),
            exp_avg_sq.elem_count()
        );
    }
    if step == 0 {
        bail!("adamw_step_reference: step must be >= 1 (it is 1-based), got 0");
    }
    // Written out independently of `step_scalars`, term by term as in torch.optim.AdamW.
    let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
    let bias_correction1 = 1.0 - b1.powf(step as f64);
    let bias_correction2 = 1.0 - b2.powf(step as f64);
    let g = grad.affine(grad_scale as f64, 0.0)?;
    let decayed = param.affine(1.0 - hp.lr as f64 * hp.weight_decay as f64, 0.0)?;
    let m = (exp_avg.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
    let v = (exp_avg_sq.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
    let denom = (v.sqrt()? / bias_correction2.sqrt())?.affine(1.0, hp.eps as f64)?;
    let update = m
        .div(&denom)?
        .affine(hp.lr as f64 / bias_correction1, 0.0)?;
    Ok(((decayed - update)?, m, v))
}
