//! Prompt/completion fine-tuning data: JSONL files with one `{"prompt": ..., "completion": ...}`
//! object per line, trained with the loss on completion tokens only.
//!
//! `CompletionDataset::load` reads every file, tokenizes each line's prompt and completion
//! separately (so the boundary between them is exact) and appends the tokenizer's end-of-sequence
//! token to the completion when it has one (`eos_token` of a `tokenizer_config.json` beside the
//! `tokenizer.json`, else an added token named `<|endoftext|>`, `</s>`, `<|end_of_text|>` or
//! `<|im_end|>`; a character vocabulary has none). The last `val_fraction` of each file's
//! examples (at least one when the fraction is positive) are held out for validation.
//!
//! A row of a batch is one example cut or padded to `context` positions: inputs are its tokens
//! (padding repeats id 0, which the causal model never lets earlier positions see), and the
//! target of position `t` is token `t + 1` when that token belongs to the completion, else
//! `IGNORE_TARGET` (prompt tokens and padding). Every example must keep at least one counted
//! target within the context; one that does not is an error naming its file and line.
//!
//! `CompletionLoader` draws `batch` examples per step uniformly with replacement from a seeded
//! xoshiro256**, like `BatchLoader`, and saves/restores the same `LoaderState` (with `examples`
//! set), so a checkpointed run resumes bitwise. `val_batches` walks the validation examples in
//! order; the last batch is filled with rows of ignored targets, which count for nothing.
//! Malformed lines (not JSON, not an object, a missing or non-string key, an empty completion)
//! are errors naming the file and line number.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fsutil::read_file;
use crate::loader::{Batch, LoaderState, Split};
use crate::prepare::TokenizerSpec;
use crate::rng::Xoshiro256;
use crate::tokenizer::{CharTokenizer, Tokenizer};

/// The target of a position the loss skips; equal to `kernels::IGNORE_INDEX` (`u32::MAX`).
pub const IGNORE_TARGET: u32 = u32::MAX;

/// Token id written into the inputs of padding positions (never a counted target's context).
const PAD_INPUT: u32 = 0;

/// Added-token names taken as end-of-sequence when no `tokenizer_config.json` says otherwise.
const EOS_NAMES: [&str; 4] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>"];

/// True when `path` names a `.jsonl` file (by extension).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "jsonl")
}

/// One prompt/completion pair, tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Prompt tokens followed by completion tokens (and EOS, when the tokenizer has one).
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt.
    pub prompt_len: usize,
    /// Index into `CompletionDataset::sources` of the file it came from.
    pub source: usize,
    /// 1-based line number in that file.
    pub line: usize,
}

impl Example {
    /// Targets this example counts in a row of `context` positions.
    pub fn counted_targets(&self, context: usize) -> usize {
        self.tokens.len().min(context + 1).saturating_sub(self.prompt_len.max(1))
    }
}

/// One input file and how many of its examples went to each split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionSource {
    pub path: PathBuf,
    pub train_examples: usize,
    pub val_examples: usize,
}

/// Prompt/completion examples of one or more JSONL files, tokenized; see the module docs.
#[derive(Debug, Clone)]
pub struct CompletionDataset {
    tokenizer: Tokenizer,
    eos: Option<u32>,
    sources: Vec<CompletionSource>,
    train: Arc<[Example]>,
    val: Arc<[Example]>,
}

/// A parsed line before tokenization.
struct RawExample {
    prompt: String,
    completion: String,
    line: usize,
}

impl CompletionDataset {
    /// Reads and tokenizes `inputs` (JSONL files, in the order given) with the tokenizer `spec`
    /// names (`Char` builds a character vocabulary over every prompt and completion).
    pub fn load(inputs: &[PathBuf], spec: TokenizerSpec, val_fraction: f64) -> Result<Self> {
        if !(val_fraction.is_finite() && (0.0..1.0).contains(&val_fraction)) {
            return Err(Error::new(format!(
                "val_fraction must be in [0, 1), got {val_fraction}"
            )));
        }
        if inputs.is_empty() {
            return Err(Error::new("no input files given; pass .jsonl files of {\"prompt\", \"completion\"} lines"));
        }
        let mut parsed = Vec::with_capacity(inputs.len());
        for path in inputs {
            if !is_jsonl(path) || path.is_dir() {
                return Err(Error::at(
                    path,
                    "prompt/completion data must be .jsonl files; do not mix them with text files or folders",
                ));
            }
            parsed.push(parse_file(path)?);
        }
        let (tokenizer, eos) = match &spec {
            TokenizerSpec::Char => {
                let all: String = parsed
                    .iter()
                    .flatten()
                    .flat_map(|r| [r.prompt.as_str(), r.completion.as_str()])
                    .collect();
                (Tokenizer::Char(CharTokenizer::from_text(&all)?), None)
            }
            TokenizerSpec::HuggingFace(path) => {
                let tokenizer = Tokenizer::from_huggingface_file(path)?;
                let eos = eos_token_id(&tokenizer, Some(path))?;
                (tokenizer, eos)
            }
        };

        let (mut train, mut val, mut sources) = (Vec::new(), Vec::new(), Vec::new());
        for (source, (path, raws)) in inputs.iter().zip(parsed).enumerate() {
            let mut examples = Vec::with_capacity(raws.len());
            for raw in raws {
                let at = |what: &str, e: Error| {
                    Error::at(path, format!("line {}: cannot tokenize the {what}: {}", raw.line, e.message()))
                };
                let mut tokens = tokenizer.encode(&raw.prompt).map_err(|e| at("prompt", e))?;
                let prompt_len = tokens.len();
                tokens.extend(tokenizer.encode(&raw.completion).map_err(|e| at("completion", e))?);
                tokens.extend(eos);
                examples.push(Example { tokens, prompt_len, source, line: raw.line });
            }
            let n = examples.len();
            let n_val = if val_fraction > 0.0 {
                ((n as f64 * val_fraction).round() as usize).clamp(1, n)
            } else {
                0
            };
            let val_part = examples.split_off(n - n_val);
            sources.push(CompletionSource { path: path.clone(), train_examples: examples.len(), val_examples: val_part.len() });
            train.extend(examples);
            val.extend(val_part);
        }
        if train.is_empty() {
            return Err(Error::new(format!(
                "no training examples left after holding out val_fraction {val_fraction} of each file; \
                 add examples or lower data.val_fraction"
            )));
        }
        Ok(Self { tokenizer, eos, sources, train: train.into(), val: val.into() })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// The end-of-sequence id appended to every completion, if the tokenizer has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn sources(&self) -> &[CompletionSource] {
        &self.sources
    }

    /// The examples of `split`.
    pub fn examples(&self, split: Split) -> &[Example] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// The file an example came from (for error messages).
    fn path_of(&self, example: &Example) -> &Path {
        self.sources.get(example.source).map_or(Path::new("<unknown>"), |s| s.path.as_path())
    }

    /// Rejects zero sizes and any example of `split` with no counted target within `context`.
    fn check(&self, split: Split, batch: usize, context: usize) -> Result<()> {
        if batch == 0 || context == 0 {
            return Err(Error::new(format!(
                "batch ({batch}) and context ({context}) must both be at least 1"
            )));
        }
        for ex in self.examples(split) {
            if ex.counted_targets(context) == 0 {
                return Err(Error::at(
                    self.path_of(ex),
                    format!(
                        "line {}: no completion token is predicted within a sequence of {context} tokens \
                         (prompt {} tokens, {} in all); shorten the prompt or raise train.seq_len",
                        ex.line,
                        ex.prompt_len,
                        ex.tokens.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A seeded loader drawing `batch` training examples per batch, rows of `context` positions.
    pub fn loader(&self, batch: usize, context: usize, seed: u64) -> Result<CompletionLoader> {
        self.check(Split::Train, batch, context)?;
        Ok(CompletionLoader {
            examples: Arc::clone(&self.train),
            batch,
            context,
            seed,
            batches_drawn: 0,
            rng: Xoshiro256::seed_from_u64(seed),
        })
    }

    /// Up to `max_batches` batches of `batch` validation examples, in order; the last one is
    /// completed with rows whose targets are all ignored. No validation examples is an error.
    pub fn val_batches(&self, batch: usize, context: usize, max_batches: usize) -> Result<Vec<Batch>> {
        self.check(Split::Val, batch, context)?;
        if self.val.is_empty() {
            return Err(Error::new(
                "no validation examples; set data.val_fraction above 0 so each file holds out at least one",
            ));
        }
        Ok(self
            .val
            .chunks(batch)
            .take(max_batches)
            .map(|chunk| {
                let mut out = empty_batch(batch, context);
                chunk.iter().for_each(|ex| push_example(&mut out, ex));
                (chunk.len()..batch).for_each(|_| push_ignored_row(&mut out));
                out
            })
            .collect())
    }
}

fn empty_batch(rows: usize, context: usize) -> Batch {
    Batch { inputs: Vec::with_capacity(rows * context), targets: Vec::with_capacity(rows * context), rows: 0, context }
}

/// Appends `ex` as one row: see the module docs for inputs, targets and padding.
fn push_example(batch: &mut Batch, ex: &Example) {
    let n = ex.tokens.len();
    for t in 0..batch.context {
        batch.inputs.push(ex.tokens.get(t).copied().unwrap_or(PAD_INPUT));
        let next = t + 1;
        batch.targets.push(if next < n && next >= ex.prompt_len { ex.tokens[next] } else { IGNORE_TARGET });
    }
    batch.rows += 1;
}

/// Appends a row of padding whose targets are all ignored.
fn push_ignored_row(batch: &mut Batch) {
    batch.inputs.extend(std::iter::repeat_n(PAD_INPUT, batch.context));
    batch.targets.extend(std::iter::repeat_n(IGNORE_TARGET, batch.context));
    batch.rows += 1;
}

/// Endless random batches of training examples; see the module docs.
#[derive(Debug, Clone)]
pub struct CompletionLoader {
    examples: Arc<[Example]>,
    batch: usize,
    context: usize,
    seed: u64,
    batches_drawn: u64,
    rng: Xoshiro256,
}

impl CompletionLoader {
    /// Global batches drawn so far.
    pub fn batches_drawn(&self) -> u64 {
        self.batches_drawn
    }

    /// The next global batch: `batch` examples drawn uniformly with replacement.
    pub fn next_batch(&mut self) -> Batch {
        let mut out = empty_batch(self.batch, self.context);
        for _ in 0..self.batch {
            let i = self.rng.next_below(self.examples.len() as u64) as usize;
            push_example(&mut out, &self.examples[i]);
        }
        self.batches_drawn += 1;
        out
    }

    fn split_tokens(&self) -> u64 {
        self.examples.iter().map(|e| e.tokens.len() as u64).sum()
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            split: Split::Train,
            seed: self.seed,
            batch: self.batch,
            context: self.context,
            split_tokens: self.split_tokens(),
            batches_drawn: self.batches_drawn,
            rng: self.rng.state(),
            examples: Some(self.examples.len() as u64),
        }
    }

    /// Continues from `state`, taken from a loader over the same examples with the same shape.
    pub fn restore(&mut self, state: &LoaderState) -> Result<()> {
        let mine = (Split::Train, self.batch, self.context, self.split_tokens(), Some(self.examples.len() as u64));
        let theirs = (state.split, state.batch, state.context, state.split_tokens, state.examples);
        if mine != theirs {
            return Err(Error::new(format!(
                "cannot restore loader state for (split, batch, context, split tokens, examples) = {theirs:?} \
                 into a prompt/completion loader with {mine:?}; resume with the same data, batch and seq_len"
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

/// The end-of-sequence id of `tokenizer`: `eos_token` of the `tokenizer_config.json` beside
/// `tokenizer_json` when there is one, else the first of the usual end-of-text names that is a
/// token; `None` for a character vocabulary or when neither gives one.
pub fn eos_token_id(tokenizer: &Tokenizer, tokenizer_json: Option<&Path>) -> Result<Option<u32>> {
    let Tokenizer::HuggingFace(hf) = tokenizer else {
        return Ok(None);
    };
    if let Some(config) = tokenizer_json.and_then(Path::parent).map(|dir| dir.join("tokenizer_config.json")) {
        if config.is_file() {
            let bytes = read_file(&config, "tokenizer config", "check the file")?;
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::at(&config, format!("not valid JSON: {e}")))?;
            let name = match value.get("eos_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            };
            if let Some(name) = name {
                return match hf.token_to_id(&name) {
                    Some(id) => Ok(Some(id)),
                    None => Err(Error::at(&config, format!("eos_token {name:?} is not a token of the tokenizer"))),
                };
            }
        }
    }
    Ok(EOS_NAMES.iter().find_map(|name| hf.token_to_id(name)))
}

/// Parses one JSONL file: blank lines are skipped; every other line must be an object with
/// string "prompt" and non-empty string "completion" (other keys are ignored).
fn parse_file(path: &Path) -> Result<Vec<RawExample>> {
    let bytes = read_file(path, "input file", "check the path")?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::at(
            path,
            format!(
                "input file is not valid UTF-8 (first bad byte at offset {}); convert it to UTF-8 first",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| Error::at(path, format!("line {line_no}: {what}; each line must be {{\"prompt\": \"...\", \"completion\": \"...\"}}"));
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let obj = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let field = |key: &str| -> Result<String> {
            match obj.get(key) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(bad(format!("\"{key}\" is not a string"))),
                None => Err(bad(format!("missing key \"{key}\""))),
            }
        };
        let prompt = field("prompt")?;
        let completion = field("completion")?;
        if completion.is_empty() {
            return Err(bad("empty \"completion\"".into()));
        }
        out.push(RawExample { prompt, completion, line: line_no });
    }
    if out.is_empty() {
        return Err(Error::at(path, "no examples (the file is empty or blank); remove it from the inputs"));
    }
    Ok(out)
}
