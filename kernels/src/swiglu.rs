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
//!
//! With the `cuda` feature both passes also run on CUDA tensors (`src/cuda/swiglu.cu`, same
//! formulas, the same clamp, IEEE `expf`): the backward is its own `CustomOp3` (`SwiGluBackward`,
//! applied without a graph node) whose one output holds dgate and dup stacked along a new first
//! dimension, so `bwd` is the same code on every device.

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use crate::util::exp_f32;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: a few ns each, so 16K elements amortize scheduling well.
const TASK_ELEMS: usize = 16 * 1024;

/// `silu(gate) * up` for `gate` and `up` of one shape and dtype (f32, bf16 or f16; arithmetic in
/// f32, output in their dtype). Differentiable in both; CPU, and CUDA with the `cuda` feature.
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = "swiglu";
        if gl.dims() != ul.dims() {
            bail!(
                "{op}: gate {:?} and up {:?} do not have the same shape",
                gl.dims(),
                ul.dims()
            );
        }
        if gs.dtype() != us.dtype() {
            bail!(
                "{op}: unsupported dtypes gate {:?}, up {:?} (expected both f32, bf16 or f16)",
                gs.dtype(),
                us.dtype()
            );
        }
        fn run<T: CudaFloat>(
            gs: &CudaStorage,
            gl: &Layout,
            us: &CudaStorage,
            ul: &Layout,
        ) -> Result<CudaStorage> {
            let op = "swiglu";
            let (gate, up) = (cuda::view::<T>(gs, gl, op)?, cuda::view::<T>(us, ul, op)?);
            let name = format!("swiglu_fwd_{}", T::SUFFIX);
            cuda::launch_elementwise(gs.device(), cuda::SWIGLU, &name, &[&gate, &up], gate.len())
        }
        let out = match gs.dtype() {
            DType::F32 => run::<f32>(gs, gl, us, ul)?,
            DType::BF16 => run::<half::bf16>(gs, gl, us, ul)?,
            DType::F16 => run::<half::f16>(gs, gl, us, ul)?,
            other => bail!("{op}: unsupported dtypes gate {other:?}, up {other:?} (expected both f32, bf16 or f16)"),
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
        // `gate` and `up` are the op's (contiguous) inputs; the backward op runs on whatever device
        // they are on and returns dgate and dup stacked, shape (2, shape...): two contiguous views.
        let grad = grad_res.contiguous()?;
        let both = gate.apply_op3_no_bwd(up, &grad, &SwiGluBackward)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `(dgate, dup)` for `(gate, up, dy)`, stacked along a new first dimension (shape `(2, shape...)`)
/// so that one op returns both: the backward pass as an op of its own, with a CPU and a CUDA
/// forward (no graph node: `bwd` output is detached anyway).
struct SwiGluBackward;

/// The backward's output shape: (2, dims of gate).
fn stacked_shape(gl: &Layout) -> Shape {
    let mut dims = Vec::with_capacity(gl.dims().len() + 1);
    dims.push(2);
    dims.extend_from_slice(gl.dims());
    Shape::from(dims)
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "swiglu backward";
        if gl.dims() != ul.dims() || gl.dims() != dl.dims() {
            bail!(
                "{op}: gate {:?}, up {:?} and grad {:?} differ in shape",
                gl.dims(),
                ul.dims(),
                dl.dims()
            );
        }
        let out = match (gs, us, ds) {
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(d)) => CpuStorage::F32(backward(
                contiguous_slice(g, gl, op)?,
                contiguous_slice(u, ul, op)?,
                contiguous_slice(d, dl, op)?,
            )),
            (CpuStorage::BF16(g), CpuStorage::BF16(u), CpuStorage::BF16(d)) => CpuStorage::BF16(backward(
                contiguous_slice(g, gl, op)?,
                contiguous_slice(u, ul, op)?,
                contiguous_slice(d, dl, op)?,
            )),
            (CpuStorage::F16(g), CpuStorage::F16(u), CpuStorage::F16(d)) => CpuStorage::F16(backward(
                contiguous_slice(g, gl, op)?,
                contiguous_slice(u, ul, op)?,
                contiguous_slice(d, dl, op)?,
            )),
            _ => bail!(
                "{op}: unsupported dtypes gate {:?}, up {:?}, grad {:?} (expected all f32, bf16 or f16)",
                gs.dtype(),
                us.dtype(),
                ds.dtype()
            ),
        };
        Ok((out, stacked_shape(gl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = "swiglu backward";
        if gl.dims() != ul.dims() || gl.dims() != dl.dims() {
            bail!(
                "{op}: gate {:?}, up {:?} and grad {:?} differ in shape",
                gl.dims(),
                ul.dims(),
                dl.dims()
            );
        }
        if gs.dtype() != us.dtype() || gs.dtype() != ds.dtype() {
            bail!(
                "{op}: unsupported dtypes gate {:?}, up {:?}, grad {:?} (expected all f32, bf16 or f16)",
                gs.dtype(),
                us.dtype(),
                ds.dtype()
            );
        }
        fn run<T: CudaFloat>(
            gs: &CudaStorage,
            gl: &Layout,
            us: &CudaStorage,
            ul: &Layout,
            ds: &CudaStorage,
            dl: &Layout,
        ) -> Result<CudaStorage> {
            use crate::cuda::{PushKernelArg, WrapErr};
            let op = "swiglu backward";
            let gate = cuda::view::<T>(gs, gl, op)?;
            let up = cuda::view::<T>(us, ul, op)?;
            let dy = cuda::view::<T>(ds, dl, op)?;
            let n = gate.len();
            let dev = gs.device();
            // dgate at [0, n), dup at [n, 2n) (the kernel writes both).
            let mut out = unsafe { dev.alloc::<T>(2 * n) }?;
            if n > 0 {
                let k = cuda::kernel(dev, cuda::SWIGLU, &format!("swiglu_bwd_{}", T::SUFFIX))?;
                let mut b = k.builder();
                b.arg(&gate);
                b.arg(&up);
                b.arg(&dy);
                b.arg(&mut out);
                b.arg(&n);
                unsafe { b.launch(cuda::elementwise_config(n)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let out = match gs.dtype() {
            DType::F32 => run::<f32>(gs, gl, us, ul, ds, dl)?,
            DType::BF16 => run::<half::bf16>(gs, gl, us, ul, ds, dl)?,
            DType::F16 => run::<half::f16>(gs, gl, us, ul, ds, dl)?,
            other => bail!(
                "{op}: unsupported dtypes gate {other:?}, up {other:?}, grad {other:?} (expected all f32, bf16 or f16)"
            ),
        };
        Ok((out, stacked_shape(gl)))
    }
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

/// Returns dgate followed by dup in one vector of 2n: with s = sigmoid(g),
/// d silu / dg = s + g s (1 - s) = s (1 + g (1 - s)).
fn backward<T: KernelFloat>(gate: &[T], up: &[T], dy: &[T]) -> Vec<T> {
    let mut both = vec![T::narrow(0.0); 2 * gate.len()];
    let (dgate, dup) = both.split_at_mut(gate.len());
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
    both
}
