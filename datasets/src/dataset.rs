//! `TokenDataset`: a prepared dataset folder opened for training.
//!
//! Opening reads `meta.json`, both shards and the tokenizer, and cross-checks them (token
//! counts, vocab size), so a corrupt or mixed-up folder fails here, naming the file, before any
//! compute is spent. The token arrays are shared (`Arc`) with the loaders built from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::loader::{BatchLoader, Split, ValBatches};
use crate::meta::{DatasetMeta, META_FILE, TRAIN_SHARD_FILE, VAL_SHARD_FILE};
use crate::shard::read_shard;
use crate::tokenizer::Tokenizer;

const FIX: &str = "re-run `zero-candle prepare` to rebuild the dataset";

/// A dataset folder written by `prepare`, loaded into memory.
#[derive(Debug, Clone)]
pub struct TokenDataset {
    dir: PathBuf,
    meta: DatasetMeta,
    tokenizer: Tokenizer,
    train: Arc<[u32]>,
    val: Arc<[u32]>,
}

impl TokenDataset {
    /// Opens and checks the dataset folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::at(
                dir,
                "dataset folder not found; run `zero-candle prepare` to create it",
            ));
        }
        let meta = DatasetMeta::read(dir)?;
        let meta_path = dir.join(META_FILE);
        let tokenizer = Tokenizer::load(dir, meta.tokenizer)?;
        if tokenizer.vocab_size() != meta.vocab_size {
            return Err(Error::at(
                dir.join(meta.tokenizer.file_name()),
                format!(
                    "tokenizer has {} tokens but {} says vocab size {}; {FIX}",
                    tokenizer.vocab_size(),
                    meta_path.display(),
                    meta.vocab_size
                ),
            ));
        }
        let train = Self::open_shard(dir, TRAIN_SHARD_FILE, meta.train_tokens, &meta)?;
        let val = Self::open_shard(dir, VAL_SHARD_FILE, meta.val_tokens, &meta)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            tokenizer,
            train,
            val,
        })
    }

    /// Reads one shard and checks its length and vocab size against `meta.json`.
    fn open_shard(
        dir: &Path,
        name: &str,
        expected_tokens: u64,
        meta: &DatasetMeta,
    ) -> Result<Arc<[u32]>> {
        let path = dir.join(name);
        let shard = read_shard(&path)?;
        if shard.vocab_size != meta.vocab_size || shard.tokens.len() as u64 != expected_tokens {
            return Err(Error::at(
                &path,
                format!(
                    "shard has {} tokens with vocab size {}, but {} says {expected_tokens} tokens with vocab size {} \
                     (files from different runs?); {FIX}",
                    shard.tokens.len(),
                    shard.vocab_size,
                    META_FILE,
                    meta.vocab_size
                ),
            ));
        }
        Ok(shard.tokens.into())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &DatasetMeta {
        &self.meta
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.meta.vocab_size
    }

    /// All tokens of `split`.
    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    fn shared_tokens(&self, split: Split) -> Arc<[u32]> {
        match split {
            Split::Train => Arc::clone(&self.train),
            Split::Val => Arc::clone(&self.val),
        }
    }

    /// A seeded random-window loader over `split` (usually `Split::Train`).
    pub fn loader(
        &self,
        split: Split,
        batch: usize,
        context: usize,
        seed: u64,
    ) -> Result<BatchLoader> {
        BatchLoader::new(self.shared_tokens(split), split, batch, context, seed)
    }

    /// Up to `max_batches` deterministic batches from the start of the validation split.
    pub fn val_batches(
        &self,
        batch: usize,
        context: usize,
        max_batches: usize,
    ) -> Result<ValBatches> {
        ValBatches::new(
            self.shared_tokens(Split::Val),
            Split::Val,
            batch,
            context,
            max_batches,
        )
    }
}
