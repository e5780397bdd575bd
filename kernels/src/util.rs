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

/// Independent partial sums per reduction: a single f32 accumulator is a serial dependency chain
/// (strict IEEE order forbids LLVM from vectorizing it), which made the reductions the bottleneck.
const LANES: usize = 8;

/// Sum of `f(a[i], b[i])` with `LANES` independent accumulators (vectorizable).
#[inline(always)]
pub(crate) fn sum_lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// exp(x) without libm, branch-free so that LLVM vectorizes the loops (libm's tanhf made the op
/// about 3x slower). Cephes `expf`: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r,
/// and 2^n built in the exponent bits. Relative error < 1e-7 on [-87, 88]; clamped outside, where
/// the callers only need 0 or a huge value.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Adding 1.5 * 2^23 rounds x log2(e) to an integer n, which then sits in the low mantissa bits.
    let shifted = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let n_bits = shifted.to_bits().wrapping_sub(0x4B40_0000);
    // ln2 split in two so that n * ln2 is exact enough (Cody-Waite).
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}
