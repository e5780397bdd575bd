//! ZeRO stages (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
//! Parameter Models") and the one predicate that decides what a stage shards. Nothing else in the
//! engine asks "which stage is this": it asks `stage.shards(Buffer::...)`.

use serde::{Deserialize, Serialize};

/// A kind of per-parameter state a rank may hold in full or as its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// fp32 master weights and AdamW moments.
    OptState,
    /// Gradients (kept between micro-steps).
    Grads,
    /// Compute-dtype parameters (kept between steps).
    Params,
}

/// Stage 0: everything replicated (data parallel). 1: optimizer state sharded. 2: also gradients.
/// 3: also parameters (gathered per block just before use).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ZeroStage(u8);

impl ZeroStage {
    pub fn new(stage: u8) -> Result<Self, String> {
        if stage <= 3 {
            Ok(Self(stage))
        } else {
            Err(format!("ZeRO stage {stage} does not exist; choose 0, 1, 2 or 3"))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// Whether this stage keeps only the rank's shard of `buffer`.
    pub fn shards(self, buffer: Buffer) -> bool {
        match buffer {
            Buffer::OptState => self.0 >= 1,
            Buffer::Grads => self.0 >= 2,
            Buffer::Params => self.0 >= 3,
        }
    }
}

impl std::fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
