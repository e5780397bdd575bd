//! The `BlockModel` trait: what the engine needs from a model to drive it unit by unit.

use candle_core::{Result, Tensor};

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
}
