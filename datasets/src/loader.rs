//! Batches of (inputs, targets) token windows for training and evaluation.
//!
//! Training: `BatchLoader` draws `batch` random windows of `context + 1` tokens per step from
//! a seeded xoshiro256** (as nanoGPT's `get_batch` draws random offsets); inputs are the first
//! `context` tokens of each window and targets the last `context`, i.e. inputs shifted by one.
//! The sequence depends only on (seed, split length, batch, context), and `state()`/`restore()`
//! capture it so a resumed run sees exactly the batches it would have seen.
//!
//! Evaluation: `ValBatches` walks non-overlapping windows from the start of a split, so every
//! evaluation of the same checkpoint scores the same tokens.
//!
//! Data parallel: every rank runs the same loader with the same seed and keeps its rows of the
//! global batch with `Batch::rank_rows`, so the global batch is independent of `world_size`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Xoshiro256;

/// Which split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

/// `rows` windows of `context` tokens, flattened row-major: both vectors are `(rows, context)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    /// `targets[r * context + t] == inputs[r * context + t + 1]` within a row; the last target
    /// of a row is the token after the window.
    pub targets: Vec<u32>,
    pub rows: usize,
    pub context: usize,
}

impl Batch {
    /// `(inputs, targets)`, each `(rows, context)` flattened.
    pub fn into_parts(self) -> (Vec<u32>, Vec<u32>) {
        (self.inputs, self.targets)
    }

    /// The rows of this (global) batch that belong to `rank` of `world_size`: a contiguous block
    /// of `rows / world_size` rows. `rows` must divide evenly.
    pub fn rank_rows(&self, rank: usize, world_size: usize) -> Result<Batch> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::new(format!(
                "rank {rank} is not in a world of size {world_size}"
            )));
        }
        if !self.rows.is_multiple_of(world_size) {
            return Err(Error::new(format!(
                "global batch of {} rows does not split evenly over world_size {world_size}; use a multiple",
                self.rows
            )));
        }
        let rows_shard = self.rows / world_size;
        let range = rank * rows_shard * self.context..(rank + 1) * rows_shard * self.context;
        Ok(Batch {
            inputs: self.inputs[range.clone()].to_vec(),
            targets: self.targets[range].to_vec(),
            rows: rows_shard,
            context: self.context,
        })
    }

    /// Appends the window starting at `start` as one more row.
    fn push_window(&mut self, tokens: &[u32], start: usize) {
        let window = &tokens[start..start + self.context + 1];
        self.inputs.extend_from_slice(&window[..self.context]);
        self.targets.extend_from_slice(&window[1..]);
        self.rows += 1;
    }

    fn with_capacity(rows: usize, context: usize) -> Batch {
        Batch {
            inputs: Vec::with_capacity(rows * context),
            targets: Vec::with_capacity(rows * context),
            rows: 0,
            context,
        }
    }
}

/// Rejects zero sizes and splits too short for one window of `context + 1` tokens.
fn check_shape(split: Split, split_tokens: usize, batch: usize, context: usize) -> Result<()> {
    if batch == 0 || context == 0 {
        return Err(Error::new(format!(
            "batch ({batch}) and context ({context}) must both be at least 1"
        )));
    }
    if split_tokens < context + 1 {
        return Err(Error::new(format!(
            "{split} split has {split_tokens} tokens, fewer than one window of context + 1 = {}; \
             use a shorter context or more data",
            context + 1
        )));
    }
    Ok(())
}

/// Everything needed to resume a `BatchLoader` at the exact same point; store it in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub split: Split,
    pub seed: u64,
    pub batch: usize,
    pub context: usize,
    /// Length of the split the loader was drawing from (guards against a re-prepared dataset).
    pub split_tokens: u64,
    /// Global batches drawn so far.
    pub batches_drawn: u64,
    /// xoshiro256** state after `batches_drawn` batches.
    pub rng: [u64; 4],
    /// Prompt/completion data (`CompletionLoader`): the number of training examples; `None`
    /// for token windows (and in checkpoints written before prompt/completion data existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<u64>,
}

/// Endless random batches from one split; see the module docs.
#[derive(Debug, Clone)]
pub struct BatchLoader {
    tokens: Arc<[u32]>,
    split: Split,
    batch: usize,
    context: usize,
    seed: u64,
    batches_drawn: u64,
    rng: Xoshiro256,
}

impl BatchLoader {
    /// A loader over `tokens` (the whole `split`) drawing `batch` windows of `context + 1` tokens
    /// per batch, seeded by `seed`.
    pub fn new(
        tokens: Arc<[u32]>,
        split: Split,
        batch: usize,
        context: usize,
        seed: u64,
    ) -> Result<Self> {
        check_shape(split, tokens.len(), batch, context)?;
        Ok(Self {
            tokens,
            split,
            batch,
            context,
            seed,
            batches_drawn: 0,
            rng: Xoshiro256::seed_from_u64(seed),
        })
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Global batches drawn so far.
    pub fn batches_drawn(&self) -> u64 {
        self.batches_drawn
    }

    /// The next global batch of `batch` random windows (each start uniform over all windows).
    pub fn next_batch(&mut self) -> Batch {
        let starts = (self.tokens.len() - self.context) as u64;
        let mut out = Batch::with_capacity(self.batch, self.context);
        for _ in 0..self.batch {
            let start = self.rng.next_below(starts) as usize;
            out.push_window(&self.tokens, start);
        }
        self.batches_drawn += 1;
        out
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            split: self.split,
            seed: self.seed,
            batch: self.batch,
            context: self.context,
            split_tokens: self.tokens.len() as u64,
            batches_drawn: self.batches_drawn,
            rng: self.rng.state(),
            examples: None,
        }
    }

    /// Continues from `state` (taken from a loader over the same split with the same shape):
    /// the next batch is the one that loader would have drawn next.
    pub fn restore(&mut self, state: &LoaderState) -> Result<()> {
        if state.examples.is_some() {
            return Err(Error::new(
                "the loader state is of prompt/completion (.jsonl) data; resume with the same data",
            ));
        }
        let mine = (
            self.split,
            self.batch,
            self.context,
            self.tokens.len() as u64,
        );
        let theirs = (state.split, state.batch, state.context, state.split_tokens);
        if mine != theirs {
            return Err(Error::new(format!(
                "cannot restore loader state for (split, batch, context, split tokens) = {theirs:?} \
                 into a loader with {mine:?}; resume with the same dataset, batch and context"
            )));
        }
        let rng = Xoshiro256::from_state(state.rng)
            .ok_or_else(|| Error::new("loader state has an all-zero RNG state, which is impossible; the checkpoint is corrupt"))?;
        self.seed = state.seed;
        self.batches_drawn = state.batches_drawn;
        self.rng = rng;
        Ok(())
    }
}

impl Iterator for BatchLoader {
    type Item = Batch;

    /// Never ends.
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// Deterministic evaluation batches: window `w` starts at token `w * context` (windows share
/// one boundary token, inputs never overlap), `batch` windows per batch, full batches only.
#[derive(Debug, Clone)]
pub struct ValBatches {
    tokens: Arc<[u32]>,
    batch: usize,
    context: usize,
    next: usize,
    count: usize,
}

impl ValBatches {
    /// Up to `max_batches` full batches from the start of `tokens` (the whole `split`). A split
    /// too short for one full batch is an error naming the split and sizes.
    pub fn new(
        tokens: Arc<[u32]>,
        split: Split,
        batch: usize,
        context: usize,
        max_batches: usize,
    ) -> Result<Self> {
        check_shape(split, tokens.len(), batch, context)?;
        let windows = (tokens.len() - 1) / context;
        if windows < batch {
            return Err(Error::new(format!(
                "{split} split has {} tokens: {windows} windows of context {context}, fewer than one batch of {batch}; \
                 use a smaller batch or context, or prepare with a larger val fraction",
                tokens.len()
            )));
        }
        let count = (windows / batch).min(max_batches);
        Ok(Self {
            tokens,
            batch,
            context,
            next: 0,
            count,
        })
    }
}

impl Iterator for ValBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.count {
            return None;
        }
        let mut out = Batch::with_capacity(self.batch, self.context);
        for row in 0..self.batch {
            out.push_window(&self.tokens, (self.next * self.batch + row) * self.context);
        }
        self.next += 1;
        Some(out)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for ValBatches {}
