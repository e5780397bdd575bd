//! The training engine: ZeRO stages 0-3 over the ranks of a `Comm`, driving the model one unit at
//! a time (root embed -> blocks -> head + loss, then each block's backward in reverse).
//!
//! Why per block: candle's `backward()` is one graph walk in which the graph owns every tensor it
//! touched, so a monolithic backward keeps every block's (gathered) parameters alive. Driving the
//! backward block by block, as a vector-Jacobian product `(y * g.detach()).sum_all().backward()`
//! seeded with the upstream gradient, lets stage 3 gather a block just before use and drop it
//! right after, and lets stages 2-3 reduce-scatter a block's gradient as soon as it exists.
//!
//! Each unit keeps fp32 master weights and AdamW moments over `opt_range` (its shard at stage >= 1),
//! a gradient buffer (its shard at stage >= 2) and compute-dtype parameters (none between steps at
//! stage 3). What is sharded is decided only by `ZeroStage::shards` (see stage.rs). Reductions are
//! sums in rank order (deterministic), and the gradient norm is computed the same way at every
//! stage (each rank's shard range, then an all-reduce), so stages 1-3 reproduce stage 0 bitwise.

mod tensors;
mod unit;

use std::borrow::Cow;
use std::time::Instant;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use kernels::AdamWHyper;
use models::{BlockModel, Carry};

use crate::comm::Comm;
use crate::grad::{GradBuf, GradDtype};
use crate::layout::FlatLayout;
use crate::precision::LossScaler;
use crate::stage::{Buffer, ZeroStage};

use unit::{accumulate, intersect, Gathering, HalfShard, Target};
pub use unit::{TensorState, UnitState};

/// Where the engine keeps each unit's master weights, AdamW moments and gradient buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateStorage {
    /// Host `Vec`s (`UnitState::master`, ...): the CPU engine, every world size and stage.
    HostVecs,
    /// Flat tensors on the engine's device (`TensorState`, see tensors.rs): what a CUDA engine
    /// uses, so the optimizer step never leaves the GPU. World size 1 only, for now.
    Tensors,
}

impl StateStorage {
    /// Tensors on a CUDA device, host Vecs on the CPU.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            StateStorage::HostVecs
        } else {
            StateStorage::Tensors
        }
    }
}

/// How the engine runs.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub stage: ZeroStage,
    /// Stage 3: re-gather and recompute each block in the backward (activation checkpointing)
    /// instead of keeping its graph and gathered parameters from the forward.
    pub recompute: bool,
    /// Dtype the model computes in (f32, bf16, or f16 with dynamic loss scaling); master
    /// weights, moments and reductions are f32.
    pub compute_dtype: DType,
    /// Element type of the persistent gradient buffers (f32, or bf16 as in the ZeRO paper).
    pub grad_dtype: GradDtype,
}

impl EngineOptions {
    pub fn single() -> Self {
        Self { stage: ZeroStage::default(), recompute: false, compute_dtype: DType::F32, grad_dtype: GradDtype::F32 }
    }
}

/// Targets the loss counts: those that are not `kernels::IGNORE_INDEX` (prompt and padding
/// positions of prompt/completion data are ignored; text data has none).
fn counted_targets(targets: &Tensor) -> Result<usize> {
    Ok(targets.flatten_all()?.to_vec1::<u32>()?.iter().filter(|&&t| t != kernels::IGNORE_INDEX).count())
}

/// One micro-batch: token ids and next-token targets, both (B, T) u32 on the engine's device.
pub struct MicroBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
}

/// What one optimizer step did and how long its phases took (on this rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean loss over the step's counted target tokens, all ranks.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens in the step, all ranks.
    pub tokens: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// f16: the loss scale used for this step, and whether the step was skipped because a
    /// gradient overflowed on some rank.
    pub loss_scale: f64,
    pub skipped: bool,
}

/// Bytes of model state this rank holds (persistent), and the peak of gathered parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReport {
    pub rank: usize,
    /// Compute-dtype parameters kept between steps.
    pub params_bytes: usize,
    /// Gradient buffers (fp32).
    pub grads_bytes: usize,
    /// fp32 master weights + two AdamW moments.
    pub optimizer_bytes: usize,
    /// Largest amount of gathered (stage 3) parameters alive at once during a step.
    pub peak_gathered_bytes: usize,
}

impl MemoryReport {
    pub fn model_state_bytes(&self) -> usize {
        self.params_bytes + self.grads_bytes + self.optimizer_bytes
    }
}

pub struct Engine<M: BlockModel, C: Comm> {
    pub model: M,
    pub comm: C,
    pub options: EngineOptions,
    pub units: Vec<UnitState>,
    pub device: Device,
    /// Optimizer steps taken.
    pub step: u64,
    /// Dynamic loss scaling (f16 compute only).
    pub loss_scaler: Option<LossScaler>,
    storage: StateStorage,
    gathered_now: usize,
    gathered_peak: usize,
}

/// A block's forward record, kept until its backward.
struct SavedBlock {
    /// Leaf copies of the block's input carry.
    inputs: Vec<Var>,
    kept: Kept,
}

/// What a block keeps between its forward and its backward.
enum Kept {
    /// Recompute: nothing (the parameters are gathered and the block re-run in the backward).
    Nothing,
    /// Autograd: the outputs (with their graph) and the parameters used.
    Graph(Carry, Vec<Var>),
    /// Explicit backward: the model's tape and the parameters used.
    Tape(models::block_model::BlockTape, Vec<Var>),
}

fn dtype_bytes(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

fn cerr(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl<M: BlockModel, C: Comm> Engine<M, C> {
    /// Initialize this rank's part of every unit from `seed`, keeping the state where
    /// `StateStorage::for_device` says (device tensors on CUDA, host Vecs on the CPU).
    pub fn new(model: M, comm: C, seed: u64, device: Device, options: EngineOptions) -> Result<Self> {
        let storage = StateStorage::for_device(&device);
        Self::with_storage(model, comm, seed, device, options, storage)
    }

    /// `new` with the state kept in `storage` (`Tensors` on the CPU runs the device path there,
    /// which is how the tests check it).
    pub fn with_storage(model: M, comm: C, seed: u64, device: Device, options: EngineOptions, storage: StateStorage) -> Result<Self> {
        if storage == StateStorage::Tensors && comm.world_size() != 1 {
            bail!(
                "device {:?}: the engine keeps its state on the device only at world size 1 (this run has {}); \
                 ZeRO stages across several GPUs need a communicator over device buffers (NCCL), not implemented yet",
                device.location(),
                comm.world_size()
            );
        }
        if !matches!(options.compute_dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("compute dtype {:?} is not supported; use f32, bf16 or f16", options.compute_dtype);
        }
        let loss_scaler = (options.compute_dtype == DType::F16).then(LossScaler::default);
        let (rank, world) = (comm.rank(), comm.world_size());
        let mut units: Vec<UnitState> = model
            .units()
            .iter()
            .map(|spec| UnitState::new(FlatLayout::new(spec, world), rank, world, options.stage, options.grad_dtype, seed))
            .collect();
        if storage == StateStorage::Tensors {
            for u in &mut units {
                u.move_to_tensors(&device, options.grad_dtype)?;
            }
        }
        let mut engine = Self { model, comm, options, units, device, step: 0, loss_scaler, storage, gathered_now: 0, gathered_peak: 0 };
        engine.refresh_params()?;
        Ok(engine)
    }

    pub fn num_params(&self) -> usize {
        self.units.iter().map(|u| u.layout.numel).sum()
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Where the optimizer state and gradients live.
    pub fn storage(&self) -> StateStorage {
        self.storage
    }

    fn on_tensors(&self) -> bool {
        self.storage == StateStorage::Tensors
    }

    /// Bytes of model state held by this rank.
    pub fn memory_report(&self) -> MemoryReport {
        let param_bytes = dtype_bytes(self.options.compute_dtype);
        let params_bytes = if self.options.stage.shards(Buffer::Params) {
            self.units.iter().filter(|u| u.param_shard.is_some()).map(|u| u.shard.len() * param_bytes).sum()
        } else {
            self.units.iter().map(|u| u.layout.numel * param_bytes).sum()
        };
        MemoryReport {
            rank: self.rank(),
            params_bytes,
            grads_bytes: self.units.iter().map(|u| u.grad_range.len() * self.options.grad_dtype.bytes()).sum(),
            optimizer_bytes: self.units.iter().map(|u| 3 * u.opt_range.len() * 4).sum(),
            peak_gathered_bytes: self.gathered_peak,
        }
    }

    fn unit_param_bytes(&self, unit: usize) -> usize {
        self.units[unit].layout.numel * dtype_bytes(self.options.compute_dtype)
    }

    /// Compute-dtype Vars of a unit from its full flat f32 values (one copy per parameter: the
    /// values are converted straight into the Vec the Var takes over).
    fn vars_from_full(&self, unit: usize, full: &[f32]) -> Result<Vec<Var>> {
        let dtype = self.options.compute_dtype;
        self.units[unit]
            .layout
            .params
            .iter()
            .map(|slot| {
                let values = &full[slot.range()];
                let shape = slot.shape.as_slice();
                match dtype {
                    DType::BF16 => Var::from_vec(values.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(), shape, &self.device),
                    DType::F16 => Var::from_vec(values.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>(), shape, &self.device),
                    _ => Var::from_vec(values.to_vec(), shape, &self.device),
                }
            })
            .collect()
    }

    /// Start gathering a unit's parameters (stage 3), counting them as gathered.
    fn gather_async(&mut self, unit: usize) -> Result<Gathering> {
        self.gathered_now += self.unit_param_bytes(unit);
        self.gathered_peak = self.gathered_peak.max(self.gathered_now);
        if self.on_tensors() {
            return Ok(Gathering::Ready(self.tensor_vars(unit)?));
        }
        let u = &self.units[unit];
        let name = &u.layout.unit;
        Ok(match &u.param_shard {
            Some(HalfShard::Bf16(v)) => Gathering::Bf16(self.comm.all_gather_async(v.clone(), name).map_err(cerr)?),
            Some(HalfShard::F16(v)) => Gathering::F16(self.comm.all_gather_async(v.clone(), name).map_err(cerr)?),
            None => Gathering::F32(self.comm.all_gather_async(u.master.clone(), name).map_err(cerr)?),
        })
    }

    fn finish_gather(&self, unit: usize, pending: Gathering) -> Result<Vec<Var>> {
        // Gathered half values are exactly what converting the fp32 master would give.
        fn vars<T: candle_core::WithDType>(slots: &[crate::layout::ParamSlot], full: &[T], device: &Device) -> Result<Vec<Var>> {
            slots.iter().map(|s| Var::from_vec(full[s.range()].to_vec(), s.shape.as_slice(), device)).collect()
        }
        let slots = &self.units[unit].layout.params;
        match pending {
            Gathering::F32(p) => self.vars_from_full(unit, &p.wait().map_err(cerr)?),
            Gathering::Bf16(p) => vars(slots, &p.wait().map_err(cerr)?, &self.device),
            Gathering::F16(p) => vars(slots, &p.wait().map_err(cerr)?, &self.device),
            Gathering::Ready(vars) => Ok(vars),
        }
    }

    /// A gathered unit's parameters were dropped.
    fn release(&mut self, unit: usize) {
        self.gathered_now = self.gathered_now.saturating_sub(self.unit_param_bytes(unit));
    }

    /// The parameters of a unit for this step: held (stages 0-2) or gathered now (stage 3).
    fn unit_params(&mut self, unit: usize) -> Result<Vec<Var>> {
        match &self.units[unit].params {
            Some(p) => Ok(p.clone()),
            None => {
                let pending = self.gather_async(unit)?;
                self.finish_gather(unit, pending)
            }
        }
    }

    /// After an update: rebuild the held compute-dtype parameters from the master weights
    /// (gathering the shards at stages 1-2; nothing is held at stage 3).
    fn refresh_params(&mut self) -> Result<()> {
        if self.on_tensors() {
            return self.tensor_refresh();
        }
        let stage = self.options.stage;
        for i in 0..self.units.len() {
            let params = if stage.shards(Buffer::Params) {
                let u = &mut self.units[i];
                let shard = &u.master[u.shard.start - u.opt_range.start..u.shard.end - u.opt_range.start];
                u.param_shard = match self.options.compute_dtype {
                    DType::BF16 => Some(HalfShard::Bf16(shard.iter().map(|&v| half::bf16::from_f32(v)).collect())),
                    DType::F16 => Some(HalfShard::F16(shard.iter().map(|&v| half::f16::from_f32(v)).collect())),
                    _ => None,
                };
                None
            } else if stage.shards(Buffer::OptState) {
                let u = &self.units[i];
                let mut full = vec![0f32; u.layout.padded_numel];
                self.comm.all_gather(&u.master, &mut full, &u.layout.unit).map_err(cerr)?;
                Some(self.vars_from_full(i, &full)?)
            } else {
                let master = std::mem::take(&mut self.units[i].master);
                let vars = self.vars_from_full(i, &master);
                self.units[i].master = master;
                Some(vars?)
            };
            self.units[i].params = params;
        }
        Ok(())
    }

    /// Forward and backward over this rank's `micro_batches`, then clip and apply AdamW.
    pub fn train_step(&mut self, micro_batches: &[MicroBatch], lr: f64, hyper: &AdamWHyper, grad_clip: f64) -> Result<StepStats> {
        let mut stats = self.compute_gradients(micro_batches)?;
        let t0 = Instant::now();
        self.apply_update(&mut stats, lr, hyper, grad_clip)?;
        stats.optimizer_s = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Zero the gradients, run forward and backward over every micro-batch (the loss of each
    /// divided by the step's target count over all ranks, so the result is the gradient of the
    /// global mean loss), reduce the gradients as the stage says, and compute the global norm.
    pub fn compute_gradients(&mut self, micro_batches: &[MicroBatch]) -> Result<StepStats> {
        let mut stats = StepStats::default();
        let local_tokens: usize = micro_batches.iter().map(|m| counted_targets(&m.targets)).sum::<Result<usize>>()?;
        let mut counts = [local_tokens as f64, micro_batches.len() as f64];
        self.comm.all_reduce_sum(&mut counts, "step").map_err(cerr)?;
        if counts[0] == 0.0 {
            bail!("train_step: no target tokens in the batch on any rank");
        }
        if counts[1] != (micro_batches.len() * self.comm.world_size()) as f64 {
            bail!("train_step: ranks disagree on the number of micro-batches (this rank has {})", micro_batches.len());
        }
        stats.tokens = counts[0] as usize;
        let grad_dtype = self.options.grad_dtype;
        if self.on_tensors() {
            self.tensor_zero_grads()?;
        } else {
            for unit in &mut self.units {
                unit.grad = GradBuf::zeros(unit.grad_range.len(), grad_dtype);
            }
        }
        // f16: the loss is multiplied by the scale (its divisor divided by it), so gradients are
        // scaled too; they are unscaled in the norm and in AdamW's grad_scale.
        let scale = self.loss_scaler.map_or(1.0, |s| s.scale);
        stats.loss_scale = scale;
        let mut local_loss = 0.0;
        for micro in micro_batches {
            local_loss += self.forward_backward(micro, counts[0] / scale, &mut stats)? / scale;
        }

        // Stages 0-1 reduce once per step; stages 2-3 already reduce-scattered per block (tensor
        // state: world 1, nothing to reduce).
        let t0 = Instant::now();
        let stage = self.options.stage;
        if !stage.shards(Buffer::Grads) && !self.on_tensors() {
            for unit in &mut self.units {
                // f32 buffers reduce in place or straight from the buffer (no copy on the hot
                // path); bf16 ones go through f32 (exact) and the result is stored rounded.
                if let GradBuf::F32(full) = &mut unit.grad {
                    if stage.shards(Buffer::OptState) {
                        let mut shard = vec![0f32; unit.shard.len()];
                        self.comm.reduce_scatter_sum(full, &mut shard, &unit.layout.unit).map_err(cerr)?;
                        unit.grad = GradBuf::F32(shard);
                    } else {
                        self.comm.all_reduce_sum(full, &unit.layout.unit).map_err(cerr)?;
                    }
                    continue;
                }
                let full = unit.grad.to_f32(0..unit.grad.len()).into_owned();
                let reduced = if stage.shards(Buffer::OptState) {
                    let mut shard = vec![0f32; unit.shard.len()];
                    self.comm.reduce_scatter_sum(&full, &mut shard, &unit.layout.unit).map_err(cerr)?;
                    shard
                } else {
                    let mut full = full;
                    self.comm.all_reduce_sum(&mut full, &unit.layout.unit).map_err(cerr)?;
                    full
                };
                unit.grad = GradBuf::from_f32(reduced, grad_dtype);
            }
        }
        // The norm over this rank's shard range, summed over ranks: the same arithmetic at every
        // stage. A non-finite gradient anywhere makes the sum non-finite on every rank, which is
        // how all ranks agree on an overflow.
        let mut sums = [local_loss, 0.0];
        if self.on_tensors() {
            sums[1] = self.tensor_sum_squares()?;
        } else {
            for unit in &self.units {
                let local = intersect(&unit.shard, &unit.opt_range);
                let offset = unit.opt_range.start;
                sums[1] += unit.grad.sum_squares(local.start - offset..local.end - offset);
            }
        }
        self.comm.all_reduce_sum(&mut sums, "step").map_err(cerr)?;
        stats.backward_s += t0.elapsed().as_secs_f64();
        stats.loss = sums[0];
        stats.grad_norm = sums[1].sqrt() / scale;
        Ok(stats)
    }

    /// Clip by the global norm in `stats` and apply one AdamW step to this rank's master weights
    /// (weight decay on 2-D parameters only), then refresh the held parameters.
    pub fn apply_update(&mut self, stats: &mut StepStats, lr: f64, hyper: &AdamWHyper, grad_clip: f64) -> Result<()> {
        if let Some(scaler) = self.loss_scaler.as_mut() {
            stats.skipped = scaler.update(!stats.grad_norm.is_finite());
            if stats.skipped {
                return Ok(());
            }
        }
        if !stats.grad_norm.is_finite() {
            bail!(
                "step {}: the gradient norm is {} (loss {}); lower train.lr or check the data",
                self.step + 1,
                stats.grad_norm,
                stats.loss
            );
        }
        let clip_scale = if grad_clip > 0.0 && stats.grad_norm > grad_clip { grad_clip / (stats.grad_norm + 1e-6) } else { 1.0 };
        let grad_scale = clip_scale / stats.loss_scale.max(1.0);
        self.step += 1;
        if self.on_tensors() {
            self.tensor_adamw(lr, hyper, grad_scale as f32)?;
            self.refresh_params()?;
            // Asynchronous devices: the step's work ends here, not inside the next forward.
            return self.device.synchronize();
        }
        for unit in &mut self.units {
            let base = unit.opt_range.start;
            for slot in &unit.layout.params {
                let r = intersect(&slot.range(), &unit.opt_range);
                if r.is_empty() {
                    continue;
                }
                let hp = AdamWHyper { lr: lr as f32, weight_decay: if slot.decays { hyper.weight_decay } else { 0.0 }, ..*hyper };
                let local = r.start - base..r.end - base;
                let grad = unit.grad.to_f32(local.clone());
                kernels::adamw_step(
                    &mut unit.master[local.clone()],
                    &grad,
                    &mut unit.exp_avg[local.clone()],
                    &mut unit.exp_avg_sq[local],
                    &hp,
                    self.step,
                    grad_scale as f32,
                )?;
            }
        }
        self.refresh_params()
    }

    /// Add a unit's parameter gradients into its full gradient buffer (stages 0-1) or into `full`,
    /// a temporary full buffer that is reduce-scattered into the shard (stages 2-3).
    fn take_grads(&mut self, unit: usize, params: &[Var], grads: &candle_core::backprop::GradStore, full: Option<&mut Vec<f32>>) -> Result<()> {
        let list: Vec<Option<Tensor>> = params.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect();
        self.take_grad_list(unit, &list, full)
    }

    /// `take_grads` for gradients listed in parameter order (None: no gradient reached it).
    fn take_grad_list(&mut self, unit: usize, grads: &[Option<Tensor>], full: Option<&mut Vec<f32>>) -> Result<()> {
        if self.on_tensors() {
            return self.tensor_add_grads(unit, grads);
        }
        let grad_dtype = self.options.grad_dtype;
        let u = &mut self.units[unit];
        if full.is_none() && u.grad_range.len() != u.layout.padded_numel {
            bail!("unit {}: a sharded gradient needs a full buffer to reduce-scatter from", u.layout.unit);
        }
        if grads.len() != u.layout.params.len() {
            bail!("unit {}: {} gradients for {} parameters", u.layout.unit, grads.len(), u.layout.params.len());
        }
        let mut full = full;
        for (slot, g) in u.layout.params.iter().zip(grads) {
            if let Some(g) = g {
                let target = match full.as_deref_mut() {
                    Some(buf) => Target::Temp(buf, grad_dtype),
                    None => Target::Buf(&mut u.grad),
                };
                accumulate(target, slot.offset, slot.numel, g, &slot.name)?;
            }
        }
        Ok(())
    }

    /// Block `i`'s parameter gradients into its buffer, or reduce-scattered into its shard.
    fn store_block_grads(&mut self, i: usize, grads: &[Option<Tensor>]) -> Result<()> {
        if self.options.stage.shards(Buffer::Grads) && !self.on_tensors() {
            let mut full = vec![0f32; self.units[i + 1].layout.padded_numel];
            self.take_grad_list(i + 1, grads, Some(&mut full))?;
            self.scatter_into_shard(i + 1, &full)
        } else {
            self.take_grad_list(i + 1, grads, None)
        }
    }

    /// Reduce-scatter a full unit gradient into this rank's gradient shard (stages 2-3).
    fn scatter_into_shard(&mut self, unit: usize, full: &[f32]) -> Result<()> {
        let u = &mut self.units[unit];
        let pending = self.comm.reduce_scatter_sum_async(full.to_vec(), &u.layout.unit).map_err(cerr)?;
        let shard = pending.wait().map_err(cerr)?;
        u.grad.add_f32(0, &shard);
        Ok(())
    }

    /// One micro-batch on this rank: returns its loss contribution (summed over its tokens /
    /// `divisor`).
    fn forward_backward(&mut self, micro: &MicroBatch, divisor: f64, stats: &mut StepStats) -> Result<f64> {
        let t0 = Instant::now();
        let n_blocks = self.units.len() - 1;
        let shard_params = self.options.stage.shards(Buffer::Params);
        let shard_grads = self.options.stage.shards(Buffer::Grads);
        let recompute = self.options.recompute;
        let explicit = self.model.supports_explicit_backward(self.options.compute_dtype, &self.device);

        // Forward. The root stays gathered for the whole micro-step.
        let root = self.unit_params(0)?;
        let root_t: Vec<Tensor> = root.iter().map(|v| v.as_tensor().clone()).collect();
        let embedded = self.model.embed(&root_t, &micro.inputs)?;
        let mut carry: Vec<Var> = embedded.iter().map(|t| Var::from_tensor(&t.detach())).collect::<Result<_>>()?;
        let mut saved: Vec<SavedBlock> = Vec::with_capacity(n_blocks);
        let mut prefetch = if shard_params && n_blocks > 0 { Some(self.gather_async(1)?) } else { None };
        for i in 0..n_blocks {
            let params = match prefetch.take() {
                Some(p) => {
                    let vars = self.finish_gather(i + 1, p)?;
                    if i + 1 < n_blocks {
                        prefetch = Some(self.gather_async(i + 2)?);
                    }
                    vars
                }
                None => self.unit_params(i + 1)?,
            };
            let input: Carry = carry.iter().map(|v| v.as_tensor().clone()).collect();
            let (output, kept) = if recompute {
                let detached: Vec<Tensor> = params.iter().map(|v| v.as_detached_tensor()).collect();
                let input_detached: Carry = input.iter().map(|t| t.detach()).collect();
                let output = self.model.block(i, &detached, &input_detached)?;
                if shard_params {
                    self.release(i + 1);
                }
                (output, Kept::Nothing)
            } else if explicit {
                let detached: Vec<Tensor> = params.iter().map(|v| v.as_detached_tensor()).collect();
                let input_detached: Carry = input.iter().map(|t| t.detach()).collect();
                let (output, tape) = self.model.block_forward_train(i, &detached, &input_detached)?;
                (output, Kept::Tape(tape, params))
            } else {
                let tensors: Vec<Tensor> = params.iter().map(|v| v.as_tensor().clone()).collect();
                let output = self.model.block(i, &tensors, &input)?;
                (output.clone(), Kept::Graph(output, params))
            };
            let next = output.iter().map(|t| Var::from_tensor(&t.detach())).collect::<Result<_>>()?;
            saved.push(SavedBlock { inputs: std::mem::replace(&mut carry, next), kept });
        }
        let last: Carry = carry.iter().map(|v| v.as_tensor().clone()).collect();
        let root_d: Vec<Tensor> = if explicit { root.iter().map(|v| v.as_detached_tensor()).collect() } else { Vec::new() };
        let (loss, head_tape) = if explicit {
            let last_d: Carry = last.iter().map(|t| t.detach()).collect();
            let (loss, tape) = self.model.head_loss_train(&root_d, &last_d, &micro.targets, Some(divisor))?;
            (loss, Some(tape))
        } else {
            (self.model.head_loss(&root_t, &last, &micro.targets, Some(divisor))?, None)
        };
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        stats.forward_s += t0.elapsed().as_secs_f64();

        // Backward, one unit at a time, from the loss down to the embedding.
        let t1 = Instant::now();
        let mut root_full = if shard_grads && !self.on_tensors() { Some(vec![0f32; self.units[0].layout.padded_numel]) } else { None };
        let mut upstream = match head_tape {
            Some(tape) => {
                let (dcarry, droot) = self.model.head_backward(&root_d, tape, 1.0)?;
                self.take_grad_list(0, &droot, root_full.as_mut())?;
                dcarry
            }
            None => {
                let grads = loss.backward()?;
                self.take_grads(0, &root, &grads, root_full.as_mut())?;
                upstream_of(&grads, &carry)?
            }
        };
        drop((loss, last, carry, root_d));
        let mut prefetch = if shard_params && recompute && n_blocks > 0 { Some(self.gather_async(n_blocks)?) } else { None };
        for i in (0..n_blocks).rev() {
            let block = saved.pop().ok_or_else(|| cerr(format!("missing forward record of block {i}")))?;
            let kept = match block.kept {
                Kept::Nothing => {
                    let params = match prefetch.take() {
                        Some(p) => {
                            let vars = self.finish_gather(i + 1, p)?;
                            if i > 0 {
                                prefetch = Some(self.gather_async(i)?);
                            }
                            vars
                        }
                        None => self.unit_params(i + 1)?,
                    };
                    if explicit {
                        let detached: Vec<Tensor> = params.iter().map(|v| v.as_detached_tensor()).collect();
                        let input: Carry = block.inputs.iter().map(|v| v.as_detached_tensor()).collect();
                        Kept::Tape(self.model.block_forward_train(i, &detached, &input)?.1, params)
                    } else {
                        let inputs: Vec<Var> = block.inputs.iter().map(|v| Var::from_tensor(&v.as_detached_tensor())).collect::<Result<_>>()?;
                        let tensors: Vec<Tensor> = params.iter().map(|v| v.as_tensor().clone()).collect();
                        let input: Carry = inputs.iter().map(|v| v.as_tensor().clone()).collect();
                        let output = self.model.block(i, &tensors, &input)?;
                        let grads = vjp(&output, &upstream)?.backward()?;
                        upstream = upstream_of(&grads, &inputs)?;
                        let list: Vec<Option<Tensor>> = params.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect();
                        self.store_block_grads(i, &list)?;
                        if shard_params {
                            self.release(i + 1);
                        }
                        continue;
                    }
                }
                other => other,
            };
            let list: Vec<Option<Tensor>> = match kept {
                Kept::Graph(output, params) => {
                    let grads = vjp(&output, &upstream)?.backward()?;
                    upstream = upstream_of(&grads, &block.inputs)?;
                    params.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect()
                }
                Kept::Tape(tape, params) => {
                    let detached: Vec<Tensor> = params.iter().map(|v| v.as_detached_tensor()).collect();
                    let (dinput, dparams) = self.model.block_backward(i, &detached, tape, &upstream)?;
                    upstream = dinput;
                    dparams.into_iter().map(Some).collect()
                }
                Kept::Nothing => unreachable!("recompute handled above"),
            };
            self.store_block_grads(i, &list)?;
            if shard_params {
                self.release(i + 1);
            }
        }
        let grads = vjp(&embedded, &upstream)?.backward()?;
        self.take_grads(0, &root, &grads, root_full.as_mut())?;
        drop((grads, embedded, root, root_t));
        if let Some(full) = root_full {
            self.scatter_into_shard(0, &full)?;
        }
        if shard_params {
            self.release(0);
        }
        stats.backward_s += t1.elapsed().as_secs_f64();
        Ok(loss_value)
    }

    /// Summed loss and target count over `batches` with no graph (this rank's share of a
    /// validation set); all ranks take part (stage 3 gathers), and the totals are all-reduced.
    pub fn eval_loss(&mut self, batches: &[MicroBatch]) -> Result<f64> {
        let mut sums = [0.0f64, 0.0];
        let params: Vec<Vec<Tensor>> = (0..self.units.len())
            .map(|i| Ok(self.unit_params(i)?.iter().map(|v| v.as_detached_tensor()).collect()))
            .collect::<Result<_>>()?;
        for b in batches {
            let carry = self.forward_no_grad(&params, &b.inputs)?;
            let loss = self.model.head_loss(&params[0], &carry, &b.targets, Some(1.0))?;
            sums[0] += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            sums[1] += counted_targets(&b.targets)? as f64;
        }
        drop(params);
        if self.options.stage.shards(Buffer::Params) {
            for i in 0..self.units.len() {
                self.release(i);
            }
        }
        self.comm.all_reduce_sum(&mut sums, "eval").map_err(cerr)?;
        if sums[1] == 0.0 {
            bail!("eval_loss: no batches");
        }
        Ok(sums[0] / sums[1])
    }

    /// Logits (B, T, V) with no graph (sampling; stage 0-2 engines, or any stage at world 1).
    pub fn logits(&mut self, ids: &Tensor) -> Result<Tensor> {
        let params: Vec<Vec<Tensor>> = (0..self.units.len())
            .map(|i| Ok(self.unit_params(i)?.iter().map(|v| v.as_detached_tensor()).collect()))
            .collect::<Result<_>>()?;
        let carry = self.forward_no_grad(&params, ids)?;
        self.model.logits(&params[0], &carry)
    }

    /// Logits (B, T, V) for `ids` at positions continuing `cache` (which grows by T), with no
    /// graph: the model's `forward_cached` on every unit's detached parameters (sampling; like
    /// `logits`, for stage 0-2 engines or any stage at world 1).
    pub fn logits_cached(&mut self, ids: &Tensor, cache: &mut models::block_model::KvCache) -> Result<Tensor> {
        let params: Vec<Vec<Tensor>> = (0..self.units.len())
            .map(|i| Ok(self.unit_params(i)?.iter().map(|v| v.as_detached_tensor()).collect()))
            .collect::<Result<_>>()?;
        self.model.forward_cached(&params, ids, cache)
    }

    fn forward_no_grad(&self, params: &[Vec<Tensor>], ids: &Tensor) -> Result<Carry> {
        let mut carry = self.model.embed(&params[0], ids)?;
        for (i, p) in params[1..].iter().enumerate() {
            carry = self.model.block(i, p, &carry)?;
        }
        Ok(carry)
    }

    /// Every parameter as (name, shape, fp32 values), gathered from all ranks' master shards
    /// (a collective: every rank must call it).
    pub fn full_parameters(&self) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        let mut out = Vec::new();
        for (i, u) in self.units.iter().enumerate() {
            let full = if u.tensors.is_some() {
                self.tensor_master_to_host(i)?
            } else if u.opt_range.len() == u.layout.padded_numel {
                u.master.clone()
            } else {
                let mut full = vec![0f32; u.layout.padded_numel];
                self.comm.all_gather(&u.master, &mut full, &u.layout.unit).map_err(cerr)?;
                full
            };
            out.extend(u.layout.params.iter().map(|s| (s.name.clone(), s.shape.clone(), full[s.range()].to_vec())));
        }
        Ok(out)
    }

    /// The accumulated gradient of parameter `name` over the part this rank holds, as
    /// (first flat index within the parameter, values). After `compute_gradients`.
    pub fn gradient(&self, name: &str) -> Option<(usize, Vec<f32>)> {
        self.units.iter().enumerate().find_map(|(i, u)| {
            let slot = u.layout.params.iter().find(|s| s.name == name)?;
            if u.tensors.is_some() {
                // World 1: the buffer covers the whole unit.
                return Some((0, self.tensor_grad_to_host(i, slot.offset, slot.numel).ok()?));
            }
            let held = if u.grad.len() == u.opt_range.len() { u.opt_range.clone() } else { u.grad_range.clone() };
            let r = intersect(&slot.range(), &held);
            Some((r.start.saturating_sub(slot.offset), u.grad.to_f32(r.start - held.start..r.end - held.start).into_owned()))
        })
    }

    /// This rank's shard (`layout.shard_range` at the current world size) of a unit's master
    /// weights and AdamW moments, as written to a checkpoint (copied to the host from tensor state).
    pub fn shard_state(&self, unit: usize) -> Result<[Cow<'_, [f32]>; 3]> {
        let u = &self.units[unit];
        let r = u.shard.start - u.opt_range.start..u.shard.end - u.opt_range.start;
        if u.tensors.is_some() {
            let [m, a, v] = self.tensor_state_to_host(unit, r.start, r.len())?;
            return Ok([Cow::Owned(m), Cow::Owned(a), Cow::Owned(v)]);
        }
        Ok([Cow::Borrowed(&u.master[r.clone()]), Cow::Borrowed(&u.exp_avg[r.clone()]), Cow::Borrowed(&u.exp_avg_sq[r])])
    }

    /// Restore a unit's master weights and moments over this rank's `opt_range` (values are
    /// checked for length), e.g. from a checkpoint saved at another world size or stage.
    pub fn set_unit_state(&mut self, unit: usize, master: Vec<f32>, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>) -> Result<()> {
        let u = &mut self.units[unit];
        let n = u.opt_range.len();
        if master.len() != n || exp_avg.len() != n || exp_avg_sq.len() != n {
            bail!("unit {}: restoring {} / {} / {} values over a range of {n}", u.layout.unit, master.len(), exp_avg.len(), exp_avg_sq.len());
        }
        if u.tensors.is_some() {
            return self.tensor_set_state(unit, master, exp_avg, exp_avg_sq);
        }
        (u.master, u.exp_avg, u.exp_avg_sq) = (master, exp_avg, exp_avg_sq);
        Ok(())
    }

    /// After restoring every unit: set the optimizer step count and rebuild the held parameters
    /// (a collective at stages 1-2).
    pub fn finish_restore(&mut self, step: u64) -> Result<()> {
        self.step = step;
        self.refresh_params()
    }

    /// Replace every parameter's master weights with `params` (name -> (shape, f32 values)); every
    /// parameter of the model must be present with its exact shape. Moments are reset.
    pub fn load_parameters(&mut self, params: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
        // Tensor state: through the host (once per load), then back with zero moments.
        let on_tensors = self.on_tensors();
        if on_tensors {
            for i in 0..self.units.len() {
                self.units[i].master = self.tensor_master_to_host(i)?;
                let n = self.units[i].opt_range.len();
                (self.units[i].exp_avg, self.units[i].exp_avg_sq) = (vec![0.0; n], vec![0.0; n]);
            }
        }
        for unit in &mut self.units {
            let base = unit.opt_range.start;
            for slot in &unit.layout.params {
                match params.get(&slot.name) {
                    Some((shape, values)) if shape == &slot.shape && values.len() == slot.numel => {
                        // Only the part of the parameter inside this rank's range (none for most
                        // parameters at stage >= 1).
                        let r = intersect(&slot.range(), &unit.opt_range);
                        if !r.is_empty() {
                            unit.master[r.start - base..r.end - base].copy_from_slice(&values[r.start - slot.offset..r.end - slot.offset]);
                        }
                    }
                    Some((shape, _)) => bail!("parameter {}: shape {shape:?} in the file, the model expects {:?}", slot.name, slot.shape),
                    None => bail!("parameter {} is missing from the weights", slot.name),
                }
            }
            unit.exp_avg.fill(0.0);
            unit.exp_avg_sq.fill(0.0);
        }
        if on_tensors {
            for i in 0..self.units.len() {
                let u = &mut self.units[i];
                let state = (std::mem::take(&mut u.master), std::mem::take(&mut u.exp_avg), std::mem::take(&mut u.exp_avg_sq));
                self.tensor_set_state(i, state.0, state.1, state.2)?;
            }
        }
        self.refresh_params()
    }
}

/// The scalar whose gradient is the vector-Jacobian product of `outputs` with `upstream`.
fn vjp(outputs: &[Tensor], upstream: &[Tensor]) -> Result<Tensor> {
    if outputs.len() != upstream.len() {
        bail!("backward: {} outputs but {} upstream gradients", outputs.len(), upstream.len());
    }
    let mut total: Option<Tensor> = None;
    for (y, g) in outputs.iter().zip(upstream) {
        let term = (y * g.detach().to_dtype(y.dtype())?)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    total.ok_or_else(|| cerr("backward: empty carry"))
}

/// Gradients reaching the carry leaves `inputs` (zeros when a leaf got none).
fn upstream_of(grads: &candle_core::backprop::GradStore, inputs: &[Var]) -> Result<Vec<Tensor>> {
    inputs
        .iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}
