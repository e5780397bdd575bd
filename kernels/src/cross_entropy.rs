//! Fused cross-entropy over the vocabulary, with a backward.
//!
//! For a GPT-2 vocabulary the logits are the largest activation of the model, so the composed
//! loss (log-softmax, gather, mask, sum) would add several full-size copies. `cross_entropy` is a
//! `CustomOp2` over (logits, targets) whose forward only computes each row's logsumexp on the fly
//! (parallel over rows, reading bf16/f32 in place) and whose `bwd` writes
//! dlogits = (softmax - onehot) * grad / divisor in one pass, in the logits' dtype. Rows whose
//! target is `IGNORE_INDEX` count for nothing. `cross_entropy_reference` is the spec, composed from
//! differentiable candle ops.
//!
//! With the `cuda` feature both passes also run on CUDA tensors (`src/cuda/cross_entropy.cu`, same
//! formulas, one block per row): the targets are copied to the host (N u32, one stream sync) and
//! checked and counted exactly as on the CPU, so the errors and the divisor are the same; the loss
//! is the sum of per-row f32 losses in f64, in a fixed order (bitwise reproducible).

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaView;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::util::{contiguous_slice, KernelFloat};

/// Targets equal to this contribute neither loss nor gradient, nor count toward the default divisor.
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Checks logits (B, T, V) or (N, V) float and targets (B, T) or (N) u32; returns (rows, V).
fn rows_and_vocab(logits: &Shape, targets: &Shape, op: &str) -> Result<(usize, usize)> {
    let (l, t) = (logits.dims(), targets.dims());
    if !(l.len() == 2 || l.len() == 3) || t != &l[..l.len() - 1] {
        bail!("{op}: logits shape {l:?} and targets shape {t:?} do not match (expected logits (B, T, V) with targets (B, T), or logits (N, V) with targets (N))");
    }
    let v = l[l.len() - 1];
    if v == 0 {
        bail!("{op}: logits shape {l:?} has an empty vocabulary dimension");
    }
    Ok((logits.elem_count() / v, v))
}

/// Checks dtypes: float logits (f64 only for the reference), u32 targets.
fn check_dtypes(logits: DType, targets: DType, allow_f64: bool, op: &str) -> Result<()> {
    if !(matches!(logits, DType::F32 | DType::BF16 | DType::F16) || (allow_f64 && logits == DType::F64)) {
        bail!("{op}: logits must be f32, bf16 or f16, got {logits:?}");
    }
    if targets != DType::U32 {
        bail!("{op}: targets must be u32 (IGNORE_INDEX = u32::MAX skips a row), got {targets:?}");
    }
    Ok(())
}

/// Validates every target (< V or IGNORE_INDEX) and returns the number of counted rows.
fn count_targets(targets: &[u32], v: usize, op: &str) -> Result<usize> {
    let mut count = 0;
    for (row, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        if t as usize >= v {
            bail!("{op}: target {t} at row {row} (of the flattened rows) is out of range for vocabulary size V = {v} (use IGNORE_INDEX = u32::MAX to skip a row)");
        }
        count += 1;
    }
    Ok(count)
}

/// The explicit divisor (checked), or the number of counted rows (1 when there are none, so that
/// an all-ignored batch gives loss 0 and gradient 0 rather than 0 / 0).
fn resolve_divisor(divisor: Option<f64>, count: usize, op: &str) -> Result<f64> {
    match divisor {
        Some(d) if d.is_finite() && d > 0.0 => Ok(d),
        Some(d) => bail!("{op}: divisor must be a positive finite number, got {d}"),
        None => Ok(count.max(1) as f64),
    }
}

/// (max, sum of exp(x - max)) of one row, in f32.
#[inline]
fn row_max_sum<T: KernelFloat>(row: &[T]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.widen()));
    let sum = row.iter().map(|x| (x.widen() - max).exp()).sum();
    (max, sum)
}

/// Sum over counted rows of logsumexp(row) - row[target], accumulated in f64.
fn loss_sum<T: KernelFloat>(logits: &[T], targets: &[u32], v: usize) -> f64 {
    logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == IGNORE_INDEX {
                return 0.0;
            }
            let (max, sum) = row_max_sum(row);
            (max + sum.ln() - row[t as usize].widen()) as f64
        })
        .sum()
}

/// dlogits = (softmax(row) - onehot(target)) * scale, zero for ignored rows, in T.
fn loss_grad<T: KernelFloat>(logits: &[T], targets: &[u32], v: usize, scale: f32) -> Vec<T> {
    let mut out = vec![T::narrow(0.0); logits.len()];
    // One row of f32 exps per rayon job (not a full copy) so each exp is computed once.
    out.par_chunks_mut(v).zip(logits.par_chunks(v)).zip(targets.par_iter()).for_each_init(
        || Vec::with_capacity(v),
        |exps: &mut Vec<f32>, ((out, row), &t)| {
            if t == IGNORE_INDEX {
                return;
            }
            exps.clear();
            exps.extend(row.iter().map(|x| x.widen()));
            softmax_grad_in_place(exps, t as usize, scale);
            for (o, &g) in out.iter_mut().zip(exps.iter()) {
                *o = T::narrow(g);
            }
        },
    );
    out
}

/// One row of logits (f32) becomes its gradient: (softmax(row) - onehot(target)) * scale.
fn softmax_grad_in_place(row: &mut [f32], target: usize, scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    row.iter_mut().for_each(|x| *x = (*x - max).exp());
    let k = scale / row.iter().sum::<f32>();
    let at_target = row[target];
    row.iter_mut().for_each(|x| *x *= k);
    row[target] = at_target * k - scale;
}

fn targets_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [u32]> {
    match storage {
        CpuStorage::U32(d) => contiguous_slice(d, layout, op),
        other => bail!("{op}: targets must be u32, got {:?}", other.dtype()),
    }
}

/// The targets on the device, and (copied to the host) checked and counted like `count_targets`.
#[cfg(feature = "cuda")]
fn cuda_targets<'a>(storage: &'a CudaStorage, layout: &Layout, v: usize, op: &str) -> Result<(CudaView<'a, u32>, usize)> {
    if storage.dtype() != DType::U32 {
        bail!("{op}: targets must be u32, got {:?}", storage.dtype());
    }
    let targets = match layout.contiguous_offsets() {
        Some((start, end)) => storage.as_cuda_slice::<u32>()?.slice(start..end),
        None => bail!("{op}: input must be contiguous (call .contiguous() first), got strides {:?}", layout.stride()),
    };
    let count = count_targets(&storage.device().clone_dtoh(&targets)?, v, op)?;
    Ok((targets, count))
}

/// Threads per block of the CUDA row kernels (rows of V logits): a multiple of 32 (the block
/// reduction needs whole warps), at most 512 (GPT-2's V = 50257 is then ~100 logits per thread).
#[cfg(feature = "cuda")]
fn row_threads(v: usize) -> u32 {
    v.div_ceil(32).clamp(1, 16) as u32 * 32
}

/// Threads of the one-block kernel that sums the per-row losses.
#[cfg(feature = "cuda")]
const LOSS_SUM_THREADS: u32 = 1024;

/// Forward: scalar f32 loss.
struct CrossEntropy {
    divisor: Option<f64>,
    /// Write the gradient over the logits' own storage (f32 CPU): see `cross_entropy_reusing_logits`.
    reuse_logits: bool,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "cross_entropy";
        let (_, v) = rows_and_vocab(ll.shape(), tl.shape(), OP)?;
        let targets = targets_slice(ts, tl, OP)?;
        let divisor = resolve_divisor(self.divisor, count_targets(targets, v, OP)?, OP)?;
        let sum = match ls {
            CpuStorage::F32(d) => loss_sum(contiguous_slice(d, ll, OP)?, targets, v),
            CpuStorage::BF16(d) => loss_sum(contiguous_slice(d, ll, OP)?, targets, v),
            CpuStorage::F16(d) => loss_sum(contiguous_slice(d, ll, OP)?, targets, v),
            other => bail!("{OP}: logits must be f32, bf16 or f16, got {:?}", other.dtype()),
        };
        Ok((CpuStorage::F32(vec![(sum / divisor) as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ls: &CudaStorage, ll: &Layout, ts: &CudaStorage, tl: &Layout) -> Result<(CudaStorage, Shape)> {
        use cuda::{PushKernelArg, WrapErr};
        const OP: &str = "cross_entropy";
        let (rows, v) = rows_and_vocab(ll.shape(), tl.shape(), OP)?;
        let (targets, count) = cuda_targets(ts, tl, v, OP)?;
        let divisor = resolve_divisor(self.divisor, count, OP)?;
        let dev = ls.device();
        // Per-row losses (0 for ignored rows); at least one element so that the sum has a buffer.
        let mut row_loss = unsafe { dev.alloc::<f32>(rows.max(1)) }?;
        fn rows_fwd<T: CudaFloat>(
            ls: &CudaStorage,
            ll: &Layout,
            targets: &CudaView<'_, u32>,
            row_loss: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
            rows: usize,
            v: usize,
        ) -> Result<()> {
            use cuda::{PushKernelArg, WrapErr};
            let logits = cuda::view::<T>(ls, ll, OP)?;
            let k = cuda::kernel(ls.device(), cuda::CROSS_ENTROPY, &format!("cross_entropy_fwd_{}", T::SUFFIX))?;
            let mut b = k.builder();
            b.arg(&logits);
            b.arg(targets);
            b.arg(row_loss);
            b.arg(&v);
            unsafe { b.launch(cuda::rows_config(rows, row_threads(v), 0)?) }.w()?;
            Ok(())
        }
        match ls.dtype() {
            DType::F32 | DType::BF16 | DType::F16 if rows == 0 => {}
            DType::F32 => rows_fwd::<f32>(ls, ll, &targets, &mut row_loss, rows, v)?,
            DType::BF16 => rows_fwd::<half::bf16>(ls, ll, &targets, &mut row_loss, rows, v)?,
            DType::F16 => rows_fwd::<half::f16>(ls, ll, &targets, &mut row_loss, rows, v)?,
            other => bail!("{OP}: logits must be f32, bf16 or f16, got {other:?}"),
        }
        let mut loss = unsafe { dev.alloc::<f32>(1) }?;
        let k = cuda::kernel(dev, cuda::CROSS_ENTROPY, "cross_entropy_loss_sum")?;
        let mut b = k.builder();
        b.arg(&row_loss);
        b.arg(&rows);
        b.arg(&divisor);
        b.arg(&mut loss);
        unsafe { b.launch(cuda::rows_config(1, LOSS_SUM_THREADS, 0)?) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(loss, dev.clone()), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.reuse_logits && logits.device().is_cpu() && logits.dtype() == DType::F32 && logits.is_contiguous() {
            let grad = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let [grad] = grad[..] else { bail!("cross_entropy backward: upstream gradient must be a scalar, got {} values", grad.len()) };
            return Ok((Some(cross_entropy_grad_over_logits(logits, targets, self.divisor, grad)?), None));
        }
        // The upstream gradient goes in as a third input (not read back to the host), so the
        // backward stays a single op on whatever device holds the logits.
        let op = CrossEntropyBwd { divisor: self.divisor };
        let dlogits = logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &grad.to_dtype(DType::F32)?, &op)?;
        Ok((Some(dlogits), None))
    }
}

/// Backward in place: f32 logits become dlogits (llm.c's fused classifier does the same).
struct GradOverLogits {
    targets: Vec<u32>,
    divisor: Option<f64>,
    grad: f32,
}

impl candle_core::InplaceOp1 for GradOverLogits {
    fn name(&self) -> &'static str {
        "cross-entropy-grad-over-logits"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        const OP: &str = "cross_entropy backward";
        let CpuStorage::F32(data) = storage else { bail!("{OP}: in-place gradient needs f32 logits") };
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("{OP}: logits must be contiguous") };
        let rows = self.targets.len();
        let logits = &mut data[start..end];
        if rows == 0 || logits.len() % rows != 0 {
            bail!("{OP}: {} logits for {rows} targets", logits.len());
        }
        let v = logits.len() / rows;
        let divisor = resolve_divisor(self.divisor, count_targets(&self.targets, v, OP)?, OP)?;
        let scale = (self.grad as f64 / divisor) as f32;
        // The same row function as `loss_grad`, applied over the logits themselves.
        logits.par_chunks_mut(v).zip(self.targets.par_iter()).for_each(|(row, &t)| {
            if t == IGNORE_INDEX {
                row.fill(0.0);
            } else {
                softmax_grad_in_place(row, t as usize, scale);
            }
        });
        Ok(())
    }
}

/// Backward: (logits, targets, scalar upstream grad) -> dlogits in the logits' dtype.
struct CrossEntropyBwd {
    divisor: Option<f64>,
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "cross_entropy backward";
        let (_, v) = rows_and_vocab(ll.shape(), tl.shape(), OP)?;
        let targets = targets_slice(ts, tl, OP)?;
        let divisor = resolve_divisor(self.divisor, count_targets(targets, v, OP)?, OP)?;
        let grad = match gs {
            CpuStorage::F32(d) if gl.shape().elem_count() == 1 => contiguous_slice(d, gl, OP)?[0],
            _ => bail!("{OP}: upstream gradient must be an f32 scalar, got {:?} of shape {:?}", gs.dtype(), gl.dims()),
        };
        let scale = (grad as f64 / divisor) as f32;
        let out = match ls {
            CpuStorage::F32(d) => WithDType::to_cpu_storage_owned(loss_grad(contiguous_slice(d, ll, OP)?, targets, v, scale)),
            CpuStorage::BF16(d) => WithDType::to_cpu_storage_owned(loss_grad(contiguous_slice(d, ll, OP)?, targets, v, scale)),
            CpuStorage::F16(d) => WithDType::to_cpu_storage_owned(loss_grad(contiguous_slice(d, ll, OP)?, targets, v, scale)),
            other => bail!("{OP}: logits must be f32, bf16 or f16, got {:?}", other.dtype()),
        };
        Ok((out, ll.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &CudaStorage,
        ll: &Layout,
        ts: &CudaStorage,
        tl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        const OP: &str = "cross_entropy backward";
        let (rows, v) = rows_and_vocab(ll.shape(), tl.shape(), OP)?;
        let (targets, count) = cuda_targets(ts, tl, v, OP)?;
        let divisor = resolve_divisor(self.divisor, count, OP)?;
        if gs.dtype() != DType::F32 || gl.shape().elem_count() != 1 {
            bail!("{OP}: upstream gradient must be an f32 scalar, got {:?} of shape {:?}", gs.dtype(), gl.dims());
        }
        // The upstream gradient stays on the device: each block computes
        // scale = (f32)((f64)grad / divisor) as the CPU does.
        let grad = cuda::view::<f32>(gs, gl, OP)?;
        fn run<T: CudaFloat>(
            ls: &CudaStorage,
            ll: &Layout,
            targets: &CudaView<'_, u32>,
            grad: &CudaView<'_, f32>,
            rows: usize,
            v: usize,
            divisor: f64,
        ) -> Result<CudaStorage> {
            use cuda::{PushKernelArg, WrapErr};
            let logits = cuda::view::<T>(ls, ll, OP)?;
            let dev = ls.device();
            let mut dlogits = unsafe { dev.alloc::<T>(logits.len()) }?;
            if rows > 0 {
                let k = cuda::kernel(dev, cuda::CROSS_ENTROPY, &format!("cross_entropy_bwd_{}", T::SUFFIX))?;
                let mut b = k.builder();
                b.arg(&logits);
                b.arg(targets);
                b.arg(grad);
                b.arg(&mut dlogits);
                b.arg(&v);
                b.arg(&divisor);
                unsafe { b.launch(cuda::rows_config(rows, row_threads(v), 0)?) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(dlogits, dev.clone()))
        }
        let out = match ls.dtype() {
            DType::F32 => run::<f32>(ls, ll, &targets, &grad, rows, v, divisor)?,
            DType::BF16 => run::<half::bf16>(ls, ll, &targets, &grad, rows, v, divisor)?,
            DType::F16 => run::<half::f16>(ls, ll, &targets, &grad, rows, v, divisor)?,
            other => bail!("{OP}: logits must be f32, bf16 or f16, got {other:?}"),
        };
        Ok((out, ll.shape().clone()))
    }
}

/// Mean (or sum / `divisor`) over rows whose target is not `IGNORE_INDEX` of
/// logsumexp(row) - row[target]. logits (B, T, V) or (N, V) in f32/bf16/f16, targets u32 of shape
/// (B, T) or (N). Returns a scalar f32 tensor, differentiable with respect to the logits.
/// `divisor: None` divides by the number of counted rows (loss 0 when there are none).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    rows_and_vocab(logits.shape(), targets.shape(), OP)?;
    check_dtypes(logits.dtype(), targets.dtype(), false, OP)?;
    resolve_divisor(divisor, 0, OP)?;
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy { divisor, reuse_logits: false })
}

/// The gradient of `cross_entropy(logits, targets, divisor)` times `grad`, written over the
/// logits' own storage (f32, contiguous, CPU) and returned as a tensor sharing it. For an
/// explicit backward that owns its logits; afterwards they hold the gradient.
pub fn cross_entropy_grad_over_logits(logits: &Tensor, targets: &Tensor, divisor: Option<f64>, grad: f32) -> Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || !logits.is_contiguous() {
        bail!("cross_entropy_grad_over_logits: needs contiguous f32 CPU logits, got {:?} on {:?}", logits.dtype(), logits.device().location());
    }
    rows_and_vocab(logits.shape(), targets.shape(), "cross_entropy backward")?;
    let op = GradOverLogits { targets: targets.flatten_all()?.to_vec1::<u32>()?, divisor, grad };
    logits.inplace_op1(&op)?;
    Ok(logits.clone())
}

/// `cross_entropy` whose backward (on f32 CPU logits) writes the gradient over the logits'
/// storage instead of allocating a second logits-sized tensor: for a 50257-word vocabulary at
/// 1024 tokens that is 206 MB less at the step's peak. Only for logits nothing reads after the
/// backward (a model's head_loss, where they are a temporary); elsewhere `cross_entropy`.
pub fn cross_entropy_reusing_logits(logits: &Tensor, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    rows_and_vocab(logits.shape(), targets.shape(), OP)?;
    check_dtypes(logits.dtype(), targets.dtype(), false, OP)?;
    resolve_divisor(divisor, 0, OP)?;
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy { divisor, reuse_logits: true })
}

/// Spec of `cross_entropy` from differentiable candle ops, in f32. Returns a scalar f32 tensor,
/// except for f64 logits (accepted only here, for the finite-difference check) where it computes
/// and returns f64.
pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor> {
    const OP: &str = "cross_entropy_reference";
    let (n, v) = rows_and_vocab(logits.shape(), targets.shape(), OP)?;
    check_dtypes(logits.dtype(), targets.dtype(), true, OP)?;
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    let divisor = resolve_divisor(divisor, count_targets(&targets, v, OP)?, OP)?;
    let dtype = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let dev = logits.device();

    let x = logits.to_dtype(dtype)?.reshape((n, v))?;
    let shifted = x.broadcast_sub(&x.max_keepdim(1)?.detach())?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
    // Ignored rows gather column 0 and are then multiplied by a 0 mask.
    let index: Vec<u32> = targets.iter().map(|&t| if t == IGNORE_INDEX { 0 } else { t }).collect();
    let mask: Vec<f32> = targets.iter().map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
    let picked = log_probs.gather(&Tensor::from_vec(index, (n, 1), dev)?, 1)?.squeeze(1)?;
    let mask = Tensor::from_vec(mask, n, dev)?.to_dtype(dtype)?;
    (picked * mask)?.sum_all()?.affine(-1.0 / divisor, 0.0)
}
