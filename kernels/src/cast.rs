//! Cast with scaling: `y = dtype(f32(x) * scale)` between f32, bf16 and f16 in one pass, e.g. to
//! unscale loss-scaled bf16 gradients into f32 (or to scale f32 values down into bf16) without a
//! separate multiply pass and intermediate tensor. CPU and (feature `cuda`) CUDA, rounding alike:
//! one f32 multiply, then round to nearest even, so both equal `cast_scaled_reference` bitwise.

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const TASK_ELEMS: usize = 64 * 1024;

/// `x` (f32, bf16 or f16) multiplied by `scale` in f32 and stored as `dtype` (f32, bf16 or f16).
/// Differentiable: the gradient is `cast_scaled(grad, x.dtype(), scale)`.
pub fn cast_scaled(x: &Tensor, dtype: DType, scale: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(CastScaled { dtype, scale })
}

/// The spec from candle primitives: `x.to_dtype(F32) * scale`, then `to_dtype(dtype)`.
pub fn cast_scaled_reference(x: &Tensor, dtype: DType, scale: f32) -> Result<Tensor> {
    x.to_dtype(DType::F32)?.affine(scale as f64, 0.0)?.to_dtype(dtype)
}

struct CastScaled {
    dtype: DType,
    scale: f32,
}

fn check_dtype(dtype: DType, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => bail!("cast_scaled: unsupported {what} dtype {other:?} (expected f32, bf16 or f16)"),
    }
}

fn cast_slice<S: KernelFloat, D: KernelFloat>(x: &[S], scale: f32) -> Vec<D> {
    let mut y = vec![D::narrow(0.0); x.len()];
    y.par_chunks_mut(TASK_ELEMS)
        .zip(x.par_chunks(TASK_ELEMS))
        .for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = D::narrow(v.widen() * scale);
            }
        });
    y
}

fn cast_cpu<S: KernelFloat>(x: &[S], dtype: DType, scale: f32) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(cast_slice(x, scale)),
        DType::BF16 => CpuStorage::BF16(cast_slice(x, scale)),
        DType::F16 => CpuStorage::F16(cast_slice(x, scale)),
        other => bail!("cast_scaled: unsupported output dtype {other:?} (expected f32, bf16 or f16)"),
    })
}

impl CustomOp1 for CastScaled {
    fn name(&self) -> &'static str {
        "cast-scaled"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "cast_scaled";
        check_dtype(self.dtype, "output")?;
        let out = match s {
            CpuStorage::F32(x) => cast_cpu(contiguous_slice(x, l, op)?, self.dtype, self.scale)?,
            CpuStorage::BF16(x) => cast_cpu(contiguous_slice(x, l, op)?, self.dtype, self.scale)?,
            CpuStorage::F16(x) => cast_cpu(contiguous_slice(x, l, op)?, self.dtype, self.scale)?,
            other => bail!("cast_scaled: unsupported input dtype {:?} (expected f32, bf16 or f16)", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use crate::cuda::{PushKernelArg, WrapErr};
        fn run<S: CudaFloat, D: CudaFloat>(s: &CudaStorage, l: &Layout, scale: f32) -> Result<CudaStorage> {
            let x = cuda::view::<S>(s, l, "cast_scaled")?;
            let n = x.len();
            let dev = s.device();
            let mut y = unsafe { dev.alloc::<D>(n) }?;
            if n > 0 {
                let k = cuda::kernel(dev, cuda::CAST, &format!("cast_scaled_{}_{}", S::SUFFIX, D::SUFFIX))?;
                let mut b = k.builder();
                b.arg(&x);
                b.arg(&mut y);
                b.arg(&n);
                b.arg(&scale);
                unsafe { b.launch(cuda::elementwise_config(n)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        fn to<S: CudaFloat>(s: &CudaStorage, l: &Layout, dtype: DType, scale: f32) -> Result<CudaStorage> {
            match dtype {
                DType::F32 => run::<S, f32>(s, l, scale),
                DType::BF16 => run::<S, half::bf16>(s, l, scale),
                DType::F16 => run::<S, half::f16>(s, l, scale),
                other => bail!("cast_scaled: unsupported output dtype {other:?} (expected f32, bf16 or f16)"),
            }
        }
        check_dtype(self.dtype, "output")?;
        let out = match s.dtype() {
            DType::F32 => to::<f32>(s, l, self.dtype, self.scale)?,
            DType::BF16 => to::<half::bf16>(s, l, self.dtype, self.scale)?,
            DType::F16 => to::<half::f16>(s, l, self.dtype, self.scale)?,
            other => bail!("cast_scaled: unsupported input dtype {other:?} (expected f32, bf16 or f16)"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cast_scaled(grad_res, x.dtype(), self.scale)?))
    }
}
