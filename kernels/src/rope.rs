//! Rotary position embeddings (RoPE) in the "rotate_half" (non-interleaved) layout of Hugging
//! Face's `apply_rotary_pos_emb` (Llama): for x of shape (B, H, T, D) with halves
//! x1 = x[..., :D/2] and x2 = x[..., D/2:], and tables cos, sin of shape (T, D/2),
//! `y[..., :D/2] = x1 cos - x2 sin` and `y[..., D/2:] = x2 cos + x1 sin`. This is transformers'
//! `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)` and its cos/sin (T, D)
//! being the (T, D/2) tables repeated twice along the last dimension (`cat(freqs, freqs)`).
//!
//! `rope` is a `CustomOp3` over (x, cos, sin) whose CPU forward is one pass over rows, parallel over
//! chunks of rows. Its backward is the inverse rotation of the upstream gradient (the same kernel
//! with sin negated); cos and sin are treated as constants and get no gradient, even when they are
//! tracked tensors. `rope_reference` is the spec, composed from differentiable candle ops (it is
//! differentiable in cos and sin too). `rope_tables` builds the tables from theta.
//!
//! Precision: transformers casts cos/sin to x's dtype and multiplies and adds in that dtype; here
//! the tables must share x's dtype, but the arithmetic is f32 with one rounding of the output.
//!
//! With the `cuda` feature the op (forward and, with `inverse`, backward) also runs on CUDA tensors
//! (`src/cuda/rope.cu`, one thread per rotated pair, equal to the CPU op bitwise); `bwd` applies the
//! same op without a graph node, so it is device-generic. `rope_tables` builds its tables on the
//! host and moves them to any device.

#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaFloat};
use crate::util::{contiguous_slice, KernelFloat};
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per rayon task (rows are short: D is a head dimension). A fixed size keeps the split,
/// and with it nothing numeric (there is no reduction), independent of the machine.
const TASK_ELEMS: usize = 16 * 1024;

/// cos and sin tables of shape (seq_len, head_dim / 2) in `dtype` on `device`, for positions
/// 0..seq_len: angle[t][i] = t * inv_freq[i] with inv_freq[i] = 1 / theta^(2i / head_dim)
/// (Llama: theta = 10000 or 500000; Llama 3's `rope_scaling` is not applied). The angles and their
/// cos/sin are computed in f64 and rounded once to `dtype`; transformers computes them in f32, so
/// its angle at position t differs by about t * 6e-8 rad. For positions starting at `offset`, build
/// tables for `offset + T` and pass `cos.narrow(0, offset, T)` (likewise sin).
pub fn rope_tables(
    seq_len: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if head_dim == 0 || head_dim % 2 == 1 {
        bail!("rope_tables: head_dim must be even and positive, got {head_dim}");
    }
    if !(theta.is_finite() && theta > 0.0) {
        bail!("rope_tables: theta must be a positive finite number, got {theta}");
    }
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
        bail!("rope_tables: dtype must be f32, bf16, f16 or f64, got {dtype:?}");
    }
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for t in 0..seq_len {
        for &f in &inv_freq {
            let angle = t as f64 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    // Rounded on the host, then moved: the tables are the same bits on every device (a device's
    // f64 -> bf16 cast need not round the way the CPU's does).
    let cos = Tensor::from_vec(cos, (seq_len, half), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let sin = Tensor::from_vec(sin, (seq_len, half), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok((cos, sin))
}

/// RoPE of `x` (B, H, T, D), D even, with tables `cos` and `sin` of shape (T', D/2), T' >= T, of
/// x's dtype (f32, bf16 or f16; arithmetic in f32). Only the first T rows of the tables are used.
/// Differentiable in `x`; no gradient flows to `cos` or `sin`. CPU, and CUDA with the `cuda` feature.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let t = check_args(x, cos, sin)?;
    // The kernel indexes rows directly, so strided views are copied first (differentiably).
    let x = x.contiguous()?;
    let cos = cos.narrow(0, 0, t)?.contiguous()?;
    let sin = sin.narrow(0, 0, t)?.contiguous()?;
    x.apply_op3(&cos, &sin, Rope { inverse: false })
}

/// The spec: RoPE from candle primitives (narrow, broadcast mul, sub/add, cat), computed in f32 (f64
/// for f64 inputs, so that it can be checked against finite differences) and cast back to x's dtype.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let t = check_args(x, cos, sin)?;
    let compute = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let half = x.dim(D::Minus1)? / 2;
    let xf = x.to_dtype(compute)?;
    let x1 = xf.narrow(D::Minus1, 0, half)?;
    let x2 = xf.narrow(D::Minus1, half, half)?;
    // (T, D/2) -> (1, 1, T, D/2), broadcast over batch and heads.
    let table = |m: &Tensor| {
        m.narrow(0, 0, t)?
            .to_dtype(compute)?
            .reshape((1, 1, t, half))
    };
    let (c, s) = (table(cos)?, table(sin)?);
    let y1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let y2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)?.to_dtype(x.dtype())
}

/// Checks shapes and dtypes; returns T.
fn check_args(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<usize> {
    let &[_, _, t, d] = x.dims() else {
        bail!("rope: x must have shape (B, H, T, D), got {:?}", x.dims())
    };
    if d == 0 || d % 2 == 1 {
        bail!(
            "rope: the head dimension D of x {:?} must be even and positive, got {d}",
            x.dims()
        );
    }
    let half = d / 2;
    for (name, m) in [("cos", cos), ("sin", sin)] {
        let &[rows, width] = m.dims() else {
            bail!(
                "rope: {name} must have shape (T, D/2) = ({t}, {half}) for x {:?}, got {:?}",
                x.dims(),
                m.dims()
            )
        };
        if width != half {
            bail!(
                "rope: {name} has width {width} but x {:?} needs D/2 = {half}",
                x.dims()
            );
        }
        if rows < t {
            bail!(
                "rope: {name} table has {rows} positions, shorter than T = {t} of x {:?}",
                x.dims()
            );
        }
        if m.dtype() != x.dtype() {
            bail!(
                "rope: x and {name} must share a dtype, got {:?} and {:?}",
                x.dtype(),
                m.dtype()
            );
        }
    }
    Ok(t)
}

/// The rotation by +angle (forward) or -angle (`inverse`, the backward: the rotation is orthogonal,
/// so its transpose is its inverse).
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = if self.inverse {
            "rope backward"
        } else {
            "rope"
        };
        let (t, d) = match xl.dims() {
            &[_, _, t, d] if d > 0 && d % 2 == 0 => (t, d),
            dims => bail!("{op}: x must have shape (B, H, T, D) with D even, got {dims:?}"),
        };
        if cl.dims() != [t, d / 2] || sl.dims() != [t, d / 2] {
            bail!(
                "{op}: cos {:?} and sin {:?} must have shape [{t}, {}] for x {:?}",
                cl.dims(),
                sl.dims(),
                d / 2,
                xl.dims()
            );
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let out = match (xs, cs, ss) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => CpuStorage::F32(rotate(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(c, cl, op)?,
                contiguous_slice(s, sl, op)?,
                t,
                d,
                sign,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s)) => CpuStorage::BF16(rotate(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(c, cl, op)?,
                contiguous_slice(s, sl, op)?,
                t,
                d,
                sign,
            )),
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(s)) => CpuStorage::F16(rotate(
                contiguous_slice(x, xl, op)?,
                contiguous_slice(c, cl, op)?,
                contiguous_slice(s, sl, op)?,
                t,
                d,
                sign,
            )),
            _ => bail!(
                "{op}: unsupported dtypes x {:?}, cos {:?}, sin {:?} (expected all f32, bf16 or f16)",
                xs.dtype(),
                cs.dtype(),
                ss.dtype()
            ),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = if self.inverse {
            "rope backward"
        } else {
            "rope"
        };
        let (t, d) = match xl.dims() {
            &[_, _, t, d] if d > 0 && d % 2 == 0 => (t, d),
            dims => bail!("{op}: x must have shape (B, H, T, D) with D even, got {dims:?}"),
        };
        if cl.dims() != [t, d / 2] || sl.dims() != [t, d / 2] {
            bail!(
                "{op}: cos {:?} and sin {:?} must have shape [{t}, {}] for x {:?}",
                cl.dims(),
                sl.dims(),
                d / 2,
                xl.dims()
            );
        }
        if xs.dtype() != cs.dtype() || xs.dtype() != ss.dtype() {
            bail!(
                "{op}: unsupported dtypes x {:?}, cos {:?}, sin {:?} (expected all f32, bf16 or f16)",
                xs.dtype(),
                cs.dtype(),
                ss.dtype()
            );
        }
        #[allow(clippy::too_many_arguments)]
        fn run<T: CudaFloat>(
            xs: &CudaStorage,
            xl: &Layout,
            cs: &CudaStorage,
            cl: &Layout,
            ss: &CudaStorage,
            sl: &Layout,
            (t, half): (usize, usize),
            inverse: bool,
        ) -> Result<CudaStorage> {
            use crate::cuda::{PushKernelArg, WrapErr};
            let op = if inverse { "rope backward" } else { "rope" };
            let x = cuda::view::<T>(xs, xl, op)?;
            let cos = cuda::view::<T>(cs, cl, op)?;
            let sin = cuda::view::<T>(ss, sl, op)?;
            let n = x.len();
            let pairs = n / 2;
            let dev = xs.device();
            let mut y = unsafe { dev.alloc::<T>(n) }?;
            // No pairs (B, H or T zero): nothing to launch, and t may be 0 (the kernel takes row % t).
            if pairs > 0 {
                let dir = if inverse { "bwd" } else { "fwd" };
                let k = cuda::kernel(dev, cuda::ROPE, &format!("rope_{dir}_{}", T::SUFFIX))?;
                let mut b = k.builder();
                b.arg(&x);
                b.arg(&cos);
                b.arg(&sin);
                b.arg(&mut y);
                b.arg(&pairs);
                b.arg(&half);
                b.arg(&t);
                unsafe { b.launch(cuda::elementwise_config(pairs)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let dims = (t, d / 2);
        let out = match xs.dtype() {
            DType::F32 => run::<f32>(xs, xl, cs, cl, ss, sl, dims, self.inverse)?,
            DType::BF16 => run::<half::bf16>(xs, xl, cs, cl, ss, sl, dims, self.inverse)?,
            DType::F16 => run::<half::f16>(xs, xl, cs, cl, ss, sl, dims, self.inverse)?,
            other => bail!(
                "{op}: unsupported dtypes x {other:?}, cos {other:?}, sin {other:?} (expected all f32, bf16 or f16)"
            ),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // dx = R(-angle) dy; the upstream gradient may be strided (e.g. after a transpose).
        // Gradients are detached by candle's backward loop, so nothing needs recording here.
        let dx = grad_res.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotates every row (B*H*T rows of length d, position = row % t) by `sign` * angle.
fn rotate<T: KernelFloat>(x: &[T], cos: &[T], sin: &[T], t: usize, d: usize, sign: f32) -> Vec<T> {
    let half = d / 2;
    let cos: Vec<f32> = cos.iter().map(|v| v.widen()).collect();
    let sin: Vec<f32> = sin.iter().map(|v| sign * v.widen()).collect();
    let mut y = vec![T::narrow(0.0); x.len()];
    let rows_per_task = (TASK_ELEMS / d).max(1);
    let chunk = rows_per_task * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .enumerate()
        .for_each(|(task, (y, x))| {
            for (r, (yr, xr)) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                let pos = (task * rows_per_task + r) % t;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (x1, x2) = xr.split_at(half);
                let (y1, y2) = yr.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i].widen(), x2[i].widen());
                    y1[i] = T::narrow(a * c[i] - b * s[i]);
                    y2[i] = T::narrow(b * c[i] + a * s[i]);
                }
            }
        });
    y
}
