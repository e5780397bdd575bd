//! `zero-candle export <checkpoint> --out <folder> [--dtype f32|bf16]`: a sharded training
//! checkpoint (any world size and stage) to a Hugging Face model folder: config.json and
//! model.safetensors with GPT2LMHeadModel names and layouts, and the tokenizer (see model_io.rs).
//! scripts/check_hf_export.py loads such a folder in transformers and compares losses.

use std::path::Path;

use crate::checkpoint::{self, BoxError};
use crate::config::Config;
use crate::model_io::{self, ExportDtype};

/// Export the checkpoint folder `checkpoint` to `out`; returns the number of parameters written.
pub fn export_checkpoint(checkpoint: &Path, out: &Path, dtype: ExportDtype) -> Result<usize, BoxError> {
    let manifest = checkpoint::read_manifest(checkpoint)?;
    let params = checkpoint::full_parameters(checkpoint, &manifest)?;
    let tokenizer = checkpoint::tokenizer(checkpoint, &manifest)?;
    // The window the model was trained on, from the run's resolved config (0 = its context).
    let seq_len = toml::from_str::<Config>(&manifest.config).map(|c| c.train.seq_len).unwrap_or(0);
    let train_seq_len = if seq_len == 0 { manifest.model.context() } else { seq_len };
    let named: Vec<(&str, &[usize], &[f32])> = params.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    model_io::save_model_folder_as(out, &manifest.model, train_seq_len, &named, &tokenizer, dtype)?;
    Ok(params.iter().map(|p| p.2.len()).sum())
}
