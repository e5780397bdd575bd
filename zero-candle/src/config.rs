//! The run configuration: TOML with every field documented and defaulted, unknown keys rejected
//! (serde `deny_unknown_fields`), and `--set section.key=value` overrides validated the same way
//! (each override is parsed as a TOML value and merged into the document before deserializing, so
//! a typo in a key or a wrong type is the same clear error wherever it comes from).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a run needs. `Config::default()` is the bundled-Shakespeare run of the README.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub parallel: ParallelConfig,
    pub checkpoint: CheckpointConfig,
    pub sample: SampleConfig,
}

/// `[checkpoint]`: sharded checkpoints in `<train.out_dir>/step_NNNNNN` (see docs/ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many steps; 0 = only at the end and on SIGINT/SIGTERM. Default 500.
    pub every_steps: usize,
    /// Keep the newest this many checkpoints; 0 = keep all. Default 2.
    pub keep_last: usize,
    /// Save when the run reaches train.max_steps. Default true.
    pub at_end: bool,
    /// Resume from this checkpoint folder, or "latest" (the newest in train.out_dir). Any world
    /// size and ZeRO stage can resume any checkpoint of the same model. Default "" (start fresh).
    pub resume: String,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 500, keep_last: 2, at_end: true, resume: String::new() }
    }
}

/// `[parallel]`: ranks and ZeRO sharding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Ranks (threads on the CPU, each with its share of every batch). train.batch_size must be
    /// a multiple of it. Default 1.
    pub world_size: usize,
    /// ZeRO stage: 0 replicated, 1 optimizer state sharded, 2 also gradients, 3 also parameters
    /// (gathered per block, next block prefetched). Default 0.
    pub zero_stage: u8,
    /// Stage 3: recompute each block in the backward (activation checkpointing) instead of keeping
    /// its graph and gathered parameters. Default: true at stage 3, false otherwise.
    pub recompute: Option<bool>,
    /// Gradient buffers: "f32" (default; exact accumulation) or "bf16" (2 bytes per gradient, the
    /// ZeRO paper's accounting). Reductions are f32 either way.
    pub grad_dtype: String,
    /// Seconds a collective waits for the other ranks before failing with an error that names
    /// the operation, unit and rank. Default 300.
    pub comm_timeout_s: f64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self { world_size: 1, zero_stage: 0, recompute: None, grad_dtype: "f32".into(), comm_timeout_s: 300.0 }
    }
}

/// `[model]`: which GPT-2 and its sizes. A preset gives every size; a size set here overrides it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// GPT-2 preset: "char-small" (6 layers, 6 heads, width 384, context 256), "gpt2-mini"
    /// (4/4/256, context 256) or "gpt2-124m" (12/12/768, context 1024). Default "gpt2-mini".
    pub preset: String,
    /// Override the preset's number of blocks. Default: the preset's.
    pub n_layer: Option<usize>,
    /// Override the preset's number of attention heads. Default: the preset's.
    pub n_head: Option<usize>,
    /// Override the preset's width (must be a multiple of n_head). Default: the preset's.
    pub n_embd: Option<usize>,
    /// Override the preset's context length (learned positions). Default: the preset's.
    pub context: Option<usize>,
    /// Start from this model folder (Hugging Face config.json + safetensors + tokenizer.json:
    /// GPT-2 or Llama) instead of a freshly initialized preset: fine-tuning. Its architecture
    /// replaces the preset and the size keys, and its tokenizer.json is used for the data when
    /// data.tokenizer is "char". Default "" (train from scratch).
    pub init_from: PathBuf,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { preset: "gpt2-mini".into(), n_layer: None, n_head: None, n_embd: None, context: None, init_from: PathBuf::new() }
    }
}

/// `[data]`: where the text is and how it is tokenized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Text files or folders of .txt files to train on. Default ["data/shakespeare"] (bundled).
    pub sources: Vec<PathBuf>,
    /// "char" for a character vocabulary built from the text, or the path of a Hugging Face
    /// tokenizer.json. Default "char".
    pub tokenizer: String,
    /// Folder of prepared shards (`zero-candle prepare` output). Empty: prepare `sources` into
    /// `<train.out_dir>/data` at the start of the run (reused when already there). Default "".
    pub prepared_dir: PathBuf,
    /// Fraction of each source file held out (its end) for validation. Default 0.1.
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { sources: vec![PathBuf::from("data/shakespeare")], tokenizer: "char".into(), prepared_dir: PathBuf::new(), val_fraction: 0.1 }
    }
}

/// `[train]`: optimization and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps. Default 1000 (about 7 minutes on 2 cores with the default model).
    pub max_steps: usize,
    /// Sequences per micro-batch. Default 16.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step (tokens per step = batch_size *
    /// grad_accum_steps * seq_len). Default 1.
    pub grad_accum_steps: usize,
    /// Tokens per sequence; 0 = the model's context. Default 64 (characters: enough context for
    /// words and verse lines, and 4x cheaper attention than 256).
    pub seq_len: usize,
    /// Peak learning rate after warmup. Default 3e-3 (small models tolerate a high rate).
    pub lr: f64,
    /// Final learning rate of the cosine decay (reached at max_steps). Default 1e-4.
    pub min_lr: f64,
    /// Linear warmup steps from 0 to lr. Default 50.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay, on 2-D parameters only. Default 0.1.
    pub weight_decay: f64,
    /// AdamW beta1. Default 0.9.
    pub beta1: f64,
    /// AdamW beta2. Default 0.99 (nanoGPT's choice for small character models).
    pub beta2: f64,
    /// AdamW epsilon. Default 1e-8.
    pub eps: f64,
    /// Clip the global gradient norm to this value; 0 disables. Default 1.0.
    pub grad_clip: f64,
    /// Evaluate the validation loss every this many steps (and at the end); 0 = only at the end.
    /// Default 200.
    pub eval_interval: usize,
    /// Validation batches per evaluation. Default 20.
    pub eval_batches: usize,
    /// Print a log line every this many steps. Default 50.
    pub log_interval: usize,
    /// Seed for initialization and data order. Default 1337.
    pub seed: u64,
    /// Where metrics.jsonl, the prepared data and the final model go. Default "runs/default".
    pub out_dir: PathBuf,
    /// Compute threads (rayon); 0 = all cores. Default 0.
    pub threads: usize,
    /// Compute dtype: "f32", "bf16", or "f16" with dynamic loss scaling (start 2^16, window 1000,
    /// hysteresis 2, minimum 1; a step whose gradients overflow on any rank is skipped). Master
    /// weights, moments, gradients and reductions stay f32. Default "f32".
    pub precision: String,
    /// f32 matrix products on the CPU: "f32" (exact) or "bf16" (inputs rounded to bf16, sums in
    /// f32, on CPUs with AMX; elsewhere it stays f32). What PyTorch calls
    /// float32_matmul_precision "highest" vs "medium". Default "f32".
    pub matmul_precision: String,
    /// Where the model trains: "cpu", "cuda" (GPU 0) or "cuda:N" (needs a binary built with
    /// `--features cuda`; one GPU, so parallel.world_size 1). On a GPU the model, the fp32 master
    /// weights, AdamW moments and gradients all live on the device; use precision "bf16" there.
    /// Default "cpu".
    pub device: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            batch_size: 16,
            grad_accum_steps: 1,
            seq_len: 64,
            lr: 3e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 200,
            eval_batches: 20,
            log_interval: 50,
            seed: 1337,
            out_dir: PathBuf::from("runs/default"),
            threads: 0,
            precision: "f32".into(),
            matmul_precision: "f32".into(),
            device: "cpu".into(),
        }
    }
}

/// `[sample]`: the text printed at the end of training and by `zero-candle sample`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// Text the sample continues. Default "\n" (a fresh line).
    pub prompt: String,
    /// Tokens to generate. Default 300.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy. Default 0.8.
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 = all. Default 0.
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probabilities reach top_p; 1 = all.
    /// Default 1.
    pub top_p: f64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { prompt: "\n".into(), max_new_tokens: 300, temperature: 0.8, top_k: 0, top_p: 1.0 }
    }
}

/// A configuration error: names the key or file and says what to do.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

impl Config {
    /// Load `file` (if any), apply `overrides` ("section.key=value", value in TOML syntax; a bare
    /// word is taken as a string), then validate.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_with_defaults(file, &[], overrides)
    }

    /// As `load`, with `defaults` ("section.key=value") applied first where the file does not set
    /// the key (a command's own defaults, e.g. fine-tuning's lower learning rate).
    pub fn load_with_defaults(file: Option<&Path>, defaults: &[String], overrides: &[String]) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
                text.parse()
                    .map_err(|e| ConfigError(format!("config file {} is not valid TOML: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        for item in defaults {
            let key = item.split_once('=').map_or(item.as_str(), |(k, _)| k.trim());
            let set = key.split_once('.').is_some_and(|(section, k)| doc.get(section).and_then(|t| t.get(k)).is_some());
            if !set {
                apply_override(&mut doc, item)?;
            }
        }
        for item in overrides {
            apply_override(&mut doc, item)?;
        }
        let source = file.map(|p| p.display().to_string()).unwrap_or_else(|| "--set overrides".into());
        let config: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e| ConfigError(format!("invalid configuration (from {source}): {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that serde cannot express (ranges, relations between fields).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        let bad = |key: &str, why: &str| Err(ConfigError(format!("invalid value for {key}: {why}")));
        if t.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if t.grad_accum_steps == 0 {
            return bad("train.grad_accum_steps", "must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", "must be a positive number");
        }
        if t.min_lr < 0.0 || t.min_lr > t.lr {
            return bad("train.min_lr", "must be between 0 and train.lr");
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return bad("train.beta1/beta2", "must be in [0, 1)");
        }
        if t.grad_clip < 0.0 || t.weight_decay < 0.0 || t.eps <= 0.0 {
            return bad("train.grad_clip/weight_decay/eps", "must be >= 0 (eps > 0)");
        }
        if t.eval_batches == 0 {
            return bad("train.eval_batches", "must be at least 1");
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return bad("data.val_fraction", "must be in (0, 1)");
        }
        let p = &self.parallel;
        if p.world_size == 0 {
            return bad("parallel.world_size", "must be at least 1");
        }
        if t.batch_size % p.world_size != 0 {
            return bad("train.batch_size", &format!("{} is not a multiple of parallel.world_size {}", t.batch_size, p.world_size));
        }
        if p.zero_stage > 3 {
            return bad("parallel.zero_stage", "must be 0, 1, 2 or 3");
        }
        if !(p.comm_timeout_s > 0.0 && p.comm_timeout_s.is_finite()) {
            return bad("parallel.comm_timeout_s", "must be a positive number of seconds");
        }
        if !matches!(p.grad_dtype.as_str(), "f32" | "bf16") {
            return bad("parallel.grad_dtype", "must be \"f32\" or \"bf16\"");
        }
        if !matches!(t.precision.as_str(), "f32" | "bf16" | "f16") {
            return bad("train.precision", "must be \"f32\", \"bf16\" or \"f16\"");
        }
        if !matches!(t.matmul_precision.as_str(), "f32" | "bf16") {
            return bad("train.matmul_precision", "must be \"f32\" or \"bf16\"");
        }
        if !valid_device(&t.device) {
            return bad("train.device", "must be \"cpu\", \"cuda\" or \"cuda:N\"");
        }
        if t.device != "cpu" && p.world_size != 1 {
            return bad(
                "train.device",
                &format!(
                    "{} trains on one GPU (parallel.world_size must be 1, not {}): ZeRO stages across GPUs need the NCCL communicator, not implemented yet",
                    t.device, p.world_size
                ),
            );
        }
        if !(self.sample.top_p > 0.0 && self.sample.top_p <= 1.0) {
            return bad("sample.top_p", "must be in (0, 1]");
        }
        if self.sample.temperature < 0.0 {
            return bad("sample.temperature", "must be >= 0 (0 = greedy)");
        }
        Ok(())
    }

    /// The resolved configuration as TOML (written next to the run's outputs).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not serialize config: {e}\n"))
    }
}

/// Whether `value` names a device: "cpu", "cuda" or "cuda:N" (opened by `train::parse_device`).
pub fn valid_device(value: &str) -> bool {
    match value {
        "cpu" | "cuda" => true,
        v => v.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
    }
}

fn apply_override(doc: &mut toml::Table, item: &str) -> Result<(), ConfigError> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| ConfigError(format!("--set {item:?}: expected section.key=value")))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() != 2 || path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError(format!("--set {item:?}: the key must be section.key, e.g. train.max_steps")));
    }
    // Parse the value as TOML; a bare word (not valid TOML) is a string, so `--set data.tokenizer=char` works.
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    };
    let section = doc
        .entry(path[0].to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match section {
        toml::Value::Table(t) => {
            t.insert(path[1].to_string(), value);
            Ok(())
        }
        _ => Err(ConfigError(format!("--set {item:?}: {} is not a section", path[0]))),
    }
}
