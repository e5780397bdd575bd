//! `linear`: y = x W^T + b (or x W + b for GPT-2's Conv1D weights) as one op with one backward.
//!
//! Two reasons to have it rather than `matmul` + `broadcast_add`:
//! - Matmul precision. With [`MatmulPrecision::Bf16`] and a CPU with AMX, the three products
//!   (forward, input gradient, weight gradient) run in [`crate::gemm::matmul_bf16`]: f32 tensors
//!   in and out, inputs rounded to bf16, f32 sums. With f32 precision on a CPU with AVX-512 they
//!   run in [`crate::gemm_f32`] (exact f32, 512-bit FMAs: candle's gemm uses 256-bit ones on
//!   stable Rust). Elsewhere (no AVX-512, bf16/f16 tensors, CUDA) it is candle's `matmul` +
//!   `broadcast_add`.
//! - Fewer autograd nodes: candle's backward for matmul + broadcast_add + reshapes allocates and
//!   accumulates a zero-filled gradient per edge; one custom op hands back dx, dW and db directly.
//!
//! The precision is a process-wide switch (like PyTorch's `torch.set_float32_matmul_precision`),
//! set once by the trainer from its config before building the model.

use crate::gemm::{amx_available, matmul_bf16, matmul_exact_raw, product_bf16, product_f32, MatRef};
use crate::util::contiguous_slice;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, D};
use std::sync::atomic::{AtomicU8, Ordering};

/// How f32 matrix products are computed on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// Exact f32 products (candle's gemm).
    F32,
    /// Inputs rounded to bf16, f32 accumulation, on AMX when the CPU has it (else F32).
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Set the process-wide matmul precision used by [`linear`] (and attention products).
pub fn set_matmul_precision(precision: MatmulPrecision) {
    PRECISION.store(precision as u8, Ordering::Relaxed);
}

/// The precision last set (F32 unless changed).
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(Ordering::Relaxed) == MatmulPrecision::Bf16 as u8 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// Whether `linear` runs its own op (AMX bf16 products, or exact f32 with the AVX-512 kernel)
/// rather than candle's matmul for tensors of `dtype` on `device`.
fn uses_own_products(device: &Device, dtype: DType) -> bool {
    uses_bf16_matmul(device, dtype) || (device.is_cpu() && dtype == DType::F32 && crate::gemm_f32::available())
}

/// Whether f32 products on `device` go through the AMX bf16 path right now.
pub fn uses_bf16_matmul(device: &Device, dtype: DType) -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && device.is_cpu() && dtype == DType::F32 && amx_available()
}

/// How the weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// (out, in): torch.nn.Linear, Llama. y = x W^T.
    OutIn,
    /// (in, out): GPT-2's Conv1D. y = x W.
    InOut,
}

/// The reference: candle primitives, any dtype and device.
pub fn linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let n_in = x.dim(D::Minus1)?;
    let rows = x.elem_count() / n_in.max(1);
    let w = match layout {
        WeightLayout::OutIn => w.t()?,
        WeightLayout::InOut => w.clone(),
    };
    let y = x.reshape((rows, n_in))?.matmul(&w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = x.dims().to_vec();
    let last = out_dims.len() - 1; // x has at least one dim: x.dim(D::Minus1) succeeded
    out_dims[last] = y.dim(1)?;
    y.reshape(out_dims)
}

/// y = x W^T + b (`OutIn`) or x W + b (`InOut`) over the last dimension of `x`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    if !uses_own_products(x.device(), x.dtype()) || w.dtype() != DType::F32 {
        return linear_reference(x, w, b, layout);
    }
    let (n_in, n_out) = weight_dims(w, layout)?;
    if x.dim(D::Minus1)? != n_in {
        bail!("linear: input has {} features but the weight {:?} ({layout:?}) expects {n_in}", x.dim(D::Minus1)?, w.dims());
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = LinearOp { layout, n_in, n_out, bf16: uses_bf16_matmul(x.device(), x.dtype()) };
    match b {
        Some(b) => {
            if b.dims() != [n_out] {
                bail!("linear: bias has shape {:?}, expected [{n_out}]", b.dims());
            }
            x.apply_op3(&w, &b.contiguous()?, op)
        }
        None => x.apply_op2(&w, op),
    }
}

fn weight_dims(w: &Tensor, layout: WeightLayout) -> Result<(usize, usize)> {
    let (r, c) = w.dims2()?;
    Ok(match layout {
        WeightLayout::OutIn => (c, r),
        WeightLayout::InOut => (r, c),
    })
}

#[derive(Clone, Copy)]
struct LinearOp {
    layout: WeightLayout,
    n_in: usize,
    n_out: usize,
    /// AMX bf16 products; otherwise exact f32 (AVX-512 kernel).
    bf16: bool,
}

impl LinearOp {
    fn product(&self, a: MatRef, b: MatRef) -> Vec<f32> {
        if self.bf16 {
            product_bf16(a, b)
        } else {
            product_f32(a, b)
        }
    }

    /// The weight as a (n_in x n_out) matrix B with y = x B.
    fn weight_as_b<'a>(&self, w: &'a [f32]) -> MatRef<'a> {
        match self.layout {
            WeightLayout::OutIn => MatRef::new(w, self.n_out, self.n_in).t(),
            WeightLayout::InOut => MatRef::new(w, self.n_in, self.n_out),
        }
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let rows = x.len() / self.n_in;
        let x = MatRef::new(x, rows, self.n_in);
        let Some(bias) = bias else { return self.product(x, self.weight_as_b(w)) };
        let mut y = vec![0f32; rows * self.n_out];
        y.chunks_mut(self.n_out).for_each(|row| row.copy_from_slice(bias));
        if self.bf16 {
            matmul_bf16(x, self.weight_as_b(w), &mut y, self.n_out, true);
        } else {
            // SAFETY: y holds rows x n_out values at stride n_out.
            unsafe { matmul_exact_raw(x, self.weight_as_b(w), y.as_mut_ptr(), self.n_out, true, true) };
        }
        y
    }

    /// x's shape with the last dim (n_in, checked by `linear`) replaced by n_out.
    fn out_shape(&self, x: &Layout) -> Shape {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.n_out;
        }
        Shape::from(dims)
    }

    /// dx, dW (in the weight's own layout) and db for upstream gradient `g` (rows x n_out).
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, with_bias: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?.to_dtype(DType::F32)?;
        let (n_in, n_out) = (self.n_in, self.n_out);
        let rows = x.elem_count() / n_in;
        let (gs, gl) = grad.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(g)), Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) = (&*gs, &*xs, &*ws)
        else {
            bail!("linear backward: expected f32 CPU tensors");
        };
        let op = "linear backward";
        let (g, xv, wv) = (contiguous_slice(g, gl, op)?, contiguous_slice(xv, xl, op)?, contiguous_slice(wv, wl, op)?);
        let gm = MatRef::new(g, rows, n_out);
        let xm = MatRef::new(xv, rows, n_in);
        // dx = g B^T.
        let dx = self.product(gm, self.weight_as_b(wv).t());
        // dB = x^T g (n_in x n_out); stored as the weight is: OutIn wants dB^T = g^T x.
        let dw = match self.layout {
            WeightLayout::InOut => self.product(xm.t(), gm),
            WeightLayout::OutIn => self.product(gm.t(), xm),
        };
        let db = with_bias.then(|| column_sums(g, n_out));
        drop((gs, xs, ws));
        let dev = Device::Cpu;
        let dx = Tensor::from_vec(dx, x.shape(), &dev)?;
        let dw = Tensor::from_vec(dw, w.shape(), &dev)?;
        let db = db.map(|db| Tensor::from_vec(db, n_out, &dev)).transpose()?;
        Ok((dx, dw, db))
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(d) => contiguous_slice(d, l, what),
        other => bail!("{what}: expected f32, got {:?}", other.dtype()),
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(f32_slice(xs, xl, "linear x")?, f32_slice(ws, wl, "linear weight")?, None);
        Ok((CpuStorage::F32(y), self.out_shape(xl)))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let bias = f32_slice(bs, bl, "linear bias")?;
        let y = self.forward(f32_slice(xs, xl, "linear x")?, f32_slice(ws, wl, "linear weight")?, Some(bias));
        Ok((CpuStorage::F32(y), self.out_shape(xl)))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// dx, dW (in the weight's layout) and db (when `with_bias`) of `linear(x, w, b, layout)` for
/// upstream `dy`, without autograd: the op's own backward where `linear` uses the op (AMX bf16 or
/// AVX-512 f32 products), candle matmuls otherwise (the same products autograd would run).
pub fn linear_backward(x: &Tensor, w: &Tensor, with_bias: bool, dy: &Tensor, layout: WeightLayout) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (n_in, n_out) = weight_dims(w, layout)?;
    if uses_own_products(x.device(), x.dtype()) && w.dtype() == DType::F32 {
        let op = LinearOp { layout, n_in, n_out, bf16: uses_bf16_matmul(x.device(), x.dtype()) };
        return op.backward(&x.contiguous()?, &w.contiguous()?, dy, with_bias);
    }
    let rows = x.elem_count() / n_in.max(1);
    let (x2, g2) = (x.reshape((rows, n_in))?, dy.reshape((rows, n_out))?);
    let (dx, dw) = match layout {
        WeightLayout::OutIn => (g2.matmul(w)?, g2.t()?.matmul(&x2)?),
        WeightLayout::InOut => (g2.matmul(&w.t()?)?, x2.t()?.matmul(&g2)?),
    };
    let db = match (with_bias, g2.dtype(), g2.device()) {
        (false, ..) => None,
        // candle's sum over dim 0 walks the tensor column by column (slow for wide rows).
        (true, DType::F32, Device::Cpu) => {
            let g2 = g2.contiguous()?;
            let (gs, gl) = g2.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(g)) = &*gs else { bail!("linear backward: expected f32 CPU storage") };
            let sums = column_sums(contiguous_slice(g, gl, "linear backward")?, n_out);
            Some(Tensor::from_vec(sums, n_out, &Device::Cpu)?)
        }
        (true, ..) => Some(g2.sum(0)?),
    };
    Ok((dx.reshape(x.shape())?, dw, db))
}

/// Sum of the rows of a row-major (rows x n) matrix, row by row (vectorizes across columns).
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let mut sums = vec![0f32; n];
    for row in g.chunks(n) {
        sums.iter_mut().zip(row).for_each(|(d, v)| *d += v);
    }
    sums
}
