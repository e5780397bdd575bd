//! `prepare`: text files in, a self-contained dataset folder out.
//!
//! The folder holds `train.bin` and `val.bin` (token shards, see `shard`), the tokenizer
//! (`vocab.json` or a byte-exact copy of `tokenizer.json`) and `meta.json`. The last
//! `val_fraction` of *each* file's tokens goes to validation, so validation covers every source
//! rather than only the last file. Files are concatenated without separators, in the order given
//! (a folder contributes its `.txt` files sorted by name), so the output is deterministic.
//!
//! Crash safety: every output is first written and synced under `<name>.tmp`; only when all of
//! them exist are they renamed into place, `meta.json` last after removing any old one. An
//! interrupted run therefore leaves either the old dataset, or a folder without `meta.json`
//! (which `TokenDataset::open` rejects), never a half-written shard under its final name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::{read_file, Staged};
use crate::meta::{
    DatasetMeta, SourceFile, DATASET_FORMAT_VERSION, META_FILE, TRAIN_SHARD_FILE, VAL_SHARD_FILE,
};
use crate::shard::stage_shard;
use crate::tokenizer::{CharTokenizer, Tokenizer};

/// Which tokenizer `prepare` builds or loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// Character vocabulary built from all the input text.
    Char,
    /// A Hugging Face `tokenizer.json` at this path (copied into the dataset folder).
    HuggingFace(PathBuf),
}

/// What `prepare` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    pub out_dir: PathBuf,
    /// The contents of the `meta.json` written.
    pub meta: DatasetMeta,
}

/// One input file, read and checked.
struct SourceText {
    path: PathBuf,
    text: String,
}

/// Tokenizes `inputs` (text files, or folders whose `.txt` files are taken in sorted order) and
/// writes a dataset folder at `out_dir`; see the module docs for the layout and guarantees.
pub fn prepare(
    inputs: &[PathBuf],
    out_dir: &Path,
    spec: TokenizerSpec,
    val_fraction: f64,
) -> Result<PrepareSummary> {
    if !(val_fraction.is_finite() && (0.0..1.0).contains(&val_fraction)) {
        return Err(Error::new(format!(
            "val_fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let sources = list_input_files(inputs)?
        .into_iter()
        .map(read_source)
        .collect::<Result<Vec<_>>>()?;

    let (tokenizer, tokenizer_bytes) = match &spec {
        TokenizerSpec::Char => {
            let all: String = sources.iter().map(|s| s.text.as_str()).collect();
            let tokenizer = Tokenizer::Char(CharTokenizer::from_text(&all)?);
            let bytes = tokenizer.to_json_bytes(&out_dir.join(tokenizer.kind().file_name()))?;
            (tokenizer, bytes)
        }
        TokenizerSpec::HuggingFace(path) => {
            let tokenizer = Tokenizer::from_huggingface_file(path)?;
            let bytes = read_file(
                path,
                "tokenizer.json",
                "pass the path of a Hugging Face tokenizer.json",
            )?;
            (tokenizer, bytes)
        }
    };
    let vocab_size = tokenizer.vocab_size();

    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut source_meta = Vec::with_capacity(sources.len());
    for source in &sources {
        let tokens = tokenizer
            .encode(&source.text)
            .map_err(|e| Error::at(&source.path, format!("cannot tokenize: {}", e.message())))?;
        let val_count = val_token_count(tokens.len(), val_fraction);
        let (train_part, val_part) = tokens.split_at(tokens.len() - val_count);
        train.extend_from_slice(train_part);
        val.extend_from_slice(val_part);
        source_meta.push(SourceFile {
            path: source.path.display().to_string(),
            bytes: source.text.len() as u64,
            train_tokens: train_part.len() as u64,
            val_tokens: val_part.len() as u64,
        });
    }

    let meta = DatasetMeta {
        format_version: DATASET_FORMAT_VERSION,
        tokenizer: tokenizer.kind(),
        vocab_size,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        val_fraction,
        sources: source_meta,
    };
    write_dataset(out_dir, &train, &val, &tokenizer, &tokenizer_bytes, &meta)?;
    Ok(PrepareSummary {
        out_dir: out_dir.to_path_buf(),
        meta,
    })
}

/// Tokens of a file of `count` tokens that go to validation: `round(count * fraction)`, but at
/// least one when `fraction > 0` so that every file is represented.
fn val_token_count(count: usize, fraction: f64) -> usize {
    if fraction <= 0.0 || count == 0 {
        return 0;
    }
    ((count as f64 * fraction).round() as usize).clamp(1, count)
}

/// Expands folders into their `.txt` files (sorted by name) and rejects missing inputs and
/// files listed twice.
fn list_input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        return Err(Error::new(
            "no input files given; pass text files or folders of .txt files",
        ));
    }
    let mut files = Vec::new();
    for input in inputs {
        let metadata = std::fs::metadata(input).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::at(input, "input not found; check the path"),
            _ => Error::at(input, format!("cannot read input: {e}")),
        })?;
        if !metadata.is_dir() {
            files.push(input.clone());
            continue;
        }
        let entries = std::fs::read_dir(input)
            .map_err(|e| Error::at(input, format!("cannot list folder: {e}")))?;
        let mut found = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| Error::at(input, format!("cannot list folder: {e}")))?
                .path();
            if path.is_file() && path.extension().is_some_and(|ext| ext == "txt") {
                found.push(path);
            }
        }
        if found.is_empty() {
            return Err(Error::at(
                input,
                "folder holds no .txt files; pass text files or a folder of .txt files",
            ));
        }
        found.sort();
        files.extend(found);
    }
    let mut seen = BTreeSet::new();
    for file in &files {
        let key = std::fs::canonicalize(file).unwrap_or_else(|_| file.clone());
        if !seen.insert(key) {
            return Err(Error::at(
                file,
                "input file listed twice (directly or through its folder); list it once",
            ));
        }
    }
    Ok(files)
}

/// Reads one input; empty and non-UTF-8 files are errors naming the file.
fn read_source(path: PathBuf) -> Result<SourceText> {
    let bytes = read_file(&path, "input file", "check the path")?;
    if bytes.is_empty() {
        return Err(Error::at(
            &path,
            "input file is empty; remove it from the inputs",
        ));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(SourceText { path, text }),
        Err(e) => Err(Error::at(
            &path,
            format!(
                "input file is not valid UTF-8 (first bad byte at offset {}); convert it to UTF-8 first",
                e.utf8_error().valid_up_to()
            ),
        )),
    }
}

/// Stages every output under a temporary name, then renames them into place, `meta.json` last.
fn write_dataset(
    out_dir: &Path,
    train: &[u32],
    val: &[u32],
    tokenizer: &Tokenizer,
    tokenizer_bytes: &[u8],
    meta: &DatasetMeta,
) -> Result<()> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::at(out_dir, format!("cannot create the output folder: {e}")))?;
    let meta_path = out_dir.join(META_FILE);
    let meta_bytes = meta.to_json_bytes(&meta_path)?;
    let tokenizer_path = out_dir.join(tokenizer.kind().file_name());

    let mut staged: Vec<Staged> = Vec::with_capacity(4);
    let staging: Result<()> = (|| {
        staged.push(stage_shard(
            &out_dir.join(TRAIN_SHARD_FILE),
            train,
            meta.vocab_size,
        )?);
        staged.push(stage_shard(
            &out_dir.join(VAL_SHARD_FILE),
            val,
            meta.vocab_size,
        )?);
        staged.push(Staged::write(&tokenizer_path, |w| {
            std::io::Write::write_all(w, tokenizer_bytes)
        })?);
        staged.push(Staged::write(&meta_path, |w| {
            std::io::Write::write_all(w, &meta_bytes)
        })?);
        Ok(())
    })();
    if let Err(e) = staging {
        staged.into_iter().for_each(Staged::discard);
        return Err(e);
    }

    // From here the old dataset (if any) is replaced: mark the folder incomplete first.
    match std::fs::remove_file(&meta_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            staged.into_iter().for_each(Staged::discard);
            return Err(Error::at(
                &meta_path,
                format!("cannot replace the old dataset metadata: {e}"),
            ));
        }
    }
    let mut staged = staged.into_iter();
    while let Some(file) = staged.next() {
        if let Err(e) = file.commit() {
            staged.for_each(Staged::discard);
            return Err(e);
        }
    }
    Ok(())
}
