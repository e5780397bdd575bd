//! The `BlockModel` trait: what the engine needs from a model to drive it unit by unit.

use candle_core::{bail, DType, Result, Tensor, D};

/// How a parameter is initialized (the engine draws the numbers from its seeded RNG, so that
/// initialization is the same whatever the world size).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal { std: f64 },
    Zeros,
    Ones,
}

/// One parameter of a unit: its full (Hugging Face) name, shape and initialization.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Weight decay applies to matrices (2-D: linear weights, embeddings), not to biases and norm
    /// gains: nanoGPT's rule, by shape instead of by name lists.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// A sharding unit: the root (embeddings, final norm, head) or one block.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub name: String,
    pub params: Vec<ParamSpec>,
}

impl UnitSpec {
    pub fn numel(&self) -> usize {
        self.params.iter().map(ParamSpec::numel).sum()
    }
}

/// The activations that flow from one block to the next (a list, so that models with extra
/// streams, such as DiT conditioning, need no special case).
pub type Carry = Vec<Tensor>;

/// What a model's explicit block backward keeps from the forward (activations, softmax
/// probabilities): opaque to the engine, handed back to [`BlockModel::block_backward`].
pub type BlockTape = Box<dyn std::any::Any + Send>;

/// A model split into a root unit and `num_blocks()` block units. Parameter tensors are passed in
/// the order of the unit's `ParamSpec`s, in the compute dtype.
pub trait BlockModel: Send + Sync {
    /// Unit 0 is the root; unit `i + 1` is block `i`.
    fn units(&self) -> Vec<UnitSpec>;
    fn num_blocks(&self) -> usize;
    /// Token ids (B, T) u32 to the first carry.
    fn embed(&self, root: &[Tensor], ids: &Tensor) -> Result<Carry>;
    /// Block `index` (0-based) applied to a carry.
    fn block(&self, index: usize, params: &[Tensor], carry: &Carry) -> Result<Carry>;
    /// Logits (B, T, V) from the last carry.
    fn logits(&self, root: &[Tensor], carry: &Carry) -> Result<Tensor>;
    /// Summed next-token cross-entropy over counted targets divided by `divisor` (or by the number
    /// of counted targets when `None`), from the last carry.
    fn head_loss(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor>;

    /// Whether [`BlockModel::block_forward_train`] and [`BlockModel::block_backward`] handle blocks
    /// computed in `dtype` on `device`. The engine then runs blocks without candle's autograd:
    /// llm.c's approach, which skips the zero-filled gradient and the add that candle's backward
    /// spends on every graph edge. Otherwise it differentiates `block` with autograd.
    fn supports_explicit_backward(&self, dtype: DType, device: &candle_core::Device) -> bool {
        let _ = (dtype, device);
        false
    }

    /// Block `index` on detached tensors, returning its output and what its backward needs.
    fn block_forward_train(&self, index: usize, params: &[Tensor], carry: &Carry) -> Result<(Carry, BlockTape)> {
        let _ = (index, params, carry);
        bail!("no explicit backward for this model")
    }

    /// Gradients of block `index`'s input carry and of each of its parameters (in `ParamSpec`
    /// order) for `upstream`, the gradient of its output, from the forward's tape.
    fn block_backward(&self, index: usize, params: &[Tensor], tape: BlockTape, upstream: &Carry) -> Result<(Carry, Vec<Tensor>)> {
        let _ = (index, params, tape, upstream);
        bail!("no explicit backward for this model")
    }

    /// With an explicit backward: `head_loss` on detached tensors, with a tape for `head_backward`.
    fn head_loss_train(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<(Tensor, BlockTape)> {
        let _ = (root, carry, targets, divisor);
        bail!("no explicit backward for this model")
    }

    /// Gradients of the last carry and of the root parameters (in `ParamSpec` order; None where
    /// the head does not use one) for `dloss`, the gradient of the loss.
    fn head_backward(&self, root: &[Tensor], tape: BlockTape, dloss: f32) -> Result<(Carry, Vec<Option<Tensor>>)> {
        let _ = (root, tape, dloss);
        bail!("no explicit backward for this model")
    }

    /// Whether `forward_cached` is implemented (callers fall back to full forwards otherwise).
    fn supports_kv_cache(&self) -> bool {
        false
    }

    /// Inference with a key/value cache: logits (B, T, V) for `ids` (B, T) placed at positions
    /// `cache.len()..cache.len() + T`, given every unit's parameters (`params[0]` the root,
    /// `params[i + 1]` block i), attending to the cached positions and to each other causally.
    /// Appends the new positions' keys and values to `cache`. No gradients (sampling only).
    fn forward_cached(&self, params: &[Vec<Tensor>], ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let _ = (params, ids, cache);
        bail!("no KV cache for this model")
    }
}

/// Keys and values of the positions seen so far, per block: K and V of shape (B, KV_heads,
/// T_cached, D) each (key/value heads before any grouped-query repetition, and keys after rotary
/// embedding where the model has it), grown along T by `append`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cached positions: the length of block 0's entry (a forward appends to every block, so the
    /// blocks agree between forwards), 0 when empty.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget every position (start a new sequence).
    pub fn clear(&mut self) {
        self.layers.clear();
    }

    /// Append `k` and `v` (B, KV, T, D) to block `layer`'s entry and return the whole (cached and
    /// new) K and V.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = match &self.layers[layer] {
            Some((ck, cv)) => (Tensor::cat(&[ck, k], 2)?, Tensor::cat(&[cv, v], 2)?),
            None => (k.contiguous()?, v.contiguous()?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Attention of new queries q (B, H, T, D) over keys k and values v (B, H, S, D), S = t0 + T,
/// where query i sits at position t0 + i and sees keys 0..=t0 + i: softmax(q k^T / sqrt(D)) v
/// from plain candle ops, the softmax in f32. No gradient is needed, so the fused kernel's
/// square-scores restriction (T == S) does not apply.
pub fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = q.dims4()?;
    let s = k.dim(2)?;
    if s < t {
        bail!("cached_attention: {s} keys for {t} queries; the keys must include the queries' own");
    }
    let t0 = s - t;
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? / (d as f64).sqrt())?; // (B, H, T, S)
    // A single new query sees every key, so the mask is needed only for a multi-token forward.
    let scores = if t > 1 {
        let mask: Vec<f32> = (0..t).flat_map(|i| (0..s).map(move |j| if j <= t0 + i { 0.0 } else { f32::NEG_INFINITY })).collect();
        scores.broadcast_add(&Tensor::from_vec(mask, (t, s), q.device())?)?
    } else {
        scores
    };
    // Every row keeps at least key 0 visible, so its max is finite and exp(-inf - max) = 0.
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.to_dtype(v.dtype())?.matmul(&v.contiguous()?)
}

