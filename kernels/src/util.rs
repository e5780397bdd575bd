//! Small helpers shared by the CPU kernels: contiguous slice access through a `Layout`.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};

/// The contiguous `&[T]` a layout views inside a storage slice, or an error naming `op`.
pub(crate) fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous (call .contiguous() first), got strides {:?}", layout.stride()),
    }
}

/// Widen any float storage viewed by `layout` to an owned f32 vector (kernels compute in f32).
pub(crate) fn to_f32_vec(storage: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<f32>> {
    Ok(match storage {
        CpuStorage::F32(d) => contiguous_slice(d, layout, op)?.to_vec(),
        CpuStorage::BF16(d) => contiguous_slice(d, layout, op)?.iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(d) => contiguous_slice(d, layout, op)?.iter().map(|x| x.to_f32()).collect(),
        other => bail!("{op}: unsupported dtype {:?} (expected f32, bf16 or f16)", other.dtype()),
    })
}

/// Store f32 results in the storage dtype of the input (`like`).
pub(crate) fn from_f32_vec(values: Vec<f32>, like: candle_core::DType, op: &str) -> Result<CpuStorage> {
    Ok(match like {
        candle_core::DType::F32 => CpuStorage::F32(values),
        candle_core::DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        candle_core::DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
        other => bail!("{op}: unsupported dtype {other:?} (expected f32, bf16 or f16)"),
    })
}

/// Element types the CPU kernels read and write in place (f32, bf16, f16). Arithmetic is always
/// f32: `widen` on load and `narrow` on store let one generic loop serve every dtype without first
/// copying a whole tensor to f32 (the kernels are memory-bound, so the extra pass would cost).
pub(crate) trait KernelFloat: candle_core::WithDType + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl KernelFloat for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

impl KernelFloat for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl KernelFloat for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
