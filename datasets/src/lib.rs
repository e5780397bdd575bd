//! Data for zero-candle: text in, token shards on disk, batches out.
//!
//! `prepare` tokenizes text files (character-level or a Hugging Face `tokenizer.json`) into a
//! self-contained dataset folder (`train.bin`, `val.bin`, the tokenizer, `meta.json`);
//! `TokenDataset::open` reads and checks it; `BatchLoader` draws seeded, resumable random
//! windows for training and `ValBatches` fixed windows for evaluation; `CompletionDataset`
//! reads prompt/completion JSONL for fine-tuning with the loss on completion tokens only. The
//! shard format and the loader follow nanoGPT's `prepare.py`/`get_batch` and llm.c's token
//! `.bin` files. Every failure is a `datasets::Error` naming the file and saying what to do; nothing here panics
//! on bad input.

mod completions;
mod dataset;
mod error;
mod fsutil;
mod loader;
mod meta;
mod prepare;
pub mod rng;
mod shard;
mod tokenizer;

pub use completions::{
    eos_token_id, is_jsonl, CompletionDataset, CompletionLoader, CompletionSource, Example,
    IGNORE_TARGET,
};
pub use dataset::TokenDataset;
pub use error::{Error, Result};
pub use loader::{Batch, BatchLoader, LoaderState, Split, ValBatches};
pub use meta::{
    DatasetMeta, SourceFile, DATASET_FORMAT_VERSION, META_FILE, TRAIN_SHARD_FILE, VAL_SHARD_FILE,
};
pub use prepare::{prepare, PrepareSummary, TokenizerSpec};
pub use shard::{
    read_shard, token_width_bytes, write_shard, Shard, SHARD_FORMAT_VERSION, SHARD_HEADER_BYTES,
    SHARD_MAGIC,
};
pub use tokenizer::{CharTokenizer, Tokenizer, TokenizerKind, CHAR_VOCAB_FILE, HF_TOKENIZER_FILE};
