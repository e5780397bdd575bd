//! LayerNorm over the last dimension, as `torch.nn.functional.layer_norm` (biased variance, eps
//! inside the square root), with a gradient for the input, the weight and the bias.
//!
//! candle-nn's fused `layer_norm` records no backward, so a model that trains through it silently
//! gets no gradient. `layer_norm` here is a `CustomOp3` whose CPU forward and backward are single
//! fused passes over rows (llm.c's `layernorm_forward/backward`), parallel over chunks of rows.
//! The backward recomputes mean and 1/std from `x` instead of saving them: a row is already in
//! cache when its gradient is computed, and nothing extra has to live between forward and backward.
//! `layer_norm_reference` is the spec, composed from differentiable candle ops.

use crate::util::sum_lanes;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortize scheduling, small enough to load-balance rows.
/// A fixed size (not one derived from the thread count) keeps the dweight/dbias summation order,
/// hence the result, identical on every machine.
const TASK_ELEMS: usize = 16 * 1024;

/// LayerNorm of `x` (shape `(..., C)`) with `weight` and `bias` of shape `(C)`, all of one dtype
/// (f32, bf16 or f16; arithmetic in f32). Differentiable in all three inputs; CPU only.
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
        let c = *xl.dims().last().unwrap_or(&0);
        if c == 0 || wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            bail!(
                "layer_norm: x {:?}, weight {:?} and bias {:?} do not agree on C",
                xl.dims(),
                wl.dims(),
                bl.dims()
            );
        }
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

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = weight.elem_count();
        // The upstream gradient may be a strided view (e.g. after a transpose); the kernel reads rows.
        let grad = grad_res.contiguous()?;
        let (dx, dw, db) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = weight.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
                bail!(
                    "layer_norm backward: only CPU tensors are supported, x is on {:?}",
                    x.device().location()
                )
            };
            let op = "layer_norm backward";
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
                _ => bail!("layer_norm backward: unsupported dtypes x {:?}, weight {:?}, grad {:?} (expected all f32, bf16 or f16)",
                    xs.dtype(), ws.dtype(), gs.dtype()),
            }
        };
        Ok((
            Some(dx.reshape(x.shape())?),
            Some(dw),
            Some(db.reshape(bias.shape())?),
        ))
    }
}

/// Wrap the backward kernel's vectors as flat CPU tensors.
fn to_tensors<T: KernelFloat>(
    (dx, dw, db): (Vec<T>, Vec<T>, Vec<T>),
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = candle_core::Device::Cpu;
    let (n, c) = (dx.len(), dw.len());
    Ok((
        Tensor::from_vec(dx, n, &dev)?,
        Tensor::from_vec(dw, c, &dev)?,
        Tensor::from_vec(db, c, &dev)?,
    ))
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

/// Returns (dx, dweight, dbias). With xhat = (x - mean) * rstd and dxhat = dy * w:
/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); dw = sum_rows dy * xhat;
/// db = sum_rows dy. dw/db are summed per task, then the partials are added in task order.
fn backward<T: KernelFloat>(
    x: &[T],
    w: &[T],
    dy: &[T],
    c: usize,
    eps: f32,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let w: Vec<f32> = w.iter().map(|v| v.widen()).collect();
    let mut dx = vec![T::narrow(0.0); x.len()];
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
    let dw = total[..c].iter().map(|&v| T::narrow(v)).collect();
    let db = total[c..].iter().map(|&v| T::narrow(v)).collect();
    (dx, dw, db)
}
