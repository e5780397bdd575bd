//! GELU with the tanh approximation used by GPT-2,
//! `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`, with its gradient.
//!
//! `gelu` is a `CustomOp1` whose CPU forward and backward are one elementwise pass each, parallel
//! over fixed-size chunks; the reference composes seven candle ops, each allocating a full tensor and
//! recording a graph node. The kernels evaluate `0.5 (1 + tanh u)` as `sigmoid(2u)` with a
//! vectorizable exp, and the backward recomputes it from `x` (llm.c's `gelu_backward`) so that
//! nothing but `x` has to be kept. `gelu_reference` is the spec, built from differentiable candle ops.
//!
//! With the `cuda` feature both passes also run on CUDA tensors (`src/cuda/gelu.cu`, same formulas):
//! the backward is its own `CustomOp2` (`GeluBackward`, applied without a graph node), so `bwd` is
//! the same code on every device.

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use crate::util::exp_f32;
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// sqrt(2 / pi).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEFF: f32 = 0.044_715;
/// Elements per rayon task: a few ns each, so 16K elements amortize scheduling well.
const TASK_ELEMS: usize = 16 * 1024;

/// GELU (tanh approximation) of `x`, f32, bf16 or f16 (arithmetic in f32). Differentiable; CPU, and
/// CUDA with the `cuda` feature.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    // The kernel walks the buffer linearly, so strided views are copied first (differentiably).
    x.contiguous()?.apply_op1(Gelu)
}

/// The spec: GELU from candle primitives in f32 (f64 for f64 inputs, for finite-difference checks),
/// cast back to `x`'s dtype.
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    let compute = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xf = x.to_dtype(compute)?;
    let cube = xf.sqr()?.mul(&xf)?;
    // Constants in f64 so that the f64 reference is exact to f64 precision.
    let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (xf.clone() + cube.affine(0.044_715, 0.0)?)?.affine(sqrt_2_over_pi, 0.0)?;
    let y = xf.mul(&inner.tanh()?.affine(0.5, 0.5)?)?;
    y.to_dtype(x.dtype())
}

pub(crate) struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "gelu";
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(forward(contiguous_slice(x, l, op)?)),
            CpuStorage::BF16(x) => CpuStorage::BF16(forward(contiguous_slice(x, l, op)?)),
            CpuStorage::F16(x) => CpuStorage::F16(forward(contiguous_slice(x, l, op)?)),
            other => bail!(
                "gelu: unsupported dtype {:?} (expected f32, bf16 or f16)",
                other.dtype()
            ),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaFloat>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let x = cuda::view::<T>(s, l, "gelu")?;
            let name = format!("gelu_fwd_{}", T::SUFFIX);
            cuda::launch_elementwise(s.device(), cuda::GELU, &name, &[&x], x.len())
        }
        let out = match s.dtype() {
            DType::F32 => run::<f32>(s, l)?,
            DType::BF16 => run::<half::bf16>(s, l)?,
            DType::F16 => run::<half::f16>(s, l)?,
            other => bail!("gelu: unsupported dtype {other:?} (expected f32, bf16 or f16)"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // `x` is the op's (contiguous) input; the backward op runs on whatever device it is on.
        let grad = grad_res.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &GeluBackward)?))
    }
}

/// `dx = dy * gelu'(x)`, elementwise: the backward pass as an op of its own, with a CPU and a CUDA
/// forward (no graph node: `bwd` output is detached anyway).
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "gelu backward";
        if xl.shape() != gl.shape() {
            bail!("{op}: x {:?} and grad {:?} differ in shape", xl.shape(), gl.shape());
        }
        let dx = match (xs, gs) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(contiguous_slice(x, xl, op)?, contiguous_slice(g, gl, op)?))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => {
                CpuStorage::BF16(backward(contiguous_slice(x, xl, op)?, contiguous_slice(g, gl, op)?))
            }
            (CpuStorage::F16(x), CpuStorage::F16(g)) => {
                CpuStorage::F16(backward(contiguous_slice(x, xl, op)?, contiguous_slice(g, gl, op)?))
            }
            _ => bail!(
                "{op}: unsupported dtypes x {:?}, grad {:?} (expected both f32, bf16 or f16)",
                xs.dtype(),
                gs.dtype()
            ),
        };
        Ok((dx, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = "gelu backward";
        if xl.shape() != gl.shape() {
            bail!("{op}: x {:?} and grad {:?} differ in shape", xl.shape(), gl.shape());
        }
        if xs.dtype() != gs.dtype() {
            bail!("{op}: unsupported dtypes x {:?}, grad {:?} (expected both f32, bf16 or f16)", xs.dtype(), gs.dtype());
        }
        fn run<T: CudaFloat>(xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<CudaStorage> {
            let op = "gelu backward";
            let (x, dy) = (cuda::view::<T>(xs, xl, op)?, cuda::view::<T>(gs, gl, op)?);
            let name = format!("gelu_bwd_{}", T::SUFFIX);
            cuda::launch_elementwise(xs.device(), cuda::GELU, &name, &[&x, &dy], x.len())
        }
        let dx = match xs.dtype() {
            DType::F32 => run::<f32>(xs, xl, gs, gl)?,
            DType::BF16 => run::<half::bf16>(xs, xl, gs, gl)?,
            DType::F16 => run::<half::f16>(xs, xl, gs, gl)?,
            other => bail!("{op}: unsupported dtypes x {other:?}, grad {other:?} (expected both f32, bf16 or f16)"),
        };
        Ok((dx, xl.shape().clone()))
    }
}

/// 0.5 (1 + tanh u) = sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3). The sigmoid form needs one
/// exp and, unlike 1 + tanh(u) near -1, does not cancel for negative x.
#[inline(always)]
fn half_one_plus_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + COEFF * x * x * x);
    1.0 / (1.0 + exp_f32(-2.0 * u))
}

#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    x * half_one_plus_tanh(x)
}

/// d gelu / dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2); with
/// s = 0.5 (1 + tanh u), 0.5 (1 - tanh^2 u) = 2 s (1 - s).
#[inline(always)]
fn gelu_grad_f32(x: f32) -> f32 {
    let s = half_one_plus_tanh(x);
    s + 2.0 * x * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * COEFF * x * x)
}

fn forward<T: KernelFloat>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::narrow(0.0); x.len()];
    y.par_chunks_mut(TASK_ELEMS)
        .zip(x.par_chunks(TASK_ELEMS))
        .for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = T::narrow(gelu_f32(v.widen()));
            }
        });
    y
}

fn backward<T: KernelFloat>(x: &[T], dy: &[T]) -> Vec<T> {
    let mut dx = vec![T::narrow(0.0); x.len()];
    dx.par_chunks_mut(TASK_ELEMS)
        .zip(x.par_chunks(TASK_ELEMS))
        .zip(dy.par_chunks(TASK_ELEMS))
        .for_each(|((dx, x), dy)| {
            for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                *o = T::narrow(g.widen() * gelu_grad_f32(v.widen()));
            }
        });
    dx
}
