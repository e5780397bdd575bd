//! RMSNorm over the last dimension, as Hugging Face's `LlamaRMSNorm`:
//! `y = x / sqrt(mean(x^2) + eps) * weight`, with a gradient for the input and the weight.
//!
//! candle-nn's fused `rms_norm` records no backward, so a model that trains through it silently gets
//! no gradient. `rms_norm` here is a `CustomOp2` whose CPU forward and backward are single fused
//! passes over rows (the `layer_norm` kernels without the mean), parallel over chunks of rows. The
//! backward recomputes 1/rms from `x` instead of saving it. `rms_norm_reference` is the spec,
//! composed from differentiable candle ops.
//!
//! With the `cuda` feature both passes also run on CUDA tensors (`src/cuda/rms_norm.cu`, same
//! formulas): the backward is its own `CustomOp3` (`RmsNormBackward`, applied without a graph node,
//! returning `[dx | dweight]` in one buffer), so `bwd` is the same code on every device.
//!
//! Precision: transformers computes the normalization in f32, casts it back to the input dtype and
//! then multiplies by the weight in that dtype (two roundings for bf16). Both functions here compute
//! everything, the weight product included, in f32 and round the output to the input dtype once.

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat, PushKernelArg, WrapErr};
use crate::util::sum_lanes;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortize scheduling, small enough to load-balance rows.
/// A fixed size (not one derived from the thread count) keeps the dweight summation order, hence
/// the result, identical on every machine.
const TASK_ELEMS: usize = 16 * 1024;

/// RMSNorm of `x` (shape `(..., C)`) with `weight` of shape `(C)`, both of one dtype (f32, bf16 or
/// f16; arithmetic in f32, output in `x`'s dtype). Differentiable in `x` and `weight`; CPU, and CUDA
/// with the `cuda` feature.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_args(x, weight, eps)?;
    // The kernels index rows directly, so strided views are copied first (differentiably).
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    x.apply_op2(&weight, RmsNorm { eps: eps as f32 })
}

/// The spec: RMSNorm from candle primitives, computed in f32 (f64 for f64 inputs, so that it can be
/// checked against finite differences) and cast back to `x`'s dtype.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_args(x, weight, eps)?;
    let compute = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xf = x.to_dtype(compute)?;
    let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let rrms = (mean_sq + eps)?.sqrt()?.recip()?;
    let y = xf
        .broadcast_mul(&rrms)?
        .broadcast_mul(&weight.to_dtype(compute)?)?;
    y.to_dtype(x.dtype())
}

fn check_args(x: &Tensor, weight: &Tensor, eps: f64) -> Result<()> {
    let Some(&c) = x.dims().last() else {
        bail!("rms_norm: x must have at least one dimension, got a scalar")
    };
    if c == 0 {
        bail!(
            "rms_norm: the normalized (last) dimension of x is empty, x shape {:?}",
            x.dims()
        );
    }
    if weight.dims() != [c] {
        bail!(
            "rms_norm: weight must have shape [{c}] to match x {:?}, got {:?}",
            x.dims(),
            weight.dims()
        );
    }
    if weight.dtype() != x.dtype() {
        bail!(
            "rms_norm: x and weight must share a dtype, got {:?} and {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("rms_norm: eps must be a finite non-negative number, got {eps}");
    }
    Ok(())
}

struct RmsNorm {
    eps: f32,
}

/// C (the normalized size) when x's last dimension and weight agree on it.
fn agree_on_c(xl: &Layout, wl: &Layout) -> Result<usize> {
    let c = *xl.dims().last().unwrap_or(&0);
    if c == 0 || wl.shape().elem_count() != c {
        bail!(
            "rms_norm: x {:?} and weight {:?} do not agree on C",
            xl.dims(),
            wl.dims()
        );
    }
    Ok(c)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = agree_on_c(xl, wl)?;
        let op = "rms_norm";
        let eps = self.eps;
        let out = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                c,
                eps,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => CpuStorage::BF16(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                c,
                eps,
            )),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => CpuStorage::F16(forward(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(w, wl, op)?,
                c,
                eps,
            )),
            _ => bail!(
                "rms_norm: unsupported dtypes x {:?}, weight {:?} (expected both f32, bf16 or f16)",
                xs.dtype(),
                ws.dtype()
            ),
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
    ) -> Result<(CudaStorage, Shape)> {
        let c = agree_on_c(xl, wl)?;
        let op = "rms_norm";
        if ws.dtype() != xs.dtype() {
            bail!(
                "{op}: unsupported dtypes x {:?}, weight {:?} (expected both f32, bf16 or f16)",
                xs.dtype(),
                ws.dtype()
            );
        }
        let eps = self.eps;
        fn run<T: CudaFloat>(
            (xs, xl): (&CudaStorage, &Layout),
            (ws, wl): (&CudaStorage, &Layout),
            c: usize,
            eps: f32,
        ) -> Result<CudaStorage> {
            let op = "rms_norm";
            let dev = xs.device();
            let (x, w) = (cuda::view::<T>(xs, xl, op)?, cuda::view::<T>(ws, wl, op)?);
            let n = x.len();
            let rows = n / c;
            let mut y = unsafe { dev.alloc::<T>(n) }?;
            if rows > 0 {
                let k = cuda::kernel(dev, cuda::RMS_NORM, &format!("rms_norm_fwd_{}", T::SUFFIX))?;
                let mut args = k.builder();
                args.arg(&x)
                    .arg(&w)
                    .arg(&mut y)
                    .arg(&rows)
                    .arg(&c)
                    .arg(&eps);
                unsafe { args.launch(cuda::rows_config(rows, gpu::row_threads(c), 0)?) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let out = match xs.dtype() {
            DType::F32 => run::<f32>((xs, xl), (ws, wl), c, eps)?,
            DType::BF16 => run::<half::bf16>((xs, xl), (ws, wl), c, eps)?,
            DType::F16 => run::<half::f16>((xs, xl), (ws, wl), c, eps)?,
            other => bail!("{op}: unsupported dtypes x {other:?}, weight {other:?} (expected both f32, bf16 or f16)"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.elem_count(), weight.elem_count());
        // The upstream gradient may be a strided view (e.g. after a transpose); the kernel reads rows.
        let grad = grad_res.contiguous()?;
        // One buffer [dx (n) | dweight (c)], on whatever device x is on.
        let packed = x.apply_op3_no_bwd(weight, &grad, &RmsNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        // Copied out, so that holding the small gradient does not keep the dx-sized buffer alive.
        let dw = packed
            .narrow(0, n, c)?
            .force_contiguous()?
            .reshape(weight.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The backward pass as an op of its own (inputs x, weight, dy; no graph node): one flat output
/// `[dx | dweight]` of `n + C` elements, since a custom op returns a single storage.
struct RmsNormBackward {
    eps: f32,
}

/// C when x's last dimension and weight agree on it and dy has as many elements as x.
fn backward_c(xl: &Layout, wl: &Layout, gl: &Layout) -> Result<usize> {
    let c = *xl.dims().last().unwrap_or(&0);
    if c == 0 || wl.shape().elem_count() != c || gl.shape().elem_count() != xl.shape().elem_count()
    {
        bail!(
            "rms_norm backward: x {:?}, weight {:?} and grad {:?} do not agree",
            xl.dims(),
            wl.dims(),
            gl.dims()
        );
    }
    Ok(c)
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms_norm-backward"
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
        let op = "rms_norm backward";
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
            _ => bail!(
                "rms_norm backward: unsupported dtypes x {:?}, weight {:?}, grad {:?} (expected all f32, bf16 or f16)",
                xs.dtype(),
                ws.dtype(),
                gs.dtype()
            ),
        };
        Ok((out, Shape::from(xl.shape().elem_count() + c)))
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
        let op = "rms_norm backward";
        if ws.dtype() != xs.dtype() || gs.dtype() != xs.dtype() {
            bail!(
                "{op}: unsupported dtypes x {:?}, weight {:?}, grad {:?} (expected all f32, bf16 or f16)",
                xs.dtype(),
                ws.dtype(),
                gs.dtype()
            );
        }
        let eps = self.eps;
        fn run<T: CudaFloat>(
            (xs, xl): (&CudaStorage, &Layout),
            (ws, wl): (&CudaStorage, &Layout),
            (gs, gl): (&CudaStorage, &Layout),
            c: usize,
            eps: f32,
        ) -> Result<CudaStorage> {
            let op = "rms_norm backward";
            let dev = xs.device();
            let (x, w, dy) = (
                cuda::view::<T>(xs, xl, op)?,
                cuda::view::<T>(ws, wl, op)?,
                cuda::view::<T>(gs, gl, op)?,
            );
            let n = x.len();
            let rows = n / c;
            // Per-block partial sums of dweight (C floats per block), then a reduction over the
            // blocks in a fixed order: deterministic, no atomics.
            let blocks = rows.clamp(1, gpu::BWD_MAX_BLOCKS);
            let acc_bytes = c * std::mem::size_of::<f32>();
            let acc_in_shared = u32::from(acc_bytes <= gpu::SHARED_ACC_BYTES);
            let shared_bytes = if acc_in_shared == 1 {
                acc_bytes as u32
            } else {
                0
            };
            let mut partial = unsafe { dev.alloc::<f32>(blocks * c) }?;
            let mut out = unsafe { dev.alloc::<T>(n + c) }?;
            {
                let (mut dx, mut dw) = out.split_at_mut(n);
                {
                    let k =
                        cuda::kernel(dev, cuda::RMS_NORM, &format!("rms_norm_bwd_{}", T::SUFFIX))?;
                    let mut args = k.builder();
                    args.arg(&x).arg(&w).arg(&dy).arg(&mut dx).arg(&mut partial);
                    args.arg(&rows).arg(&c).arg(&eps).arg(&acc_in_shared);
                    let cfg = cuda::rows_config(blocks, gpu::row_threads(c), shared_bytes)?;
                    unsafe { args.launch(cfg) }.w()?;
                }
                {
                    let k = cuda::kernel(
                        dev,
                        cuda::RMS_NORM,
                        &format!("rms_norm_bwd_reduce_{}", T::SUFFIX),
                    )?;
                    let mut args = k.builder();
                    args.arg(&partial).arg(&blocks).arg(&c).arg(&mut dw);
                    unsafe { args.launch(gpu::reduce_config(c)?) }.w()?;
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let out = match xs.dtype() {
            DType::F32 => run::<f32>((xs, xl), (ws, wl), (gs, gl), c, eps)?,
            DType::BF16 => run::<half::bf16>((xs, xl), (ws, wl), (gs, gl), c, eps)?,
            DType::F16 => run::<half::f16>((xs, xl), (ws, wl), (gs, gl), c, eps)?,
            other => bail!("{op}: unsupported dtypes x {other:?}, weight {other:?}, grad {other:?} (expected all f32, bf16 or f16)"),
        };
        Ok((out, Shape::from(xl.shape().elem_count() + c)))
    }
}

/// Launch shapes of `src/cuda/rms_norm.cu`.
#[cfg(feature = "cuda")]
mod gpu {
    use crate::cuda::LaunchConfig;
    use candle_core::{bail, Result};

    /// Row blocks of the backward kernel at most (rows are spread over them, each keeps its own
    /// dweight partial sums): about four per H100 SM. A constant, so that the summation order,
    /// hence the result, is the same on every GPU.
    pub(super) const BWD_MAX_BLOCKS: usize = 512;
    /// The backward's partial sums live in shared memory up to this size (C <= 8192), else in its
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
            bail!("rms_norm backward: {width} columns are more than one grid dimension holds");
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

/// Copy a row into f32 scratch and return 1/sqrt(mean(x^2) + eps).
#[inline]
fn load_row_rrms<T: KernelFloat>(row: &[T], scratch: &mut [f32], eps: f32) -> f32 {
    for (s, &v) in scratch.iter_mut().zip(row) {
        *s = v.widen();
    }
    let mean_sq = sum_lanes(scratch, scratch, |v, _| v * v) / row.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

fn forward<T: KernelFloat>(x: &[T], w: &[T], c: usize, eps: f32) -> Vec<T> {
    let w: Vec<f32> = w.iter().map(|v| v.widen()).collect();
    let mut y = vec![T::narrow(0.0); x.len()];
    let chunk = rows_per_task(c) * c;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| {
            let mut xr = vec![0f32; c];
            for (yr, xrow) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let rrms = load_row_rrms(xrow, &mut xr, eps);
                for ((o, &v), &wi) in yr.iter_mut().zip(&xr).zip(&w) {
                    *o = T::narrow(v * rrms * wi);
                }
            }
        });
    y
}

/// Returns [dx | dweight] in one vector. With r = 1/rms, xhat = x * r and dxhat = dy * w:
/// dx = r * (dxhat - xhat * mean(dxhat * xhat)); dw = sum_rows dy * xhat. dw is summed per task,
/// then the partials are added in task order (deterministic).
fn backward<T: KernelFloat>(x: &[T], w: &[T], dy: &[T], c: usize, eps: f32) -> Vec<T> {
    let w: Vec<f32> = w.iter().map(|v| v.widen()).collect();
    let mut out = vec![T::narrow(0.0); x.len() + c];
    let (dx, dw_out) = out.split_at_mut(x.len());
    let chunk = rows_per_task(c) * c;
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .map(|((dx, x), dy)| {
            let mut dw = vec![0f32; c];
            // Row scratch: x, then xhat in place; dxhat.
            let mut xr = vec![0f32; c];
            let mut dh = vec![0f32; c];
            for ((dxr, xrow), dyrow) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(dy.chunks_exact(c))
            {
                let rrms = load_row_rrms(xrow, &mut xr, eps);
                // Elementwise (vectorizable) pass: xhat, dxhat and the dweight contribution.
                for ((((xh, d), &g), &wi), dwi) in xr
                    .iter_mut()
                    .zip(dh.iter_mut())
                    .zip(dyrow)
                    .zip(&w)
                    .zip(dw.iter_mut())
                {
                    let g = g.widen();
                    *xh *= rrms;
                    *d = g * wi;
                    *dwi += g * *xh;
                }
                let mean_dxhat_xhat = sum_lanes(&dh, &xr, |d, xh| d * xh) / c as f32;
                for ((o, &d), &xh) in dxr.iter_mut().zip(&dh).zip(&xr) {
                    *o = T::narrow(rrms * (d - xh * mean_dxhat_xhat));
                }
            }
            dw
        })
        .collect();
    let mut total = vec![0f32; c];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    for (o, v) in dw_out.iter_mut().zip(total) {
        *o = T::narrow(v);
    }
    out
}
