//! One sharding unit's state on a rank: which slices of its flat buffer the rank holds (shard,
//! `opt_range`, `grad_range`), its fp32 master weights and AdamW moments, its gradient buffer,
//! and its compute-dtype parameters (held Vars at stages 0-2, a 2-byte shard to gather at
//! stage 3); plus initialization of a range and gradient accumulation into the buffers.

use std::ops::Range;

use candle_core::{bail, DType, Device, Result, Storage, Tensor, Var};
use models::Init;

use crate::comm::Pending;
use crate::grad::{GradBuf, GradDtype};
use crate::layout::FlatLayout;
use crate::rng::SplitMix64;
use crate::stage::{Buffer, ZeroStage};

/// One unit's state on this rank.
pub struct UnitState {
    pub layout: FlatLayout,
    /// Elements of the flat buffer this rank owns (its shard).
    pub shard: Range<usize>,
    /// Elements covered by `master`, `exp_avg`, `exp_avg_sq` (the shard at stage >= 1).
    pub opt_range: Range<usize>,
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// Elements covered by `grad` while gradients accumulate (the shard at stage >= 2). After the
    /// step's reduction, `grad` holds the reduced gradient over `opt_range`.
    pub grad_range: Range<usize>,
    pub grad: GradBuf,
    /// Compute-dtype parameters held between steps (stages 0-2).
    pub(super) params: Option<Vec<Var>>,
    /// Stage 3 with bf16/f16 compute: this rank's parameter shard in the compute dtype, which
    /// is what gets all-gathered (half the bytes of gathering the fp32 master).
    pub(super) param_shard: Option<HalfShard>,
    /// `StateStorage::Tensors`: the master weights, moments and gradient as tensors on the
    /// engine's device; `master`, `exp_avg`, `exp_avg_sq` and `grad` above are then empty.
    pub(super) tensors: Option<TensorState>,
}

/// A unit's optimizer state and gradient as flat 1-D tensors on the engine's device (the state of
/// a CUDA engine): `master`, `exp_avg`, `exp_avg_sq` f32 over `opt_range`, `grad` in the gradient
/// dtype over `grad_range`. Only at world size 1, where both ranges are the whole padded buffer.
pub struct TensorState {
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub grad: Tensor,
}

/// A stage-3 parameter shard in a 2-byte compute dtype.
pub(super) enum HalfShard {
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

/// A gather in flight, in the dtype it moves.
pub(super) enum Gathering {
    F32(Pending<f32>),
    Bf16(Pending<half::bf16>),
    F16(Pending<half::f16>),
    /// Tensor state at world size 1: built from the master weights, nothing to wait for.
    Ready(Vec<Var>),
}

/// Add a gradient tensor (any float dtype, any device) into part of a gradient buffer at
/// `offset`: a persistent `GradBuf`, or a temporary f32 buffer rounded like one (`dtype`).
pub(super) fn accumulate(dst: Target<'_>, offset: usize, numel: usize, grad: &Tensor, what: &str) -> Result<()> {
    let grad = grad.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = grad.storage_and_layout();
    let values = match &*storage {
        Storage::Cpu(candle_core::CpuStorage::F32(v)) => match layout.contiguous_offsets() {
            Some((a, b)) => &v[a..b],
            None => bail!("gradient of {what}: not contiguous"),
        },
        _ => bail!("gradient of {what}: expected f32 on the CPU"),
    };
    if values.len() != numel {
        bail!("gradient of {what}: {} elements, expected {numel}", values.len());
    }
    match dst {
        Target::Buf(buf) => buf.add_f32(offset, values),
        Target::Temp(buf, dtype) => dtype.add_into(&mut buf[offset..offset + values.len()], values),
    }
    Ok(())
}

/// Where `accumulate` adds.
pub(super) enum Target<'a> {
    Buf(&'a mut GradBuf),
    Temp(&'a mut [f32], GradDtype),
}

/// Intersection of two ranges (empty when disjoint).
pub(super) fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    let end = a.end.min(b.end).max(start);
    start..end
}

impl UnitState {
    pub(super) fn new(layout: FlatLayout, rank: usize, world_size: usize, stage: ZeroStage, grad_dtype: GradDtype, seed: u64) -> Self {
        let full = 0..layout.padded_numel;
        let shard = layout.shard_range(rank, world_size);
        let opt_range = if stage.shards(Buffer::OptState) { shard.clone() } else { full.clone() };
        let grad_range = if stage.shards(Buffer::Grads) { shard.clone() } else { full };
        let master = init_range(&layout, &opt_range, seed);
        let n = opt_range.len();
        Self {
            layout,
            shard,
            opt_range,
            master,
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            grad: GradBuf::zeros(grad_range.len(), grad_dtype),
            grad_range,
            params: None,
            param_shard: None,
            tensors: None,
        }
    }

    /// Move the master weights to `device` as a tensor, with zero moments and gradient there
    /// (`StateStorage::Tensors`); the host buffers are freed.
    pub(super) fn move_to_tensors(&mut self, device: &Device, grad_dtype: GradDtype) -> Result<()> {
        let n = self.opt_range.len();
        let master = Tensor::from_vec(std::mem::take(&mut self.master), n, device)?;
        self.exp_avg = Vec::new();
        self.exp_avg_sq = Vec::new();
        self.grad = GradBuf::zeros(0, grad_dtype);
        self.tensors = Some(TensorState {
            master,
            exp_avg: Tensor::zeros(n, DType::F32, device)?,
            exp_avg_sq: Tensor::zeros(n, DType::F32, device)?,
            grad: Tensor::zeros(self.grad_range.len(), grad_dtype_of(grad_dtype), device)?,
        });
        Ok(())
    }
}

/// The candle dtype of a gradient buffer.
pub(super) fn grad_dtype_of(dtype: GradDtype) -> DType {
    match dtype {
        GradDtype::F32 => DType::F32,
        GradDtype::Bf16 => DType::BF16,
    }
}

/// Initial values of `range` of a unit's flat buffer: each parameter from its own named stream,
/// skipped ahead to the range, so every rank gets the numbers a full initialization would give.
fn init_range(layout: &FlatLayout, range: &Range<usize>, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; range.len()];
    for slot in &layout.params {
        let r = intersect(&slot.range(), range);
        if r.is_empty() {
            continue;
        }
        let values = &mut out[r.start - range.start..r.end - range.start];
        match slot.init {
            Some(Init::Normal { std }) => {
                let mut rng = SplitMix64::for_name(seed, &slot.name);
                rng.skip(2 * (r.start - slot.offset) as u64);
                values.iter_mut().for_each(|v| *v = (rng.next_normal() * std) as f32);
            }
            Some(Init::Ones) => values.fill(1.0),
            Some(Init::Zeros) | None => values.fill(0.0),
        }
    }
    out
}

