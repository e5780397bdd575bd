//! The training engine: owns the flat fp32 master weights, gradients and AdamW moments of every
//! unit, hands the model parameters in the compute dtype, and drives forward and backward one unit
//! at a time (root embed -> blocks -> head + loss, then the blocks' backward in reverse).
//!
//! Why per block: candle's `backward()` is one graph walk in which the graph owns every tensor it
//! touched, so a monolithic backward keeps every block's parameters alive. Driving the backward
//! block by block, as a vector-Jacobian product `(y * g.detach()).sum_all().backward()` seeded with
//! the upstream gradient, is what lets a sharded engine gather a block just before its use and
//! drop it right after (docs/ARCHITECTURE.md). This engine is the single-process case
//! (world size 1, everything replicated = ZeRO stage 0).

use std::time::Instant;

use candle_core::{bail, DType, Device, Result, Storage, Tensor, Var};
use kernels::AdamWHyper;
use models::{BlockModel, Carry, Init};

use crate::layout::FlatLayout;
use crate::rng::SplitMix64;

/// One unit's state: layout, fp32 master weights, accumulated gradient, AdamW moments.
pub struct UnitState {
    pub layout: FlatLayout,
    pub master: Vec<f32>,
    pub grad: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// The parameters as handed to the model (compute dtype), refreshed after each update.
    params: Vec<Var>,
}

/// One micro-batch: token ids and next-token targets, both (B, T) u32 on the engine's device.
pub struct MicroBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
}

/// What one optimizer step did and how long its phases took.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean loss over the step's counted target tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

pub struct Engine<M: BlockModel> {
    pub model: M,
    pub units: Vec<UnitState>,
    pub device: Device,
    /// Dtype the model computes in (f32 or bf16); master weights and moments stay f32.
    pub compute_dtype: DType,
    /// Optimizer steps taken.
    pub step: u64,
}

/// Build a tensor of `shape` from an f32 slice in `dtype`.
fn tensor_from_f32(values: &[f32], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_slice(values, shape, device)?.to_dtype(dtype)
}

/// Add a gradient tensor (any float dtype, any device) into an f32 slice.
fn accumulate(dst: &mut [f32], grad: &Tensor, what: &str) -> Result<()> {
    let grad = grad.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = grad.storage_and_layout();
    let values = match &*storage {
        Storage::Cpu(candle_core::CpuStorage::F32(v)) => match layout.contiguous_offsets() {
            Some((a, b)) => &v[a..b],
            None => bail!("gradient of {what}: not contiguous"),
        },
        _ => bail!("gradient of {what}: expected f32 on the CPU"),
    };
    if values.len() != dst.len() {
        bail!("gradient of {what}: {} elements, expected {}", values.len(), dst.len());
    }
    dst.iter_mut().zip(values).for_each(|(d, s)| *d += s);
    Ok(())
}

impl UnitState {
    fn new(layout: FlatLayout, seed: u64) -> Self {
        let mut master = vec![0f32; layout.padded_numel];
        for slot in &layout.params {
            let values = &mut master[slot.range()];
            match slot.init {
                Some(Init::Normal { std }) => {
                    let mut rng = SplitMix64::for_name(seed, &slot.name);
                    values.iter_mut().for_each(|v| *v = (rng.next_normal() * std) as f32);
                }
                Some(Init::Ones) => values.fill(1.0),
                Some(Init::Zeros) | None => values.fill(0.0),
            }
        }
        let n = layout.padded_numel;
        Self { layout, master, grad: vec![0.0; n], exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n], params: Vec::new() }
    }

    /// Re-create the compute-dtype parameters from the master weights.
    fn refresh_params(&mut self, dtype: DType, device: &Device) -> Result<()> {
        self.params = self
            .layout
            .params
            .iter()
            .map(|slot| Var::from_tensor(&tensor_from_f32(&self.master[slot.range()], &slot.shape, dtype, device)?))
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// Parameters without autograd tracking (evaluation and sampling build no graph).
    fn detached_params(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_detached_tensor()).collect()
    }

    /// Add the gradients of this unit's parameters found in `grads` into the flat gradient.
    fn accumulate_grads(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (slot, var) in self.layout.params.iter().zip(&self.params) {
            if let Some(g) = grads.get(var.as_tensor()) {
                accumulate(&mut self.grad[slot.range()], g, &slot.name)?;
            }
        }
        Ok(())
    }
}

impl<M: BlockModel> Engine<M> {
    /// Initialize every unit from `seed` (each parameter from its own named stream).
    pub fn new(model: M, seed: u64, device: Device, compute_dtype: DType) -> Result<Self> {
        if !matches!(compute_dtype, DType::F32 | DType::BF16) {
            bail!("compute dtype {compute_dtype:?} is not supported; use f32 or bf16");
        }
        let mut units: Vec<UnitState> =
            model.units().iter().map(|spec| UnitState::new(FlatLayout::new(spec, 1), seed)).collect();
        for unit in &mut units {
            unit.refresh_params(compute_dtype, &device)?;
        }
        Ok(Self { model, units, device, compute_dtype, step: 0 })
    }

    pub fn num_params(&self) -> usize {
        self.units.iter().map(|u| u.layout.numel).sum()
    }

    /// Forward and backward over `micro_batches`, accumulating gradients normalized by the step's
    /// total number of target tokens; then clip and apply AdamW with learning rate `lr`.
    pub fn train_step(&mut self, micro_batches: &[MicroBatch], lr: f64, hyper: &AdamWHyper, grad_clip: f64) -> Result<StepStats> {
        let mut stats = self.compute_gradients(micro_batches)?;
        let t0 = Instant::now();
        self.apply_update(&stats, lr, hyper, grad_clip)?;
        stats.optimizer_s = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Zero the gradients, then run forward and backward over every micro-batch. The loss of each
    /// is divided by the step's total target count, so the accumulated gradient is that of the
    /// mean loss over the whole step. Returns the loss, token count, gradient norm and timings.
    pub fn compute_gradients(&mut self, micro_batches: &[MicroBatch]) -> Result<StepStats> {
        let mut stats = StepStats::default();
        let tokens: usize = micro_batches.iter().map(|m| m.targets.elem_count()).sum();
        if tokens == 0 {
            bail!("train_step: no target tokens in the batch");
        }
        stats.tokens = tokens;
        for unit in &mut self.units {
            unit.grad.fill(0.0);
        }
        for micro in micro_batches {
            stats.loss += self.forward_backward(micro, tokens as f64, &mut stats)?;
        }
        let sum_sq: f64 = self.units.iter().flat_map(|u| u.grad.iter()).map(|&g| (g as f64) * (g as f64)).sum();
        stats.grad_norm = sum_sq.sqrt();
        Ok(stats)
    }

    /// Clip by the global norm in `stats` and apply one AdamW step to every unit's master
    /// weights (weight decay on 2-D parameters only), then refresh the compute-dtype parameters.
    pub fn apply_update(&mut self, stats: &StepStats, lr: f64, hyper: &AdamWHyper, grad_clip: f64) -> Result<()> {
        if !stats.grad_norm.is_finite() {
            bail!(
                "step {}: the gradient norm is {} (loss {}); lower train.lr or check the data",
                self.step + 1,
                stats.grad_norm,
                stats.loss
            );
        }
        let clip_scale = if grad_clip > 0.0 && stats.grad_norm > grad_clip { grad_clip / (stats.grad_norm + 1e-6) } else { 1.0 };
        self.step += 1;
        for unit in &mut self.units {
            for slot in &unit.layout.params {
                let hp = AdamWHyper { lr: lr as f32, weight_decay: if slot.decays { hyper.weight_decay } else { 0.0 }, ..*hyper };
                let r = slot.range();
                kernels::adamw_step(
                    &mut unit.master[r.clone()],
                    &unit.grad[r.clone()],
                    &mut unit.exp_avg[r.clone()],
                    &mut unit.exp_avg_sq[r],
                    &hp,
                    self.step,
                    clip_scale as f32,
                )?;
            }
            unit.refresh_params(self.compute_dtype, &self.device)?;
        }
        Ok(())
    }

    /// The accumulated gradient of parameter `name` (after `compute_gradients`).
    pub fn gradient(&self, name: &str) -> Option<&[f32]> {
        self.units
            .iter()
            .find_map(|u| u.layout.params.iter().find(|s| s.name == name).map(|s| &u.grad[s.range()]))
    }

    /// One micro-batch: returns its loss contribution (summed over its tokens / `divisor`).
    fn forward_backward(&mut self, micro: &MicroBatch, divisor: f64, stats: &mut StepStats) -> Result<f64> {
        let t0 = Instant::now();
        let (root, blocks) = self.units.split_first_mut().ok_or_else(|| candle_core::Error::Msg("model has no units".into()))?;
        let root_params = root.param_tensors();

        // Forward: the embedding keeps its graph; each block starts from a fresh leaf so that its
        // backward can be run on its own.
        let embedded = self.model.embed(&root_params, &micro.inputs)?;
        let mut block_inputs: Vec<Vec<Var>> = Vec::with_capacity(blocks.len());
        let mut block_outputs: Vec<Carry> = Vec::with_capacity(blocks.len());
        let mut carry: Vec<Var> = embedded.iter().map(|t| Var::from_tensor(&t.detach())).collect::<Result<_>>()?;
        for (i, unit) in blocks.iter().enumerate() {
            let input: Carry = carry.iter().map(|v| v.as_tensor().clone()).collect();
            let output = self.model.block(i, &unit.param_tensors(), &input)?;
            let next = output.iter().map(|t| Var::from_tensor(&t.detach())).collect::<Result<_>>()?;
            block_inputs.push(std::mem::replace(&mut carry, next));
            block_outputs.push(output);
        }
        let last: Carry = carry.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = self.model.head_loss(&root_params, &last, &micro.targets, Some(divisor))?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        stats.forward_s += t0.elapsed().as_secs_f64();

        // Backward, one unit at a time, from the loss down to the embedding.
        let t1 = Instant::now();
        let grads = loss.backward()?;
        root.accumulate_grads(&grads)?;
        let mut upstream = upstream_of(&grads, &carry)?;
        drop((grads, loss));
        for (i, unit) in blocks.iter_mut().enumerate().rev() {
            let output = block_outputs.pop().ok_or_else(|| candle_core::Error::Msg("missing block output".into()))?;
            let grads = vjp(&output, &upstream)?.backward()?;
            unit.accumulate_grads(&grads)?;
            let inputs = block_inputs.pop().ok_or_else(|| candle_core::Error::Msg(format!("missing input of block {i}")))?;
            upstream = upstream_of(&grads, &inputs)?;
        }
        let grads = vjp(&embedded, &upstream)?.backward()?;
        root.accumulate_grads(&grads)?;
        stats.backward_s += t1.elapsed().as_secs_f64();
        Ok(loss_value)
    }

    /// Mean loss over `batches` with no graph (validation).
    pub fn eval_loss(&self, batches: &[MicroBatch]) -> Result<f64> {
        let mut total = 0.0;
        let mut tokens = 0usize;
        for b in batches {
            let n = b.targets.elem_count();
            let carry = self.forward_no_grad(&b.inputs)?;
            let loss = self.model.head_loss(&self.units[0].detached_params(), &carry, &b.targets, Some(1.0))?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            tokens += n;
        }
        if tokens == 0 {
            bail!("eval_loss: no batches");
        }
        Ok(total / tokens as f64)
    }

    /// Logits (B, T, V) with no graph (sampling).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let carry = self.forward_no_grad(ids)?;
        self.model.logits(&self.units[0].detached_params(), &carry)
    }

    fn forward_no_grad(&self, ids: &Tensor) -> Result<Carry> {
        let mut carry = self.model.embed(&self.units[0].detached_params(), ids)?;
        for (i, unit) in self.units[1..].iter().enumerate() {
            carry = self.model.block(i, &unit.detached_params(), &carry)?;
        }
        Ok(carry)
    }

    /// Replace every parameter's master weights with `params` (name -> (shape, f32 values)); every
    /// parameter of the model must be present with its exact shape. Moments are reset.
    pub fn load_parameters(&mut self, params: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
        for unit in &mut self.units {
            for slot in &unit.layout.params {
                match params.get(&slot.name) {
                    Some((shape, values)) if shape == &slot.shape && values.len() == slot.numel => {
                        unit.master[slot.range()].copy_from_slice(values)
                    }
                    Some((shape, _)) => bail!("parameter {}: shape {shape:?} in the file, the model expects {:?}", slot.name, slot.shape),
                    None => bail!("parameter {} is missing from the weights", slot.name),
                }
            }
            unit.exp_avg.fill(0.0);
            unit.exp_avg_sq.fill(0.0);
            unit.refresh_params(self.compute_dtype, &self.device)?;
        }
        Ok(())
    }

    /// Every parameter as (name, shape, fp32 values), in unit order (export and tests).
    pub fn named_parameters(&self) -> Vec<(&str, &[usize], &[f32])> {
        self.units
            .iter()
            .flat_map(|u| u.layout.params.iter().map(move |s| (s.name.as_str(), s.shape.as_slice(), &u.master[s.range()])))
            .collect()
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
    total.ok_or_else(|| candle_core::Error::Msg("backward: empty carry".into()))
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
