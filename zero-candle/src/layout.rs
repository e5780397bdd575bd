//! Flat layout of one sharding unit (llm.c's "one buffer and a table of offsets"): every parameter
//! of the unit laid end to end in one f32 buffer, padded to a multiple of the world size so that
//! rank r owns the contiguous slice [r * numel / world, (r + 1) * numel / world). The table of
//! (name, shape, offset) is what a checkpoint records, so a buffer can be re-sliced for another
//! world size.

use models::{Init, UnitSpec};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// One parameter's place in its unit's flat buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
    /// Weight decay applies (2-D parameters only).
    pub decays: bool,
    #[serde(skip)]
    pub init: Option<Init>,
}

impl ParamSlot {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel
    }
}

/// A unit's parameters flattened into one buffer of `padded_numel` elements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatLayout {
    pub unit: String,
    pub params: Vec<ParamSlot>,
    /// Elements used by parameters.
    pub numel: usize,
    /// `numel` rounded up to a multiple of the world size (the tail is zero padding).
    pub padded_numel: usize,
}

impl FlatLayout {
    pub fn new(spec: &UnitSpec, world_size: usize) -> Self {
        let mut offset = 0;
        let params = spec
            .params
            .iter()
            .map(|p| {
                let slot = ParamSlot {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    offset,
                    numel: p.numel(),
                    decays: p.decays(),
                    init: Some(p.init),
                };
                offset += slot.numel;
                slot
            })
            .collect();
        let world_size = world_size.max(1);
        let padded_numel = offset.div_ceil(world_size) * world_size;
        Self { unit: spec.name.clone(), params, numel: offset, padded_numel }
    }

    /// The slice of the flat buffer that `rank` of `world_size` owns.
    pub fn shard_range(&self, rank: usize, world_size: usize) -> Range<usize> {
        let shard = self.padded_numel / world_size.max(1);
        rank * shard..(rank + 1) * shard
    }
}
