//! The engine's state as device tensors (`StateStorage::Tensors`, what a CUDA engine uses): each
//! unit's fp32 master weights, AdamW moments and gradient buffer are flat 1-D candle tensors on
//! the engine's device (`TensorState`), so the step never copies them to the host: gradients are
//! added on the device, the global norm (clipping, the f16 overflow check) is a device reduction
//! read back as one scalar per step, and AdamW runs in place through
//! `kernels::adamw_step_tensors` (the CUDA kernel on a GPU; on the CPU the same `adamw_step` the
//! host path runs). Only checkpoints, `full_parameters` and `gradient` copy to the host.
//!
//! World size 1 only (checked in `Engine::with_storage`): every range is then the whole padded
//! buffer and every collective is the identity, so all stages run the same arithmetic as the host
//! path's stage 0 (stage 3 still builds its parameters per use and drops them, as it would gather
//! them). More ranks need a communicator over device buffers (NCCL).
//!
//! Rounding follows the host path element for element (an f32 add into an f32 buffer; f32 add
//! then round to nearest even into a bf16 one; the same AdamW), so on the CPU this path gives the
//! host path's numbers bitwise, except the gradient norm, a sum in f64 whose order may differ
//! (tests/tests/tensor_state.rs).

use candle_core::{bail, DType, Result, Tensor, Var};
use kernels::AdamWHyper;
use models::BlockModel;

use super::unit::{grad_dtype_of, intersect, TensorState};
use super::Engine;
use crate::comm::Comm;
use crate::stage::Buffer;

fn state<'a>(ts: &'a Option<TensorState>, unit: &str) -> Result<&'a TensorState> {
    ts.as_ref().ok_or_else(|| candle_core::Error::Msg(format!("unit {unit}: no tensor state")))
}

impl<M: BlockModel, C: Comm> Engine<M, C> {
    /// Compute-dtype Vars of a unit from its master tensor (a copy each: the master is updated in
    /// place by AdamW).
    pub(super) fn tensor_vars(&self, unit: usize) -> Result<Vec<Var>> {
        let u = &self.units[unit];
        let ts = state(&u.tensors, &u.layout.unit)?;
        u.layout
            .params
            .iter()
            .map(|slot| {
                let t = ts.master.narrow(0, slot.offset, slot.numel)?.reshape(slot.shape.as_slice())?.to_dtype(self.options.compute_dtype)?;
                Var::from_tensor(&t)
            })
            .collect()
    }

    /// Held parameters after an update: every unit's Vars, or none at stage 3 (built per use).
    pub(super) fn tensor_refresh(&mut self) -> Result<()> {
        for i in 0..self.units.len() {
            let params = if self.options.stage.shards(Buffer::Params) { None } else { Some(self.tensor_vars(i)?) };
            self.units[i].params = params;
        }
        Ok(())
    }

    /// Zero every unit's gradient buffer (start of a step).
    pub(super) fn tensor_zero_grads(&mut self) -> Result<()> {
        let dtype = grad_dtype_of(self.options.grad_dtype);
        for u in &mut self.units {
            let n = u.grad_range.len();
            let device = self.device.clone();
            if let Some(ts) = u.tensors.as_mut() {
                ts.grad = Tensor::zeros(n, dtype, &device)?;
            }
        }
        Ok(())
    }

    /// Add a unit's parameter gradients (in parameter order; None: no gradient reached it) into
    /// its gradient tensor: the unit's flat f32 gradient is assembled on the device, added in f32
    /// and stored in the buffer's dtype.
    pub(super) fn tensor_add_grads(&mut self, unit: usize, grads: &[Option<Tensor>]) -> Result<()> {
        let grad_dtype = self.options.grad_dtype;
        let u = &mut self.units[unit];
        if grads.len() != u.layout.params.len() {
            bail!("unit {}: {} gradients for {} parameters", u.layout.unit, grads.len(), u.layout.params.len());
        }
        if grads.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut pieces = Vec::with_capacity(grads.len() + 1);
        let mut pos = 0;
        for (slot, g) in u.layout.params.iter().zip(grads) {
            if slot.offset != pos {
                bail!("unit {}: parameter {} at offset {}, expected {pos}", u.layout.unit, slot.name, slot.offset);
            }
            pieces.push(match g {
                Some(g) if g.elem_count() == slot.numel => g.to_dtype(DType::F32)?.flatten_all()?,
                Some(g) => bail!("gradient of {}: {} elements, expected {}", slot.name, g.elem_count(), slot.numel),
                None => Tensor::zeros(slot.numel, DType::F32, &self.device)?,
            });
            pos += slot.numel;
        }
        let ts = u.tensors.as_mut().ok_or_else(|| candle_core::Error::Msg(format!("unit {}: no tensor state", u.layout.unit)))?;
        let n = ts.grad.elem_count();
        if pos > n {
            bail!("unit {}: parameters cover {pos} elements, the gradient buffer {n}", u.layout.unit);
        }
        if pos < n {
            pieces.push(Tensor::zeros(n - pos, DType::F32, &self.device)?);
        }
        let full = Tensor::cat(&pieces, 0)?;
        ts.grad = match grad_dtype_of(grad_dtype) {
            DType::F32 => (&ts.grad + &full)?,
            dtype => (ts.grad.to_dtype(DType::F32)? + &full)?.to_dtype(dtype)?,
        };
        Ok(())
    }

    /// Sum of squared gradients over every unit's shard range, reduced on the device in f64 and
    /// read back once. Non-finite when any gradient is (the f16 overflow check).
    pub(super) fn tensor_sum_squares(&self) -> Result<f64> {
        let mut total: Option<Tensor> = None;
        for u in &self.units {
            let ts = state(&u.tensors, &u.layout.unit)?;
            let local = intersect(&u.shard, &u.opt_range);
            if local.is_empty() {
                continue;
            }
            let g = ts.grad.narrow(0, local.start - u.opt_range.start, local.len())?;
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        match total {
            Some(t) => t.to_scalar::<f64>(),
            None => Ok(0.0),
        }
    }

    /// One AdamW step on every unit's tensors, per parameter (weight decay on 2-D parameters
    /// only), then wait for the device so that the step's time is the optimizer's.
    pub(super) fn tensor_adamw(&mut self, lr: f64, hyper: &AdamWHyper, grad_scale: f32) -> Result<()> {
        for u in &self.units {
            let ts = state(&u.tensors, &u.layout.unit)?;
            let base = u.opt_range.start;
            for slot in &u.layout.params {
                let r = intersect(&slot.range(), &u.opt_range);
                if r.is_empty() {
                    continue;
                }
                let hp = AdamWHyper { lr: lr as f32, weight_decay: if slot.decays { hyper.weight_decay } else { 0.0 }, ..*hyper };
                let (start, len) = (r.start - base, r.len());
                kernels::adamw_step_tensors(
                    &ts.master.narrow(0, start, len)?,
                    &ts.grad.narrow(0, start, len)?,
                    &ts.exp_avg.narrow(0, start, len)?,
                    &ts.exp_avg_sq.narrow(0, start, len)?,
                    &hp,
                    self.step,
                    grad_scale,
                )?;
            }
        }
        Ok(())
    }

    /// `range` (relative to `opt_range`) of a unit's master, exp_avg and exp_avg_sq, on the host.
    pub(super) fn tensor_state_to_host(&self, unit: usize, start: usize, len: usize) -> Result<[Vec<f32>; 3]> {
        let u = &self.units[unit];
        let ts = state(&u.tensors, &u.layout.unit)?;
        let host = |t: &Tensor| t.narrow(0, start, len)?.to_vec1::<f32>();
        Ok([host(&ts.master)?, host(&ts.exp_avg)?, host(&ts.exp_avg_sq)?])
    }

    /// A unit's whole master buffer on the host.
    pub(super) fn tensor_master_to_host(&self, unit: usize) -> Result<Vec<f32>> {
        let u = &self.units[unit];
        state(&u.tensors, &u.layout.unit)?.master.to_vec1::<f32>()
    }

    /// `range` (relative to the buffer) of a unit's gradient tensor, as f32 on the host.
    pub(super) fn tensor_grad_to_host(&self, unit: usize, start: usize, len: usize) -> Result<Vec<f32>> {
        let u = &self.units[unit];
        state(&u.tensors, &u.layout.unit)?.grad.narrow(0, start, len)?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }

    /// Replace a unit's master weights and moments (host values over `opt_range`).
    pub(super) fn tensor_set_state(&mut self, unit: usize, master: Vec<f32>, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>) -> Result<()> {
        let device = self.device.clone();
        let u = &mut self.units[unit];
        let n = u.opt_range.len();
        let ts = u.tensors.as_mut().ok_or_else(|| candle_core::Error::Msg(format!("unit {}: no tensor state", u.layout.unit)))?;
        ts.master = Tensor::from_vec(master, n, &device)?;
        ts.exp_avg = Tensor::from_vec(exp_avg, n, &device)?;
        ts.exp_avg_sq = Tensor::from_vec(exp_avg_sq, n, &device)?;
        Ok(())
    }
}
