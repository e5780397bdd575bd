//! `causal_self_attention`: GPT-2's multi-head causal attention straight from the fused qkv
//! projection (B, T, 3C) to the merged heads (B, T, C), as one op with one backward.
//!
//! Composed from candle ops, the same attention costs: three narrow + transpose + contiguous
//! copies to split heads, one more to merge them, two batched matmuls and the softmax, and in the
//! backward a zero-padded (B, T, 3C) tensor per `narrow` plus a zero-fill and an add per graph
//! edge. Here each (batch, head) pair is one task: its Q, K and V are read in place with strides
//! (row stride 3C), S = Q K^T / sqrt(D) is masked and softmaxed into P (kept for the backward),
//! and O = P V is written into its columns of the output. The backward, per pair:
//!   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)) / sqrt(D),  dQ = dS K,  dK = dS^T Q.
//! Products are exact f32 (the gemm crate, one thread per task) or, under
//! [`crate::MatmulPrecision::Bf16`] on AMX, bf16 inputs with f32 sums, like [`crate::linear`].
//! The softmax and its backward are always f32. Other dtypes and devices take the reference path.

use crate::gemm::{matmul_serial_raw, MatRef};
use crate::linear::uses_bf16_matmul;
use crate::util::contiguous_slice;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The spec: split heads, [`crate::causal_attention`] (itself checked against plain candle ops),
/// merge heads. Any dtype and device.
pub fn causal_self_attention_reference(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let d = c / n_head;
    let heads = |i: usize| -> Result<Tensor> {
        qkv.narrow(2, i * c, c)?.reshape((b, t, n_head, d))?.transpose(1, 2)?.contiguous() // (B, H, T, D)
    };
    let y = crate::causal_attention(&heads(0)?, &heads(1)?, &heads(2)?)?;
    y.transpose(1, 2)?.contiguous()?.reshape((b, t, c))
}

/// Causal multi-head self-attention of `qkv` (B, T, 3C: q, k, v each C = n_head x D wide) to
/// (B, T, C).
pub fn causal_self_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    check_width(qkv, n_head)?;
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 {
        return causal_self_attention_reference(qkv, n_head);
    }
    let op = SelfAttention { n_head, bf16: uses_bf16_matmul(qkv.device(), qkv.dtype()), saved_probs: Mutex::new(None) };
    qkv.contiguous()?.apply_op1(op)
}

fn check_width(qkv: &Tensor, n_head: usize) -> Result<()> {
    let (_, _, c3) = qkv.dims3()?;
    if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        bail!("causal_self_attention: last dim {c3} must be 3 x n_head ({n_head}) x head size");
    }
    Ok(())
}

/// The saved P, even if a thread panicked while holding the lock (the value is whole either way).
fn lock(saved: &Mutex<Option<Vec<f32>>>) -> std::sync::MutexGuard<'_, Option<Vec<f32>>> {
    saved.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct SelfAttention {
    n_head: usize,
    bf16: bool,
    /// P of the forward, (B, H, T, T), handed to the backward (recomputed if absent).
    saved_probs: Mutex<Option<Vec<f32>>>,
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    d: usize,
}

impl Dims {
    fn of(layout: &Layout, n_head: usize) -> Result<Self> {
        let (b, t, c3) = layout.shape().dims3()?;
        Ok(Dims { b, t, c: c3 / 3, h: n_head, d: c3 / 3 / n_head })
    }
    /// Q (part 0), K (1) or V (2) of pair `bh` as a T x D view of qkv.
    fn part<'a>(&self, qkv: &'a [f32], bh: usize, part: usize) -> MatRef<'a> {
        let (b, h) = (bh / self.h, bh % self.h);
        let start = b * self.t * 3 * self.c + part * self.c + h * self.d;
        MatRef { data: &qkv[start..], rows: self.t, cols: self.d, row_stride: 3 * self.c, col_stride: 1 }
    }
}

/// Pointer wrapper so tasks can write their disjoint columns of a shared output.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its own head's columns or probabilities).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// P over a (T, T) block of scores: row i is the causal softmax over keys 0..=i.
fn causal_softmax_rows(p: &mut [f32], t: usize, scale: f32) {
    for (i, row) in p.chunks_mut(t).enumerate() {
        crate::attention::causal_softmax_row(row, i, scale);
    }
}

impl SelfAttention {
    fn scale(dims: &Dims) -> f32 {
        1.0 / (dims.d as f32).sqrt()
    }

    /// P for pair `bh` into `p` (T x T).
    /// P for pair `bh`, written to the T x T values at `p` (which may be uninitialized: the
    /// product writes all of them before the softmax reads any).
    ///
    /// # Safety
    /// `p` must be valid for T x T writes that no other thread touches.
    unsafe fn probs(&self, dims: &Dims, qkv: &[f32], bh: usize, p: *mut f32) {
        let t = dims.t;
        matmul_serial_raw(dims.part(qkv, bh, 0), dims.part(qkv, bh, 1).t(), p, t, false, self.bf16);
        causal_softmax_rows(std::slice::from_raw_parts_mut(p, t * t), t, Self::scale(dims));
    }

    /// P of every pair (B, H, T, T), without zero-filling the buffer first.
    fn all_probs(&self, dims: &Dims, qkv: &[f32]) -> Vec<f32> {
        let n = dims.b * dims.h * dims.t * dims.t;
        let mut probs: Vec<f32> = Vec::with_capacity(n);
        let out = SharedOut(probs.as_mut_ptr());
        (0..dims.b * dims.h).into_par_iter().for_each(|bh| {
            let out = out;
            // SAFETY: pair bh writes only its own T x T block.
            unsafe { self.probs(dims, qkv, bh, out.0.add(bh * dims.t * dims.t)) }
        });
        // SAFETY: every block was written above.
        unsafe { probs.set_len(n) };
        probs
    }

    fn forward(&self, dims: Dims, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Dims { b, t, c, h, d } = dims;
        // y is written only through `out`, every element once (the heads partition its columns),
        // so it is not zero-filled first; its length is set after the writes.
        let mut y: Vec<f32> = Vec::with_capacity(b * t * c);
        let mut probs: Vec<f32> = Vec::with_capacity(b * h * t * t);
        let (out, p_out) = (SharedOut(y.as_mut_ptr()), SharedOut(probs.as_mut_ptr()));
        (0..b * h).into_par_iter().for_each(|bh| {
            let p_out = p_out;
            // SAFETY: pair bh writes only its own T x T block of probs, initializing it.
            let p = unsafe {
                let p = p_out.0.add(bh * t * t);
                self.probs(&dims, qkv, bh, p);
                std::slice::from_raw_parts(p, t * t)
            };
            let (bi, hi) = (bh / h, bh % h);
            let out = out;
            // SAFETY: pair (bi, hi) writes rows of batch bi, columns hi*D..(hi+1)*D only.
            unsafe {
                let dst = out.0.add(bi * t * c + hi * d);
                matmul_serial_raw(MatRef::new(p, t, t), dims.part(qkv, bh, 2), dst, c, false, self.bf16);
            }
        });
        // SAFETY: every (batch, head) task wrote its T x D block of y and its block of probs above.
        unsafe {
            y.set_len(b * t * c);
            probs.set_len(b * h * t * t);
        }
        (y, probs)
    }

    fn backward(&self, dims: Dims, qkv: &[f32], probs: &[f32], dy: &[f32]) -> Vec<f32> {
        let Dims { b, t, c, h, d } = dims;
        // Written only through `out`: dq, dk and dv of every head cover all 3C columns.
        let mut dqkv: Vec<f32> = Vec::with_capacity(b * t * 3 * c);
        let out = SharedOut(dqkv.as_mut_ptr());
        let scale = Self::scale(&dims);
        (0..b * h).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |dp, bh| {
                let (bi, hi) = (bh / h, bh % h);
                let p = &probs[bh * t * t..(bh + 1) * t * t];
                let d_o = MatRef { data: &dy[bi * t * c + hi * d..], rows: t, cols: d, row_stride: c, col_stride: 1 };
                let (q, k, v) = (dims.part(qkv, bh, 0), dims.part(qkv, bh, 1), dims.part(qkv, bh, 2));
                let out = out;
                // SAFETY: pair (bi, hi) writes its own columns of dq, dk and dv in batch bi.
                unsafe {
                    let base = out.0.add(bi * t * 3 * c + hi * d);
                    // dV = P^T dO
                    matmul_serial_raw(MatRef::new(p, t, t).t(), d_o, base.add(2 * c), 3 * c, false, self.bf16);
                    // dP = dO V^T
                    matmul_serial_raw(d_o, v.t(), dp.as_mut_ptr(), t, false, self.bf16);
                }
                // dS = P * (dP - rowsum(dP * P)) * scale, only on visible keys.
                for (i, (ds_row, p_row)) in dp.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                    let dot: f32 = ds_row[..=i].iter().zip(&p_row[..=i]).map(|(g, p)| g * p).sum();
                    for (g, &pv) in ds_row[..=i].iter_mut().zip(&p_row[..=i]) {
                        *g = pv * (*g - dot) * scale;
                    }
                    ds_row[i + 1..].fill(0.0);
                }
                let ds = MatRef::new(&dp[..], t, t);
                // SAFETY: as above.
                unsafe {
                    let base = out.0.add(bi * t * 3 * c + hi * d);
                    matmul_serial_raw(ds, k, base, 3 * c, false, self.bf16); // dQ = dS K
                    matmul_serial_raw(ds.t(), q, base.add(c), 3 * c, false, self.bf16); // dK = dS^T Q
                }
            },
        );
        // SAFETY: every (batch, head) task wrote its dq, dk and dv blocks above.
        unsafe { dqkv.set_len(b * t * 3 * c) };
        dqkv
    }
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "causal-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { bail!("causal_self_attention: expected f32") };
        let qkv = contiguous_slice(data, layout, "causal_self_attention")?;
        let dims = Dims::of(layout, self.n_head)?;
        if dims.b * dims.t * dims.c == 0 {
            return Ok((CpuStorage::F32(vec![]), Shape::from((dims.b, dims.t, dims.c))));
        }
        let (y, probs) = self.forward(dims, qkv);
        *lock(&self.saved_probs) = Some(probs);
        Ok((CpuStorage::F32(y), Shape::from((dims.b, dims.t, dims.c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dims = Dims::of(qkv.layout(), self.n_head)?;
        let (qs, ql) = qkv.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(q)), Storage::Cpu(CpuStorage::F32(g))) = (&*qs, &*gs) else {
            bail!("causal_self_attention backward: expected f32 CPU tensors");
        };
        if dims.b * dims.t * dims.c == 0 {
            return Ok(Some(qkv.zeros_like()?));
        }
        let op = "causal_self_attention backward";
        let (q, g) = (contiguous_slice(q, ql, op)?, contiguous_slice(g, gl, op)?);
        let saved = lock(&self.saved_probs).take();
        let probs = match saved {
            Some(p) => p,
            None => {
                self.all_probs(&dims, q)
            }
        };
        let dqkv = self.backward(dims, q, &probs, g);
        drop((qs, gs));
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), &Device::Cpu)?))
    }
}

/// What [`causal_self_attention_backward`] needs from the forward.
pub struct AttentionTape {
    qkv: Tensor,
    probs: Vec<f32>,
    op: SelfAttention,
}

/// Forward without autograd, keeping P for [`causal_self_attention_backward`] (f32 CPU tensors).
pub fn causal_self_attention_train(qkv: &Tensor, n_head: usize) -> Result<(Tensor, AttentionTape)> {
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 {
        bail!("causal_self_attention_train: f32 CPU tensors only (got {:?} on {:?})", qkv.dtype(), qkv.device().location());
    }
    check_width(qkv, n_head)?;
    let qkv = qkv.detach().contiguous()?;
    let op = SelfAttention { n_head, bf16: uses_bf16_matmul(qkv.device(), qkv.dtype()), saved_probs: Mutex::new(None) };
    let dims = Dims::of(qkv.layout(), n_head)?;
    let (y, probs) = {
        let (s, l) = qkv.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*s else { bail!("causal_self_attention_train: expected f32 CPU storage") };
        let data = contiguous_slice(data, l, "causal_self_attention_train")?;
        if dims.b * dims.t * dims.c == 0 { (vec![], vec![]) } else { op.forward(dims, data) }
    };
    let y = Tensor::from_vec(y, (dims.b, dims.t, dims.c), &Device::Cpu)?;
    Ok((y, AttentionTape { qkv, probs, op }))
}

/// d(qkv) for upstream `dy` (B, T, C), from the forward's tape.
pub fn causal_self_attention_backward(tape: AttentionTape, dy: &Tensor) -> Result<Tensor> {
    let AttentionTape { qkv, probs, op } = tape;
    *lock(&op.saved_probs) = Some(probs);
    op.bwd(&qkv, dy, dy)?.ok_or_else(|| candle_core::Error::Msg("attention backward returned no gradient".into()))
}
