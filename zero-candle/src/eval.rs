//! `zero-candle eval`: the mean next-token cross-entropy (and perplexity) of a model folder on a
//! text file or on token sequences, printed as one JSON object. Text is tokenized with the
//! folder's tokenizer and cut into non-overlapping windows of `seq_len` predictions (the last,
//! shorter one included), so every token after the first is predicted exactly once; a `--tokens`
//! file is a JSON array of arrays of token ids, each one sequence whose tokens after the first are
//! predicted from those before them (as transformers' `GPT2LMHeadModel(ids, labels=ids)` does).
//! Rows of a batch are padded at the end with ignored targets: the model is causal, so padding
//! never changes the positions before it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::engine::{Engine, EngineOptions};
use crate::model_io;
use crate::train::{single_rank, BoxError};

/// One row to evaluate: input ids and the next-token targets they predict (same length).
pub type Row = (Vec<u32>, Vec<u32>);

/// What to evaluate on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalInput {
    /// A UTF-8 text file, tokenized with the model folder's tokenizer.
    Text(PathBuf),
    /// A JSON file holding an array of arrays of token ids.
    Tokens(PathBuf),
}

impl EvalInput {
    /// From the `--text` / `--tokens` options: exactly one must be given.
    pub fn from_args(text: Option<PathBuf>, tokens: Option<PathBuf>) -> Result<Self, BoxError> {
        match (text, tokens) {
            (Some(t), None) => Ok(EvalInput::Text(t)),
            (None, Some(t)) => Ok(EvalInput::Tokens(t)),
            _ => Err("give exactly one of --text FILE or --tokens FILE.json".into()),
        }
    }
}

/// Options of `zero-candle eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Model folder (config.json, model.safetensors in f32 or bf16, tokenizer).
    pub model: PathBuf,
    pub input: EvalInput,
    /// Sequences per forward pass.
    pub batch: usize,
    /// `--text` only: predictions per window (0 = the window the model was trained on).
    pub seq_len: usize,
    /// "cpu", "cuda" or "cuda:N" (see `train::parse_device`).
    pub device: String,
}

/// The result, serialized as the one line `zero-candle eval` prints.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Mean nats per predicted token.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Predicted (target) tokens counted.
    pub tokens: usize,
    /// Predicted tokens per second of forward passes.
    pub tokens_per_s: f64,
    /// The model folder.
    pub model: PathBuf,
}

impl EvalReport {
    /// The one-line JSON object printed on stdout.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "model": self.model,
        })
        .to_string()
    }
}

/// Cut `ids` into non-overlapping (inputs, targets) windows of at most `window` predictions:
/// window k predicts tokens k*window+1 ..= (k+1)*window from the ones before them, the last
/// window holding what is left. Every token after the first is a target exactly once.
pub fn text_windows(ids: &[u32], window: usize) -> Vec<Row> {
    if ids.len() < 2 || window == 0 {
        return Vec::new();
    }
    let predicted = ids.len() - 1;
    (0..predicted)
        .step_by(window)
        .map(|start| {
            let end = (start + window).min(predicted);
            (ids[start..end].to_vec(), ids[start + 1..end + 1].to_vec())
        })
        .collect()
}

/// Read a `--tokens` file: a JSON array of arrays of token ids, each with at least 2 and at most
/// `context` tokens, every id below `vocab_size`. Errors name the file and the sequence.
pub fn read_token_sequences(path: &Path, vocab_size: usize, context: usize) -> Result<Vec<Vec<u32>>, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --tokens file {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON ({e}); expected an array of arrays of token ids, e.g. [[1, 2, 3], [4, 5]]", path.display()))?;
    let seqs = value
        .as_array()
        .ok_or_else(|| format!("{}: expected a JSON array of arrays of token ids, e.g. [[1, 2, 3], [4, 5]]", path.display()))?;
    if seqs.is_empty() {
        return Err(format!("{}: no sequences; give at least one array of 2 or more token ids", path.display()).into());
    }
    let mut out = Vec::with_capacity(seqs.len());
    for (i, seq) in seqs.iter().enumerate() {
        let items = seq.as_array().ok_or_else(|| format!("{}: sequence {i} is not an array of token ids", path.display()))?;
        let mut ids = Vec::with_capacity(items.len());
        for (j, item) in items.iter().enumerate() {
            let id = item
                .as_u64()
                .ok_or_else(|| format!("{}: sequence {i}, position {j}: {item} is not a non-negative integer token id", path.display()))?;
            if id >= vocab_size as u64 {
                return Err(format!(
                    "{}: sequence {i}, position {j}: token id {id} is out of range for the model's vocabulary of {vocab_size}",
                    path.display()
                )
                .into());
            }
            ids.push(id as u32);
        }
        if ids.len() < 2 {
            return Err(format!("{}: sequence {i} has {} token(s); each needs at least 2 (one to predict)", path.display(), ids.len()).into());
        }
        if ids.len() > context {
            return Err(format!(
                "{}: sequence {i} has {} tokens, longer than the model's context (n_positions = {context}); split it",
                path.display(),
                ids.len()
            )
            .into());
        }
        out.push(ids);
    }
    Ok(out)
}

/// The (inputs, targets) rows to evaluate, from the options and the loaded model.
fn eval_rows(opts: &EvalOptions, loaded: &model_io::LoadedModel) -> Result<Vec<Row>, BoxError> {
    let context = loaded.config.context();
    match &opts.input {
        EvalInput::Text(path) => {
            let window = if opts.seq_len == 0 { loaded.train_seq_len.min(context) } else { opts.seq_len };
            if window > context {
                return Err(format!("--seq-len {window} is longer than the model's context (n_positions = {context})").into());
            }
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read --text file {}: {e}", path.display()))?;
            let text = String::from_utf8(bytes).map_err(|e| format!("{}: not UTF-8 text ({e})", path.display()))?;
            if text.is_empty() {
                return Err(format!("{}: the text is empty; give a file with at least 2 tokens", path.display()).into());
            }
            let ids = loaded.tokenizer.encode(&text).map_err(|e| format!("{}: cannot tokenize: {e}", path.display()))?;
            if ids.len() < 2 {
                return Err(format!("{}: the text is {} token(s) long; at least 2 are needed (one to predict)", path.display(), ids.len()).into());
            }
            Ok(text_windows(&ids, window))
        }
        EvalInput::Tokens(path) => {
            if opts.seq_len != 0 {
                return Err("--seq-len applies to --text only; a --tokens file gives its own sequences".into());
            }
            let seqs = read_token_sequences(path, loaded.config.vocab_size(), context)?;
            Ok(seqs.into_iter().map(|s| (s[..s.len() - 1].to_vec(), s[1..].to_vec())).collect())
        }
    }
}

/// Load the model folder, run every row through a single-rank f32 engine on `opts.device` and
/// return the mean next-token loss.
pub fn run_eval(opts: &EvalOptions) -> Result<EvalReport, BoxError> {
    if opts.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let device = crate::train::parse_device(&opts.device)?;
    let loaded = model_io::load_model_folder(&opts.model)?;
    let rows = eval_rows(opts, &loaded)?;
    let mut engine = Engine::new(loaded.config.build()?, single_rank()?, 0, device.clone(), EngineOptions::single())?;
    engine.load_parameters(&loaded.params).map_err(|e| format!("{}: {e}", opts.model.display()))?;

    let start = Instant::now();
    let (mut loss_sum, mut count) = (0.0f64, 0usize);
    for chunk in rows.chunks(opts.batch) {
        let t = chunk.iter().map(|(x, _)| x.len()).max().unwrap_or(0);
        let mut inputs = Vec::with_capacity(chunk.len() * t);
        let mut targets = Vec::with_capacity(chunk.len() * t);
        for (x, y) in chunk {
            inputs.extend_from_slice(x);
            inputs.resize(inputs.len() + t - x.len(), 0);
            targets.extend_from_slice(y);
            targets.resize(targets.len() + t - y.len(), kernels::IGNORE_INDEX);
            count += y.len();
        }
        let inputs = Tensor::from_vec(inputs, (chunk.len(), t), &device)?;
        let targets = Tensor::from_vec(targets, (chunk.len(), t), &device)?;
        let logits = engine.logits(&inputs)?;
        let sum = kernels::cross_entropy(&logits, &targets, Some(1.0))?;
        loss_sum += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if count == 0 {
        return Err("nothing to evaluate: no token has a next token".into());
    }
    let loss = loss_sum / count as f64;
    if !loss.is_finite() {
        return Err(format!("{}: the loss is {loss}; the weights hold non-finite values", opts.model.display()).into());
    }
    Ok(EvalReport { loss, perplexity: loss.exp(), tokens: count, tokens_per_s: count as f64 / elapsed.max(1e-9), model: opts.model.clone() })
}

#[cfg(test)]
mod tests {
    use super::text_windows;

    #[test]
    fn windows_cover_every_target_once_with_a_partial_last_one() {
        let ids: Vec<u32> = (0..11).collect();
        let w = text_windows(&ids, 4);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], (vec![0, 1, 2, 3], vec![1, 2, 3, 4]));
        assert_eq!(w[1], (vec![4, 5, 6, 7], vec![5, 6, 7, 8]));
        assert_eq!(w[2], (vec![8, 9], vec![9, 10]));
        assert_eq!(text_windows(&ids, 10), vec![((0..10).collect(), (1..11).collect())]);
        assert!(text_windows(&[3], 4).is_empty());
    }
}
