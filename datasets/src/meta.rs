//! `meta.json`: the description of a prepared dataset folder, and the folder's file names.
//!
//! `prepare` writes it last, so its presence marks a complete dataset; `TokenDataset::open`
//! checks the shards and tokenizer against it (token counts, vocab size, tokenizer kind), so a
//! folder mixing files from two runs is an error rather than a silently different dataset.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::read_file;
use crate::tokenizer::TokenizerKind;

/// Name of the training shard inside a dataset folder.
pub const TRAIN_SHARD_FILE: &str = "train.bin";
/// Name of the validation shard inside a dataset folder.
pub const VAL_SHARD_FILE: &str = "val.bin";
/// Name of the metadata file inside a dataset folder.
pub const META_FILE: &str = "meta.json";
/// The dataset folder layout version this build writes and reads.
pub const DATASET_FORMAT_VERSION: u32 = 1;

/// One input text file that went into the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The path as given to `prepare` (or found in a given folder).
    pub path: String,
    pub bytes: u64,
    /// Tokens of this file in `train.bin` / `val.bin`.
    pub train_tokens: u64,
    pub val_tokens: u64,
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub format_version: u32,
    pub tokenizer: TokenizerKind,
    pub vocab_size: usize,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// Fraction of each file's tokens, taken from its end, that went to validation.
    pub val_fraction: f64,
    pub sources: Vec<SourceFile>,
}

const FIX: &str = "run `zero-candle prepare` to (re)build the dataset";

impl DatasetMeta {
    /// Reads and checks `<dir>/meta.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(META_FILE);
        let bytes = read_file(&path, "dataset metadata", FIX)?;
        let meta: DatasetMeta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::at(&path, format!("corrupt dataset metadata: {e}; {FIX}")))?;
        if meta.format_version != DATASET_FORMAT_VERSION {
            return Err(Error::at(
                &path,
                format!(
                    "dataset format version {}, this build reads version {DATASET_FORMAT_VERSION}; {FIX}",
                    meta.format_version
                ),
            ));
        }
        Ok(meta)
    }

    pub(crate) fn to_json_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| Error::at(path, format!("cannot serialize dataset metadata: {e}")))
    }
}
