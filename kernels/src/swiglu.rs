//! SwiGLU, the gated activation of Llama's MLP (`down_proj(silu(gate_proj(x)) * up_proj(x))`):
//! `swiglu(gate, up) = silu(gate) * up` with `silu(g) = g * sigmoid(g)`, with gradients for both.
//!
//! `swiglu` is a `CustomOp2` whose CPU forward and backward are one elementwise pass each, parallel
//! over fixed-size chunks: the composed version allocates and records four full-size tensors (the
//! MLP's largest activations). The backward recomputes sigmoid(gate) instead of saving it and writes
//! dgate = dy * up * s * (1 + g * (1 - s)) and dup = dy * g * s in the same pass.
//!
//! The sigmoid is `1 / (1 + exp(-g))` with an exp clamped to [-87, 88], so it never overflows: for
//! g -> -inf it tends to a tiny positive number (not 0 * inf = NaN), for g -> +inf to exactly 1.
//! `swiglu_reference` is the spec, built from differentiable candle ops with the equally safe
//! `sigmoid(g) = 0.5 + 0.5 * tanh(g / 2)`.

use crate::util::exp_f32;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: a few ns each, so 16K elements amortize scheduling well.
const TASK_ELEMS: usize = 16 * 1024;

/// `silu(gate) * up` for `gate` and `up` of one shape and dtype (f32, bf16 or f16; arithmetic in
/// f32, output in their dtype). Differentiable in both; CPU only.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_args(gate, up)?;
    // The kernels walk the buffers linearly, so strided views are copied first (differentiably).
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The spec: `gate * sigmoid(gate) * up` from candle primitives in f32 (f64 for f64 inputs, for
/// finite-difference checks), cast back to `gate`'s dtype. The sigmoid is written as
/// `0.5 + 0.5 tanh(gate / 2)`: `1 / (1 + exp(-gate))` overflows exp for gate < -88 in f32, and
/// candle's gradient of that form is then inf * 0 = NaN.
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_args(gate, up)?;
    let compute = if gate.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let g = gate.to_dtype(compute)?;
    let sigmoid = g.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?;
    let y = g.mul(&sigmoid)?.mul(&up.to_dtype(compute)?)?;
    y.to_dtype(gate.dtype())
}

fn check_args(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate and up must have the same shape, got {:?} and {:?}",
            gate.dims(),
            up.dims()
        );
    }
    if gate.dtype() != up.dtype() {
        bail!(
            "swiglu: gate and up must share a dtype, got {:?} and {:?}",
            gate.dtype(),
            up.dtype()
        );
    }
    Ok(())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!(
                "swiglu: gate {:?} and up {:?} do not have the same shape",
                gl.dims(),
                ul.dims()
            );
        }
        let op = "swiglu";
        let out = match (gs, us) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(forward(
                contiguous_slice(g, gl, op)?,
                contiguous_slice(u, ul, op)?,
            )),
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(forward(
                contiguous_slice(g, gl, op)?,
                contiguous_slice(u, ul, op)?,
            )),
            (CpuStorage::F16(g), CpuStorage::F16(u)) => CpuStorage::F16(forward(
                contiguous_slice(g, gl, op)?,
                contiguous_slice(u, ul, op)?,
            )),
            _ => bail!(
                "swiglu: unsupported dtypes gate {:?}, up {:?} (expected both f32, bf16 or f16)",
                gs.dtype(),
                us.dtype()
            ),
        };
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (dgate, dup) = {
            let (gs, gl) = gate.storage_and_layout();
            let (us, ul) = up.storage_and_layout();
            let (ds, dl) = grad.storage_and_layout();
            let (Storage::Cpu(gs), Storage::Cpu(us), Storage::Cpu(ds)) = (&*gs, &*us, &*ds) else {
                bail!(
                    "swiglu backward: only CPU tensors are supported, gate is on {:?}",
                    gate.device().location()
                )
            };
            let op = "swiglu backward";
            match (gs, us, ds) {
                (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(d)) => to_tensors(backward(
                    contiguous_slice(g, gl, op)?,
                    contiguous_slice(u, ul, op)?,
                    contiguous_slice(d, dl, op)?,
                ))?,
                (CpuStorage::BF16(g), CpuStorage::BF16(u), CpuStorage::BF16(d)) => to_tensors(backward(
                    contiguous_slice(g, gl, op)?,
                    contiguous_slice(u, ul, op)?,
                    contiguous_slice(d, dl, op)?,
                ))?,
                (CpuStorage::F16(g), CpuStorage::F16(u), CpuStorage::F16(d)) => to_tensors(backward(
                    contiguous_slice(g, gl, op)?,
                    contiguous_slice(u, ul, op)?,
                    contiguous_slice(d, dl, op)?,
                ))?,
                _ => bail!(
                    "swiglu backward: unsupported dtypes gate {:?}, up {:?}, grad {:?} (expected all f32, bf16 or f16)",
                    gs.dtype(),
                    us.dtype(),
                    ds.dtype()
                ),
            }
        };
        Ok((
            Some(dgate.reshape(gate.shape())?),
            Some(dup.reshape(up.shape())?),
        ))
    }
}

/// Wrap the backward kernel's vectors as flat CPU tensors.
fn to_tensors<T: KernelFloat>((dgate, dup): (Vec<T>, Vec<T>)) -> Result<(Tensor, Tensor)> {
    let dev = candle_core::Device::Cpu;
    let n = dgate.len();
    Ok((
        Tensor::from_vec(dgate, n, &dev)?,
        Tensor::from_vec(dup, n, &dev)?,
    ))
}

/// sigmoid(x) = 1 / (1 + exp(-x)): the denominator is in [1, 1 + e^88], finite, so there is no
/// overflow or 0/0 for any finite x, and no cancellation for negative x.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

fn forward<T: KernelFloat>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut y = vec![T::narrow(0.0); gate.len()];
    y.par_chunks_mut(TASK_ELEMS)
        .zip(gate.par_chunks(TASK_ELEMS))
        .zip(up.par_chunks(TASK_ELEMS))
        .for_each(|((y, gate), up)| {
            for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                let g = g.widen();
                *o = T::narrow(g * sigmoid(g) * u.widen());
            }
        });
    y
}

/// Returns (dgate, dup): with s = sigmoid(g), d silu / dg = s + g s (1 - s) = s (1 + g (1 - s)).
fn backward<T: KernelFloat>(gate: &[T], up: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dgate = vec![T::narrow(0.0); gate.len()];
    let mut dup = vec![T::narrow(0.0); gate.len()];
    dgate
        .par_chunks_mut(TASK_ELEMS)
        .zip(dup.par_chunks_mut(TASK_ELEMS))
        .zip(gate.par_chunks(TASK_ELEMS))
        .zip(up.par_chunks(TASK_ELEMS).zip(dy.par_chunks(TASK_ELEMS)))
        .for_each(|(((dgate, dup), gate), (up, dy))| {
            for ((((dg, du), &g), &u), &d) in dgate
                .iter_mut()
                .zip(dup.iter_mut())
                .zip(gate)
                .zip(up)
                .zip(dy)
            {
                let (g, d) = (g.widen(), d.widen());
                let s = sigmoid(g);
                *dg = T::narrow(d * u.widen() * s * (1.0 + g * (1.0 - s)));
                *du = T::narrow(d * g * s);
            }
        });
    (dgate, dup)
}
