//! AdamW on flat f32 buffers, with the semantics of `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, eps added after the square root).
//!
//! The trainer keeps each rank's shard of parameters and optimizer state as plain f32 slices, so the
//! step works on slices in place: one fused pass reads param, grad, m and v and writes param, m and v
//! (28 bytes per element), parallel over fixed-size chunks, instead of candle-nn's chain of about a
//! dozen allocating tensor ops per parameter. `adamw_step_reference` is the spec in candle tensor ops.
//!
//! `adamw_step_tensors` is the same step in place on 1-D tensors of any device: on the CPU it runs
//! `adamw_step`, on CUDA (feature `cuda`) `adamw_step_cuda`, the kernel in `src/cuda/adamw.cu`, which
//! rounds every operation as this loop does (no FMA contraction) and so gives the same bits. Both
//! take f32, bf16 or f16 gradients (widened to f32 before `grad_scale`).

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use crate::util::contiguous_slice;
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::CudaDevice;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

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

/// One in-place AdamW step, the same as [`adamw_step`], on 1-D tensors on one device: `param`,
/// `exp_avg` and `exp_avg_sq` f32 and contiguous, `grad` f32, bf16 or f16 with as many elements.
/// (Any shape; the engine passes 1-D shards.) CPU, and CUDA with the `cuda` feature. The four must
/// not share storage (checked).
pub fn adamw_step_tensors(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    hp: &AdamWHyper,
    step: u64,
    grad_scale: f32,
) -> Result<()> {
    let op = "adamw_step_tensors";
    let n = param.elem_count();
    for (name, t) in [("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
        if t.dtype() != DType::F32 || !t.is_contiguous() {
            bail!("{op}: {name} must be a contiguous f32 tensor, got {:?} strides {:?}", t.dtype(), t.stride());
        }
    }
    if !matches!(grad.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!("{op}: grad must be f32, bf16 or f16, got {:?}", grad.dtype());
    }
    if grad.elem_count() != n || exp_avg.elem_count() != n || exp_avg_sq.elem_count() != n {
        bail!(
            "{op}: lengths differ: param {n}, grad {}, exp_avg {}, exp_avg_sq {}",
            grad.elem_count(),
            exp_avg.elem_count(),
            exp_avg_sq.elem_count()
        );
    }
    for (name, t) in [("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
        if !t.device().same_device(param.device()) {
            bail!("{op}: {name} is on {:?}, param on {:?}", t.device().location(), param.device().location());
        }
    }
    // Each buffer is locked below (three nested write locks, then a read lock on grad): shared
    // storage would deadlock, so it is rejected first.
    let named = [("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad)];
    for i in 0..named.len() {
        for j in i + 1..named.len() {
            if let Err(e) = named[i].1.inplace_op2(named[j].1, &AliasProbe) {
                bail!("{op}: {} and {} must not share storage ({e})", named[i].0, named[j].0);
            }
        }
    }
    // Validates `step` and the betas before anything is written (the CPU path recomputes them).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    let s = step_scalars(hp, step, op)?;
    with_storage_mut(param, |p, pl| {
        with_storage_mut(exp_avg, |m, ml| {
            with_storage_mut(exp_avg_sq, |v, vl| {
                let (g, gl) = grad.storage_and_layout();
                match (p, m, v, &*g) {
                    (StorageMut::Cpu(p), StorageMut::Cpu(m), StorageMut::Cpu(v), Storage::Cpu(g)) => {
                        let (p, m, v) = (cpu_f32_mut(p, pl, op)?, cpu_f32_mut(m, ml, op)?, cpu_f32_mut(v, vl, op)?);
                        let widened;
                        let g: &[f32] = match g {
                            CpuStorage::F32(g) => contiguous_slice(g, gl, op)?,
                            CpuStorage::BF16(g) => {
                                widened = contiguous_slice(g, gl, op)?.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                                &widened
                            }
                            CpuStorage::F16(g) => {
                                widened = contiguous_slice(g, gl, op)?.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                                &widened
                            }
                            other => bail!("{op}: grad must be f32, bf16 or f16, got {:?}", other.dtype()),
                        };
                        adamw_step(p, g, m, v, hp, step, grad_scale)
                    }
                    #[cfg(feature = "cuda")]
                    (StorageMut::Cuda(p), StorageMut::Cuda(m), StorageMut::Cuda(v), Storage::Cuda(g)) => {
                        let dev = p.device.clone();
                        let (mut p, mut m, mut v) = (cuda_f32_mut(p, pl, op)?, cuda_f32_mut(m, ml, op)?, cuda_f32_mut(v, vl, op)?);
                        match g.dtype() {
                            DType::F32 => adamw_cuda_scalars(&dev, &mut p, &cuda::view::<f32>(g, gl, op)?, &mut m, &mut v, hp, &s, grad_scale),
                            DType::BF16 => adamw_cuda_scalars(&dev, &mut p, &cuda::view::<half::bf16>(g, gl, op)?, &mut m, &mut v, hp, &s, grad_scale),
                            DType::F16 => adamw_cuda_scalars(&dev, &mut p, &cuda::view::<half::f16>(g, gl, op)?, &mut m, &mut v, hp, &s, grad_scale),
                            other => bail!("{op}: grad must be f32, bf16 or f16, got {other:?}"),
                        }
                    }
                    _ => bail!("{op}: unsupported device {:?}", param.device().location()),
                }
            })
        })
    })
}

/// One in-place AdamW step on CUDA buffers (the engine's flat shards): the kernel of
/// [`adamw_step_tensors`], with the same arguments and rounding as [`adamw_step`].
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_cuda<G: CudaFloat>(
    dev: &CudaDevice,
    param: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, G>,
    exp_avg: &mut CudaViewMut<'_, f32>,
    exp_avg_sq: &mut CudaViewMut<'_, f32>,
    hp: &AdamWHyper,
    step: u64,
    grad_scale: f32,
) -> Result<()> {
    let n = param.len();
    if grad.len() != n || exp_avg.len() != n || exp_avg_sq.len() != n {
        bail!(
            "adamw_step_cuda: buffer lengths differ: param {n}, grad {}, exp_avg {}, exp_avg_sq {}",
            grad.len(),
            exp_avg.len(),
            exp_avg_sq.len()
        );
    }
    let s = step_scalars(hp, step, "adamw_step_cuda")?;
    adamw_cuda_scalars(dev, param, grad, exp_avg, exp_avg_sq, hp, &s, grad_scale)
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn adamw_cuda_scalars<G: CudaFloat>(
    dev: &CudaDevice,
    param: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, G>,
    exp_avg: &mut CudaViewMut<'_, f32>,
    exp_avg_sq: &mut CudaViewMut<'_, f32>,
    hp: &AdamWHyper,
    s: &StepScalars,
    grad_scale: f32,
) -> Result<()> {
    use crate::cuda::{PushKernelArg, WrapErr};
    let n = param.len();
    if n == 0 {
        return Ok(());
    }
    let k = cuda::kernel(dev, cuda::ADAMW, &format!("adamw_step_{}", G::SUFFIX))?;
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let (one_minus_b1, one_minus_b2) = (1.0 - b1, 1.0 - b2);
    let mut b = k.builder();
    b.arg(param);
    b.arg(grad);
    b.arg(exp_avg);
    b.arg(exp_avg_sq);
    b.arg(&n);
    candle_core::builder_arg!(b, b1, b2, one_minus_b1, one_minus_b2, eps, s.decay, s.step_size, s.inv_bc2_sqrt, grad_scale);
    unsafe { b.launch(cuda::elementwise_config(n)) }.w()?;
    Ok(())
}

/// A storage borrowed mutably through an in-place op.
enum StorageMut<'a> {
    Cpu(&'a mut CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(&'a mut CudaStorage),
}

/// Runs `f` with `t`'s storage borrowed mutably (under its write lock), via a one-shot in-place op.
fn with_storage_mut<F>(t: &Tensor, f: F) -> Result<()>
where
    F: FnOnce(StorageMut<'_>, &Layout) -> Result<()>,
{
    struct Once<F>(RefCell<Option<F>>);
    impl<F: FnOnce(StorageMut<'_>, &Layout) -> Result<()>> Once<F> {
        fn call(&self, s: StorageMut<'_>, l: &Layout) -> Result<()> {
            match self.0.borrow_mut().take() {
                Some(f) => f(s, l),
                None => bail!("adamw_step_tensors: storage visited twice"),
            }
        }
    }
    impl<F: FnOnce(StorageMut<'_>, &Layout) -> Result<()>> InplaceOp1 for Once<F> {
        fn name(&self) -> &'static str {
            "adamw_step_tensors"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            self.call(StorageMut::Cpu(s), l)
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            self.call(StorageMut::Cuda(s), l)
        }
    }
    t.inplace_op1(&Once(RefCell::new(Some(f))))
}

/// A no-op binary in-place op: candle rejects it when the two tensors share storage.
struct AliasProbe;

impl InplaceOp2 for AliasProbe {
    fn name(&self) -> &'static str {
        "adamw_step_tensors"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<()> {
        Ok(())
    }
}

fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (start, end) = match l.contiguous_offsets() {
        Some(r) => r,
        None => bail!("{op}: buffers must be contiguous"),
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        other => bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_f32_mut<'a>(s: &'a mut CudaStorage, l: &Layout, op: &str) -> Result<CudaViewMut<'a, f32>> {
    let (start, end) = match l.contiguous_offsets() {
        Some(r) => r,
        None => bail!("{op}: buffers must be contiguous"),
    };
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
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
