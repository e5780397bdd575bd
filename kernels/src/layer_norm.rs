//! LayerNorm over the last dimension, as `torch.nn.functional.layer_norm` (biased variance, eps
//! inside the square root), with a gradient for the input, the weight and the bias.
//!
//! candle-nn's fused `layer_norm` records no backward, so a model that trains through it silently
//! gets no gradient. `layer_norm` here is a `CustomOp3` whose CPU forward and backward are single
//! fused passes over rows (llm.c's `layernorm_forward/backward`), parallel over chunks of rows.
//! The backward recomputes mean and 1/std from `x` instead of saving them: a row is already in
//! cache when its gradient is computed, and nothing extra has to live between forward and backward.
//! `layer_norm_reference` is the spec, composed from differentiable candle ops.
//!
//! With the `cuda` feature both passes also run on CUDA tensors (`src/cuda/layer_norm.cu`, same
//! formulas): the backward is its own `CustomOp3` (`LayerNormBackward`, applied without a graph node,
//! returning `[dx | dweight | dbias]` in one buffer), so `bwd` is the same code on every device.

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat, PushKernelArg, WrapErr};
use crate::util::sum_lanes;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortize scheduling, small enough to load-balance rows.
/// A fixed size (not one derived from the thread count) keeps the dweight/dbias summation order,
/// hence the result, identical on every machine.
const TASK_ELEMS: usize = 16 * 1024;

/// LayerNorm of `x` (shape `(..., C)`) with `weight` and `bias` of shape `(C)`, all of one dtype
/// (f32, bf16 or f16; arithmetic in f32). Differentiable in all three inputs; CPU, and CUDA with the
/// `cuda` feature.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_args(x, weight, bias)?;
    // The kernels index rows directly, so strided views are copied first (differentiably).
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    x.apply_op3(&weight, &bias, LayerNorm { eps: eps as f32 })
}

/// The spec: LayerNorm from candle primitives, computed in f32 (f64 for f64 inputs, so that it can be
/// checked against finite differences) and cast back to `x`'s dtype.
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    check_args(x, weight, bias)?;
    let compute = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xf = x.to_dtype(compute)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let y = centered
        .broadcast_mul(&rstd)?
        .broadcast_mul(&weight.to_dtype(compute)?)?
        .broadcast_add(&bias.to_dtype(compute)?)?;
    y.to_dtype(x.dtype())
}

fn check_args(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let Some(&c) = x.dims().last() else {
        bail!("layer_norm: x must have at least one dimension, got a scalar")
    };
    if c == 0 {
        bail!(
            "layer_norm: the normalized (last) dimension of x is empty, x shape {:?}",
            x.dims()
        );
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "layer_norm: weight and bias must have shape [{c}] to match x {:?}, got weight {:?} and bias {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if weight.dtype() != x.dtype() || bias.dtype() != x.dtype() {
        bail!(
            "layer_norm: x, weight and bias must share a dtype, got {:?}, {:?}, {:?}",
            x.dtype(),
            weight.dtype(),
            bias.dtype()
        );
    }
    Ok(())
}

pub(crate) struct LayerNorm {
    pub(crate) eps: f32,
}

/// C (the normalized size) when x's last dimension, weight and bias agree on it.
fn agree_on_c(xl: &Layout, wl: &Layout, bl: &Layout) -> Result<usize> {
    let c = *xl.dims().last().unwrap_or(&0);
    if c == 0 || wl.shape().elem_count() != c || bl.shape().elem_count() != c {
        bail!(
            "layer_norm: x {:?}, weight {:?} and bias {:?} do not agree on C",
            xl.dims(),
            wl.dims(),
            bl.dims()
        );
    }
    Ok(c)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = agree_on_c(xl, wl, bl)?;
        let op = "layer_norm";
        let eps = self.eps;
        let out = match (xs, ws, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(b, bl, op)?,
                c,
                eps,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(b)) => CpuStorage::BF16(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(b, bl, op)?,
                c,
                eps,
            )),
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(b)) => CpuStorage::F16(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(b, bl, op)?,
                c,
                eps,
            )),
            _ => bail!("layer_norm: unsupported dtypes x {:?}, weight {:?}, bias {:?} (expected all f32, bf16 or f16)",
                xs.dtype(), ws.dtype(), bs.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let c = agree_on_c(xl, wl, bl)?;
        let op = "layer_norm";
        if ws.dtype() != xs.dtype() || bs.dtype() != xs.dtype() {
            bail!("layer_norm: unsupported dtypes x {:?}, weight {:?}, bias {:?} (expected all f32, bf16 or f16)",
                xs.dtype(), ws.dtype(), bs.dtype());
        }
        let eps = self.eps;
        fn run<T: CudaFloat>(
            (xs, xl): (&CudaStorage, &Layout),
            (ws, wl): (&CudaStorage, &Layout),
            (bs, bl): (&CudaStorage, &Layout),
            c: usize,
            eps: f32,
        ) -> Result<CudaStorage> {
            let op = "layer_norm";
            let dev = xs.device();
            let (x, w, b) = (
                cuda::view::<T>(xs, xl, op)?,
                cuda::view::<T>(ws, wl, op)?,
                cuda::view::<T>(bs, bl, op)?,
            );
            let n = x.len();
            let rows = n / c;
            let mut y = unsafe { dev.alloc::<T>(n) }?;
            if rows > 0 {
                let k = cuda::kernel(
                    dev,
                    cuda::LAYER_NORM,
                    &format!("layer_norm_fwd_{}", T::SUFFIX),
                )?;
                let mut args = k.builder();
                args.arg(&x)
                    .arg(&w)
                    .arg(&b)
                    .arg(&mut y)
                    .arg(&rows)
                    .arg(&c)
                    .arg(&eps);
                unsafe { args.launch(cuda::rows_config(rows, gpu::row_threads(c), 0)?) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let args = ((xs, xl), (ws, wl), (bs, bl));
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(args.0, args.1, args.2, c, eps)?,
            DType::BF16 => run::<half::bf16>(args.0, args.1, args.2, c, eps)?,
            DType::F16 => run::<half::f16>(args.0, args.1, args.2, c, eps)?,
            other => bail!("{op}: unsupported dtypes x {other:?}, weight {other:?}, bias {other:?} (expected all f32, bf16 or f16)"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.elem_count(), weight.elem_count());
        // The upstream gradient may be a strided view (e.g. after a transpose); the kernel reads rows.
        let grad = grad_res.contiguous()?;
        // One buffer [dx (n) | dweight (c) | dbias (c)], on whatever device x is on.
        let packed = x.apply_op3_no_bwd(weight, &grad, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        // Copied out, so that holding the small gradients does not keep the dx-sized buffer alive.
        let dw = packed.narrow(0, n, c)?.force_contiguous()?;
        let db = packed
            .narrow(0, n + c, c)?
            .force_contiguous()?
            .reshape(bias.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward pass as an op of its own (inputs x, weight, dy; no graph node): one flat output
/// `[dx | dweight | dbias]` of `n + 2C` elements, since a custom op returns a single storage.
struct LayerNormBackward {
    eps: f32,
}

/// C when x's last dimension and weight agree on it and dy has as many elements as x.
fn backward_c(xl: &Layout, wl: &Layout, gl: &Layout) -> Result<usize> {
    let c = *xl.dims().last().unwrap_or(&0);
    if c == 0 || wl.shape().elem_count() != c || gl.shape().elem_count() != xl.shape().elem_count()
    {
        bail!(
            "layer_norm backward: x {:?}, weight {:?} and grad {:?} do not agree",
            xl.dims(),
            wl.dims(),
            gl.dims()
        );
    }
    Ok(c)
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer_norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = backward_c(xl, wl, gl)?;
        let op = "layer_norm backward";
        let eps = self.eps;
        let out = match (xs, ws, gs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => CpuStorage::F32(backward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(g, gl, op)?,
                c,
                eps,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(g)) => CpuStorage::BF16(backward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(g, gl, op)?,
                c,
                eps,
            )),
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(g)) => CpuStorage::F16(backward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                contiguous_slice(g, gl, op)?,
                c,
                eps,
            )),
            _ => bail!("layer_norm backward: unsupported dtypes x {:?}, weight {:?}, grad {:?} (expected all f32, bf16 or f16)",
                xs.dtype(), ws.dtype(), gs.dtype()),
        };
        Ok((out, Shape::from(xl.shape().elem_count() + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let c = backward_c(xl, wl, gl)?;
        let op = "layer_norm backward";
        if ws.dtype() != xs.dtype() || gs.dtype() != xs.dtype() {
            bail!("{op}: unsupported dtypes x {:?}, weight {:?}, grad {:?} (expected all f32, bf16 or f16)",
                xs.dtype(), ws.dtype(), gs.dtype());
        }
        let eps = self.eps;
        fn run<T: CudaFloat>(
            (xs, xl): (&CudaStorage, &Layout),
            (ws, wl): (&CudaStorage, &Layout),
            (gs, gl): (&CudaStorage, &Layout),
            c: usize,
            eps: f32,
        ) -> Result<CudaStorage> {
            let op = "layer_norm backward";
            let dev = xs.device();
            let (x, w, dy) = (
                cuda::view::<T>(xs, xl, op)?,
                cuda::view::<T>(ws, wl, op)?,
                cuda::view::<T>(gs, gl, op)?,
            );
            let n = x.len();
            let rows = n / c;
            // Per-block partial sums of dweight and dbias (2C floats per block), then a reduction
            // over the blocks in a fixed order: deterministic, no atomics.
            let blocks = rows.clamp(1, gpu::BWD_MAX_BLOCKS);
            let acc_bytes = 2 * c * std::mem::size_of::<f32>();
            let acc_in_shared = u32::from(acc_bytes <= gpu::SHARED_ACC_BYTES);
            let shared_bytes = if acc_in_shared == 1 {
                acc_bytes as u32
            } else {
                0
            };
            let mut partial = unsafe { dev.alloc::<f32>(blocks * 2 * c) }?;
            let mut out = unsafe { dev.alloc::<T>(n + 2 * c) }?;
            {
                let (mut dx, mut grads) = out.split_at_mut(n);
                let (mut dw, mut db) = grads.split_at_mut(c);
                {
                    let k = cuda::kernel(
                        dev,
                        cuda::LAYER_NORM,
                        &format!("layer_norm_bwd_{}", T::SUFFIX),
                    )?;
                    let mut args = k.builder();
                    args.arg(&x).arg(&w).arg(&dy).arg(&mut dx).arg(&mut partial);
                    args.arg(&rows).arg(&c).arg(&eps).arg(&acc_in_shared);
                    let cfg = cuda::rows_config(blocks, gpu::row_threads(c), shared_bytes)?;
                    unsafe { args.launch(cfg) }.w()?;
                }
                {
                    let k = cuda::kernel(
                        dev,
                        cuda::LAYER_NORM,
                        &format!("layer_norm_bwd_reduce_{}", T::SUFFIX),
                    )?;
                    let mut args = k.builder();
                    args.arg(&partial)
                        .arg(&blocks)
                        .arg(&c)
                        .arg(&mut dw)
                        .arg(&mut db);
                    unsafe { args.launch(gpu::reduce_config(2 * c)?) }.w()?;
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let args = ((xs, xl), (ws, wl), (gs, gl));
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(args.0, args.1, args.2, c, eps)?,
            DType::BF16 => run::<half::bf16>(args.0, args.1, args.2, c, eps)?,
            DType::F16 => run::<half::f16>(args.0, args.1, args.2, c, eps)?,
            other => bail!("{op}: unsupported dtypes x {other:?}, weight {other:?}, grad {other:?} (expected all f32, bf16 or f16)"),
        };
        Ok((out, Shape::from(xl.shape().elem_count() + 2 * c)))
    }
}

/// Launch shapes of `src/cuda/layer_norm.cu`.
#[cfg(feature = "cuda")]
mod gpu {
    use crate::cuda::LaunchConfig;
    use candle_core::{bail, Result};

    /// Row blocks of the backward kernel at most (rows are spread over them, each keeps its own
    /// dweight/dbias partial sums): about four per H100 SM. A constant, so that the summation order,
    /// hence the result, is the same on every GPU.
    pub(super) const BWD_MAX_BLOCKS: usize = 512;
    /// The backward's partial sums live in shared memory up to this size (C <= 4096), else in its
    /// global partial buffer (the 48 KiB a block gets without opting in, less the static arrays).
    pub(super) const SHARED_ACC_BYTES: usize = 32 * 1024;

    /// Threads per row block: a multiple of 32 (the block reductions shuffle full warps), 32..=256.
    pub(super) fn row_threads(c: usize) -> u32 {
        (c.div_ceil(32) * 32).clamp(32, 256) as u32
    }

    /// The column reduction of the partial sums: 32 columns per block, 32 threads down the blocks.
    pub(super) fn reduce_config(width: usize) -> Result<LaunchConfig> {
        let tiles = width.div_ceil(32);
        if tiles > i32::MAX as usize {
            bail!("layer_norm backward: {width} columns are more than one grid dimension holds");
        }
        Ok(LaunchConfig {
            grid_dim: (tiles.max(1) as u32, 1, 1),
            block_dim: (32, 32, 1),
            shared_mem_bytes: 0,
        })
    }
}

/// Rows per rayon task (at least one).
fn rows_per_task(c: usize) -> usize {
    (TASK_ELEMS / c).max(1)
}

/// Copy a row into f32 scratch and return its mean and 1/std (two passes over the row: more
/// accurate than E[x^2] - E[x]^2 when |mean| >> std, and the row is in L1 anyway).
#[inline]
fn load_row_stats<T: KernelFloat>(row: &[T], scratch: &mut [f32], eps: f32) -> (f32, f32) {
    let c = row.len() as f32;
    for (s, &v) in scratch.iter_mut().zip(row) {
        *s = v.widen();
    }
    let mean = sum_lanes(scratch, scratch, |v, _| v) / c;
    let var = sum_lanes(scratch, scratch, |v, _| (v - mean) * (v - mean)) / c;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward<T: KernelFloat>(x: &[T], w: &[T], b: &[T], c: usize, eps: f32) -> Vec<T> {
    let w: Vec<f32> = w.iter().map(|v| v.widen()).collect();
    let b: Vec<f32> = b.iter().map(|v| v.widen()).collect();
    let mut y = vec![T::narrow(0.0); x.len()];
    let chunk = rows_per_task(c) * c;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| {
            let mut xr = vec![0f32; c];
            for (yr, xrow) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let (mean, rstd) = load_row_stats(xrow, &mut xr, eps);
                for (((o, &v), &wi), &bi) in yr.iter_mut().zip(&xr).zip(&w).zip(&b) {
                    *o = T::narrow((v - mean) * rstd * wi + bi);
                }
            }
        });
    y
}

/// Returns [dx | dweight | dbias] in one vector. With xhat = (x - mean) * rstd and dxhat = dy * w:
/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); dw = sum_rows dy * xhat;
/// db = sum_rows dy. dw/db are summed per task, then the partials are added in task order.
fn backward<T: KernelFloat>(x: &[T], w: &[T], dy: &[T], c: usize, eps: f32) -> Vec<T> {
    let w: Vec<f32> = w.iter().map(|v| v.widen()).collect();
    let mut out = vec![T::narrow(0.0); x.len() + 2 * c];
    let (dx, grads) = out.split_at_mut(x.len());
    let chunk = rows_per_task(c) * c;
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .map(|((dx, x), dy)| {
            // First half accumulates dweight, second half dbias.
            let mut acc = vec![0f32; 2 * c];
            let (dw, db) = acc.split_at_mut(c);
            // Row scratch: x, then xhat in place; dxhat.
            let mut xr = vec![0f32; c];
            let mut dh = vec![0f32; c];
            for ((dxr, xrow), dyrow) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(dy.chunks_exact(c))
            {
                let (mean, rstd) = load_row_stats(xrow, &mut xr, eps);
                // Elementwise (vectorizable) pass: xhat, dxhat and the dweight/dbias contributions.
                for (((((xh, d), &g), &wi), dwi), dbi) in xr
                    .iter_mut()
                    .zip(dh.iter_mut())
                    .zip(dyrow)
                    .zip(&w)
                    .zip(dw.iter_mut())
                    .zip(db.iter_mut())
                {
                    let g = g.widen();
                    *xh = (*xh - mean) * rstd;
                    *d = g * wi;
                    *dwi += g * *xh;
                    *dbi += g;
                }
                let mean_dxhat = sum_lanes(&dh, &dh, |d, _| d) / c as f32;
                let mean_dxhat_xhat = sum_lanes(&dh, &xr, |d, xh| d * xh) / c as f32;
                for ((o, &d), &xh) in dxr.iter_mut().zip(&dh).zip(&xr) {
                    *o = T::narrow(rstd * (d - mean_dxhat - xh * mean_dxhat_xhat));
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; 2 * c];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    // dweight then dbias, as in `total`.
    for (o, &v) in grads.iter_mut().zip(&total) {
        *o = T::narrow(v);
    }
    out
}
