//! Causal self-attention with a fused causal softmax that has a backward.
//!
//! candle 0.11's fused `softmax_last_dim` records no gradient, and the composed softmax costs
//! a mask tensor plus five full-size temporaries per call. `causal_softmax` is one `CustomOp1`
//! (masked, scaled softmax over the last dim, computed in f32, parallel over rows) whose `bwd` is a
//! second fused pass; `causal_attention` wraps it between candle's two (differentiable) matmuls,
//! so q, k and v get their gradients from candle's autograd. The `_reference` functions are the
//! spec, composed from differentiable candle ops.
//!
//! With the `cuda` feature the softmax and its backward also run on CUDA tensors
//! (`src/cuda/attention.cu`, same formulas, one block per row), so `causal_attention` runs entirely
//! on the GPU (the matmuls are candle's cuBLAS ones).

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::util::{from_f32_vec, to_f32_vec};

/// Masked entries get this score in the reference: exp(it - max) underflows to exactly 0 in f32
/// and f64, so they end up with probability 0 without producing inf - inf = nan.
const MASKED_SCORE: f64 = -1e30;

/// (rows, T) for scores of shape (..., T, T), or an error naming `op`.
fn rows_and_len(shape: &Shape, op: &str) -> Result<(usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        bail!("{op}: scores must have shape (..., T, T) (query rows, key columns), got {dims:?}");
    }
    let t = dims[dims.len() - 1];
    Ok((shape.elem_count().checked_div(t).unwrap_or(0), t))
}

/// Row `row` of P for query `i`: softmax(scale * s) over keys 0..=i, zero beyond. The (possibly
/// inf/nan) entries past i are never read.
pub(crate) fn causal_softmax_row(row: &mut [f32], i: usize, scale: f32) {
    let (visible, future) = row.split_at_mut(i + 1);
    let max = visible.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut sum = 0f32;
    for x in visible.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    visible.iter_mut().for_each(|x| *x *= inv);
    future.fill(0.0);
}

/// Forward: P = causal softmax(scale * scores) over the last dim.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = rows_and_len(layout.shape(), "causal_softmax")?;
        // One owned f32 copy that is overwritten in place with P (no copy at all back to f32).
        let mut p = to_f32_vec(storage, layout, "causal_softmax")?;
        if t > 0 {
            let scale = self.scale;
            // Row r of a (T, T) block is query r % T.
            p.par_chunks_mut(t).enumerate().for_each(|(r, row)| causal_softmax_row(row, r % t, scale));
        }
        Ok((from_f32_vec(p, storage.dtype(), "causal_softmax")?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        const OP: &str = "causal_softmax";
        let (rows, t) = rows_and_len(l.shape(), OP)?;
        fn run<T: CudaFloat>(s: &CudaStorage, l: &Layout, rows: usize, t: usize, scale: f32) -> Result<CudaStorage> {
            use cuda::{PushKernelArg, WrapErr};
            let x = cuda::view::<T>(s, l, OP)?;
            let dev = s.device();
            let mut p = unsafe { dev.alloc::<T>(x.len()) }?;
            if rows > 0 {
                let k = cuda::kernel(dev, cuda::ATTENTION, &format!("causal_softmax_fwd_{}", T::SUFFIX))?;
                let mut b = k.builder();
                b.arg(&x);
                b.arg(&mut p);
                b.arg(&t);
                b.arg(&scale);
                unsafe { b.launch(cuda::rows_config(rows, row_threads(t), 0)?) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(p, dev.clone()))
        }
        let p = match s.dtype() {
            DType::F32 => run::<f32>(s, l, rows, t, self.scale)?,
            DType::BF16 => run::<half::bf16>(s, l, rows, t, self.scale)?,
            DType::F16 => run::<half::f16>(s, l, rows, t, self.scale)?,
            other => bail!("{OP}: unsupported dtype {other:?} (expected f32, bf16 or f16)"),
        };
        Ok((p, l.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        let dp = dp.to_dtype(p.dtype())?.contiguous()?;
        let ds = p.contiguous()?.apply_op2_no_bwd(&dp, &CausalSoftmaxBwd { scale: self.scale })?;
        Ok(Some(ds))
    }
}

/// Backward: dS = scale * P * (dP - rowsum(dP * P)), one fused pass over (P, dP).
struct CausalSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = rows_and_len(pl.shape(), "causal_softmax backward")?;
        if pl.shape() != gl.shape() {
            bail!("causal_softmax backward: gradient shape {:?} differs from output shape {:?}", gl.dims(), pl.dims());
        }
        let p = to_f32_vec(ps, pl, "causal_softmax backward")?;
        // dP is copied once and overwritten in place with dS.
        let mut ds = to_f32_vec(gs, gl, "causal_softmax backward")?;
        if t > 0 {
            let scale = self.scale;
            ds.par_chunks_mut(t).zip(p.par_chunks(t)).enumerate().for_each(|(r, (g, p))| {
                // P is exactly 0 past the diagonal, so those dS are 0: skip the work there.
                let n = r % t + 1;
                let dot: f32 = g[..n].iter().zip(&p[..n]).map(|(g, p)| g * p).sum();
                for (g, p) in g[..n].iter_mut().zip(&p[..n]) {
                    *g = scale * p * (*g - dot);
                }
                g[n..].iter_mut().for_each(|x| *x = 0.0);
            });
        }
        Ok((from_f32_vec(ds, ps.dtype(), "causal_softmax backward")?, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ps: &CudaStorage, pl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        const OP: &str = "causal_softmax backward";
        let (rows, t) = rows_and_len(pl.shape(), OP)?;
        if pl.shape() != gl.shape() {
            bail!("{OP}: gradient shape {:?} differs from output shape {:?}", gl.dims(), pl.dims());
        }
        if ps.dtype() != gs.dtype() {
            bail!("{OP}: gradient dtype {:?} differs from output dtype {:?}", gs.dtype(), ps.dtype());
        }
        fn run<T: CudaFloat>(ps: &CudaStorage, pl: &Layout, gs: &CudaStorage, gl: &Layout, rows: usize, t: usize, scale: f32) -> Result<CudaStorage> {
            use cuda::{PushKernelArg, WrapErr};
            let (p, dp) = (cuda::view::<T>(ps, pl, OP)?, cuda::view::<T>(gs, gl, OP)?);
            let dev = ps.device();
            let mut ds = unsafe { dev.alloc::<T>(p.len()) }?;
            if rows > 0 {
                let k = cuda::kernel(dev, cuda::ATTENTION, &format!("causal_softmax_bwd_{}", T::SUFFIX))?;
                let mut b = k.builder();
                b.arg(&p);
                b.arg(&dp);
                b.arg(&mut ds);
                b.arg(&t);
                b.arg(&scale);
                unsafe { b.launch(cuda::rows_config(rows, row_threads(t), 0)?) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(ds, dev.clone()))
        }
        let ds = match ps.dtype() {
            DType::F32 => run::<f32>(ps, pl, gs, gl, rows, t, self.scale)?,
            DType::BF16 => run::<half::bf16>(ps, pl, gs, gl, rows, t, self.scale)?,
            DType::F16 => run::<half::f16>(ps, pl, gs, gl, rows, t, self.scale)?,
            other => bail!("{OP}: unsupported dtype {other:?} (expected f32, bf16 or f16)"),
        };
        Ok((ds, pl.shape().clone()))
    }
}

/// Threads per block of the CUDA row kernels for rows of `t` scores: a multiple of 32 (the block
/// reduction needs whole warps), at most 256 (GPT-2's T = 1024 is then 4 entries per thread).
#[cfg(feature = "cuda")]
fn row_threads(t: usize) -> u32 {
    t.div_ceil(32).clamp(1, 8) as u32 * 32
}

/// Softmax over the last dim of `scale * scores`, scores of shape (..., T, T) (query rows, key
/// columns), where key j > query i gets probability exactly 0 whatever its score (even inf/nan).
/// Output in the input dtype (f32, bf16, f16); differentiable with respect to `scores`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    rows_and_len(scores.shape(), "causal_softmax")?;
    scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

/// The dtype references compute in: f64 stays f64 (for the finite-difference check), all else f32.
fn compute_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Spec of `causal_softmax` from differentiable candle ops (f32, or f64 for f64 input); output
/// in the input dtype.
pub fn causal_softmax_reference(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, t) = rows_and_len(scores.shape(), "causal_softmax_reference")?;
    let dtype = compute_dtype(scores);
    let scaled = scores.to_dtype(dtype)?.affine(scale, 0.0)?;
    // where_cond (rather than adding a mask) so that inf/nan in masked entries never leak in,
    // neither into the forward nor as 0 * inf in the backward.
    let mask = Tensor::tril2(t, DType::U8, scores.device())?.broadcast_as(scores.shape())?;
    let masked_value = Tensor::new(MASKED_SCORE, scores.device())?.to_dtype(dtype)?.broadcast_as(scores.shape())?;
    let masked = mask.where_cond(&scaled, &masked_value)?;
    let max = masked.max_keepdim(D::Minus1)?.detach();
    let e = masked.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.to_dtype(scores.dtype())
}

/// Checks q, k, v are (B, H, T, D) of one shape and dtype; returns D.
fn head_dim(q: &Tensor, k: &Tensor, v: &Tensor, op: &str) -> Result<usize> {
    if q.rank() != 4 || k.dims() != q.dims() || v.dims() != q.dims() {
        bail!("{op}: q, k, v must all have shape (B, H, T, D), got {:?}, {:?}, {:?}", q.dims(), k.dims(), v.dims());
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!("{op}: q, k, v must share a dtype, got {:?}, {:?}, {:?}", q.dtype(), k.dtype(), v.dtype());
    }
    Ok(q.dims()[3])
}

/// Causal self-attention y = causal_softmax(q k^T, 1/sqrt(D)) v for q, k, v of shape (B, H, T, D);
/// y has shape (B, H, T, D) and the input dtype. Gradients reach q, k and v.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = head_dim(q, k, v, "causal_attention")?;
    // candle's CPU matmul handles a transposed rhs but not arbitrary batch strides (e.g. q taken
    // as a transposed view of (B, T, H, D)), hence the (no-op when already) contiguous copies.
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let scores = q.matmul(&k.t()?)?;
    let p = causal_softmax(&scores, 1.0 / (d as f64).sqrt())?;
    p.matmul(&v)
}

/// Spec of `causal_attention` with `causal_softmax_reference` (f32, or f64 for f64 input);
/// output in the input dtype.
pub fn causal_attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = head_dim(q, k, v, "causal_attention_reference")?;
    let dtype = compute_dtype(q);
    let (qf, kf, vf) = (q.to_dtype(dtype)?.contiguous()?, k.to_dtype(dtype)?.contiguous()?, v.to_dtype(dtype)?.contiguous()?);
    let scores = qf.matmul(&kf.t()?)?;
    let p = causal_softmax_reference(&scores, 1.0 / (d as f64).sqrt())?;
    p.matmul(&vf)?.to_dtype(q.dtype())
}
