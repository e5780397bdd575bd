//! RMSNorm over the last dimension, as Hugging Face's `LlamaRMSNorm`:
//! `y = x / sqrt(mean(x^2) + eps) * weight`, with a gradient for the input and the weight.
//!
//! candle-nn's fused `rms_norm` records no backward, so a model that trains through it silently gets
//! no gradient. `rms_norm` here is a `CustomOp2` whose CPU forward and backward are single fused
//! passes over rows (the `layer_norm` kernels without the mean), parallel over chunks of rows. The
//! backward recomputes 1/rms from `x` instead of saving it. `rms_norm_reference` is the spec,
//! composed from differentiable candle ops.
//!
//! Precision: transformers computes the normalization in f32, casts it back to the input dtype and
//! then multiplies by the weight in that dtype (two roundings for bf16). Both functions here compute
//! everything, the weight product included, in f32 and round the output to the input dtype once.

use crate::util::sum_lanes;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortize scheduling, small enough to load-balance rows.
/// A fixed size (not one derived from the thread count) keeps the dweight summation order, hence
/// the result, identical on every machine.
const TASK_ELEMS: usize = 16 * 1024;

/// RMSNorm of `x` (shape `(..., C)`) with `weight` of shape `(C)`, both of one dtype (f32, bf16 or
/// f16; arithmetic in f32, output in `x`'s dtype). Differentiable in `x` and `weight`; CPU only.
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
        let c = *xl.dims().last().unwrap_or(&0);
        if c == 0 || wl.shape().elem_count() != c {
            bail!(
                "rms_norm: x {:?} and weight {:?} do not agree on C",
                xl.dims(),
                wl.dims()
            );
        }
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

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = weight.elem_count();
        // The upstream gradient may be a strided view (e.g. after a transpose); the kernel reads rows.
        let grad = grad_res.contiguous()?;
        let (dx, dw) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = weight.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
                bail!(
                    "rms_norm backward: only CPU tensors are supported, x is on {:?}",
                    x.device().location()
                )
            };
            let op = "rms_norm backward";
            let eps = self.eps;
            match (xs, ws, gs) {
                (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => to_tensors(backward(
                    contiguous_slice(x, xl, op)?,
                    contiguous_slice(w, wl, op)?,
                    contiguous_slice(g, gl, op)?,
                    c,
                    eps,
                ))?,
                (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(g)) => to_tensors(backward(
                    contiguous_slice(x, xl, op)?,
                    contiguous_slice(w, wl, op)?,
                    contiguous_slice(g, gl, op)?,
                    c,
                    eps,
                ))?,
                (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(g)) => to_tensors(backward(
                    contiguous_slice(x, xl, op)?,
                    contiguous_slice(w, wl, op)?,
                    contiguous_slice(g, gl, op)?,
                    c,
                    eps,
                ))?,
                _ => bail!(
                    "rms_norm backward: unsupported dtypes x {:?}, weight {:?}, grad {:?} (expected all f32, bf16 or f16)",
                    xs.dtype(),
                    ws.dtype(),
                    gs.dtype()
                ),
            }
        };
        Ok((
            Some(dx.reshape(x.shape())?),
            Some(dw.reshape(weight.shape())?),
        ))
    }
}

/// Wrap the backward kernel's vectors as flat CPU tensors.
fn to_tensors<T: KernelFloat>((dx, dw): (Vec<T>, Vec<T>)) -> Result<(Tensor, Tensor)> {
    let dev = candle_core::Device::Cpu;
    let (n, c) = (dx.len(), dw.len());
    Ok((
        Tensor::from_vec(dx, n, &dev)?,
        Tensor::from_vec(dw, c, &dev)?,
    ))
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

/// Returns (dx, dweight). With r = 1/rms, xhat = x * r and dxhat = dy * w:
/// dx = r * (dxhat - xhat * mean(dxhat * xhat)); dw = sum_rows dy * xhat. dw is summed per task,
/// then the partials are added in task order (deterministic).
fn backward<T: KernelFloat>(x: &[T], w: &[T], dy: &[T], c: usize, eps: f32) -> (Vec<T>, Vec<T>) {
    let w: Vec<f32> = w.iter().map(|v| v.widen()).collect();
    let mut dx = vec![T::narrow(0.0); x.len()];
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
    let dw = total.into_iter().map(T::narrow).collect();
    (dx, dw)
}
