//! The `zero-candle` program: train, prepare, sample, bench.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zero_candle::bench::{format_sweep, format_table, run_bench, BenchOptions};
use zero_candle::config::{Config, SampleConfig};
use zero_candle::cpu::init_compute_threads;
use zero_candle::estimate::{format_estimate, Sizes};
use zero_candle::train::{run_sample, run_training, BoxError};

#[derive(Parser)]
#[command(name = "zero-candle", version, about = "Train GPT models on candle with ZeRO-style sharding")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT (defaults: the bundled Shakespeare, character level, on the CPU).
    Train {
        /// TOML config file (see README for every key and its default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set train.max_steps=200 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Resume from a checkpoint folder or `latest`; same as --set checkpoint.resume=...
        #[arg(long)]
        resume: Option<String>,
        /// Ranks (threads on the CPU); same as --set parallel.world_size=N.
        #[arg(long)]
        world: Option<usize>,
        /// ZeRO stage 0-3; same as --set parallel.zero_stage=S.
        #[arg(long)]
        zero_stage: Option<u8>,
        /// cpu, cuda or cuda:N; same as --set train.device=... (use with --set train.precision=bf16).
        #[arg(long)]
        device: Option<String>,
    },
    /// Fine-tune a model folder (Hugging Face GPT-2 or Llama, e.g. from convert-gguf) on text:
    /// `train` with model.init_from and data.sources set, and fine-tuning defaults (lr 1e-4,
    /// min_lr 1e-5, 20 warmup steps, 200 steps, out_dir runs/finetune) where not configured.
    Finetune {
        /// Model folder (config.json, safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Text files or folders of .txt files, or .jsonl files of {"prompt", "completion"} lines
        /// (the loss then counts completion tokens only).
        #[arg(long = "data", required = true)]
        data: Vec<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long)]
        resume: Option<String>,
        #[arg(long)]
        world: Option<usize>,
        #[arg(long)]
        zero_stage: Option<u8>,
        /// cpu, cuda or cuda:N; same as --set train.device=...
        #[arg(long)]
        device: Option<String>,
    },
    /// Tokenize text files into train/val token shards.
    Prepare {
        /// Text files or folders of .txt files.
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// "char" or the path of a Hugging Face tokenizer.json.
        #[arg(long, default_value = "char")]
        tokenizer: String,
        /// Fraction of each file held out for validation.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
    },
    /// Write a checkpoint (any world size and stage) as a Hugging Face model folder.
    Export {
        /// Checkpoint folder (<out_dir>/step_NNNNNN).
        checkpoint: PathBuf,
        /// Output folder (config.json, model.safetensors, tokenizer).
        #[arg(long)]
        out: PathBuf,
        /// Weights dtype: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: zero_candle::model_io::ExportDtype,
    },
    /// Convert a llama-architecture GGUF file to a Hugging Face LlamaForCausalLM folder.
    ConvertGguf {
        /// The .gguf file (its tokenizer.json must sit beside it).
        gguf: PathBuf,
        /// Output folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        out: PathBuf,
        /// Weights dtype: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: zero_candle::model_io::ExportDtype,
    },
    /// Continue a prompt with a trained model folder (<out_dir>/model).
    #[command(visible_alias = "generate")]
    Sample {
        /// Model folder (<out_dir>/model, an export, a Hugging Face folder) or checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "\n")]
        prompt: String,
        #[arg(long, default_value_t = 300)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// 0 = no top-k filtering.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold (1 = off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// cpu, cuda or cuda:N (CUDA needs a binary built with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Mean next-token loss and perplexity of a model folder on a text or token file (one JSON line).
    Eval {
        /// Model folder (<out_dir>/model or an export; f32 or bf16).
        #[arg(long)]
        model: PathBuf,
        /// UTF-8 text, tokenized with the folder's tokenizer and cut into --seq-len windows.
        #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
        text: Option<PathBuf>,
        /// JSON array of arrays of token ids, each a sequence of at most the model's context.
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Sequences per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// --text: predictions per window (0 = the window the model was trained on).
        #[arg(long, default_value_t = 0)]
        seq_len: usize,
        /// cpu, cuda or cuda:N (CUDA needs a binary built with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Model-state bytes per rank for ZeRO stages 0-3 (from a parameter count or a preset's layout).
    Estimate {
        /// Parameter count, e.g. 7.5e9.
        #[arg(long)]
        params: Option<f64>,
        /// A preset (char-small, gpt2-mini, gpt2-124m): uses its real layout, padding included.
        #[arg(long)]
        model: Option<String>,
        /// Vocabulary size for --model (default 50257).
        #[arg(long, default_value_t = 50257)]
        vocab: usize,
        /// Ranks.
        #[arg(long, default_value_t = 1)]
        world: usize,
    },
    /// Time training steps of a preset on random tokens (forward / backward / optimizer).
    Bench {
        /// char-small, gpt2-mini or gpt2-124m.
        #[arg(long, default_value = "char-small")]
        model: String,
        /// Benchmark a model folder (Hugging Face GPT-2 or Llama, with its weights) instead.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Sequences per step (0 = 12, or 4 for gpt2-124m).
        #[arg(long, default_value_t = 0)]
        batch: usize,
        /// Tokens per sequence (0 = 256).
        #[arg(long, default_value_t = 0)]
        seq_len: usize,
        /// Vocabulary size (0 = 65 for char presets, 50257 for gpt2-124m).
        #[arg(long, default_value_t = 0)]
        vocab: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Compute threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Ranks (threads), each with batch / world rows.
        #[arg(long, default_value_t = 1)]
        world: usize,
        #[arg(long, default_value_t = 0)]
        zero_stage: u8,
        /// Stage 3: recompute blocks in the backward.
        #[arg(long)]
        recompute: bool,
        /// Run stages 0, 1, 2, 3 (recompute off and on) and print one table relative to stage 0.
        #[arg(long)]
        sweep_stages: bool,
        /// f32 matrix products: "f32" (exact) or "bf16" (bf16 inputs, f32 sums, on AMX CPUs).
        #[arg(long, default_value = "f32")]
        matmul: String,
        /// cpu, cuda or cuda:N (CUDA needs a binary built with --features cuda; world 1).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Compute dtype: f32, bf16 (what a GPU run wants) or f16 (loss scaling).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
}

fn run(cli: Cli) -> Result<(), BoxError> {
    match cli.command {
        Command::Train { config, mut overrides, resume, world, zero_stage, device } => {
            overrides.extend(resume.map(|r| format!("checkpoint.resume={}", toml::Value::String(r))));
            overrides.extend(device.map(|d| format!("train.device={}", toml::Value::String(d))));
            overrides.extend(world.map(|n| format!("parallel.world_size={n}")));
            overrides.extend(zero_stage.map(|s| format!("parallel.zero_stage={s}")));
            let cfg = Config::load(config.as_deref(), &overrides)?;
            run_training(&cfg)?;
        }
        Command::Finetune { model, data, config, overrides, resume, world, zero_stage, device } => {
            let quote = |p: &std::path::Path| toml::Value::String(p.display().to_string()).to_string();
            let defaults: Vec<String> = ["train.lr=1e-4", "train.min_lr=1e-5", "train.warmup_steps=20", "train.max_steps=200", "train.out_dir=\"runs/finetune\""]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let mut set = vec![
                format!("model.init_from={}", quote(&model)),
                format!("data.sources=[{}]", data.iter().map(|p| quote(p)).collect::<Vec<_>>().join(", ")),
            ];
            set.extend(overrides);
            set.extend(resume.map(|r| format!("checkpoint.resume={}", toml::Value::String(r))));
            set.extend(world.map(|n| format!("parallel.world_size={n}")));
            set.extend(zero_stage.map(|s| format!("parallel.zero_stage={s}")));
            set.extend(device.map(|d| format!("train.device={}", toml::Value::String(d))));
            let cfg = Config::load_with_defaults(config.as_deref(), &defaults, &set)?;
            run_training(&cfg)?;
        }
        Command::Prepare { inputs, out, tokenizer, val_fraction } => {
            let spec = match tokenizer.as_str() {
                "char" => datasets::TokenizerSpec::Char,
                path => datasets::TokenizerSpec::HuggingFace(PathBuf::from(path)),
            };
            let summary = datasets::prepare(&inputs, &out, spec, val_fraction)?;
            let m = &summary.meta;
            println!(
                "prepared {}: vocab {}, {} train tokens, {} val tokens from {} files",
                summary.out_dir.display(),
                m.vocab_size,
                m.train_tokens,
                m.val_tokens,
                m.sources.len()
            );
        }
        Command::Export { checkpoint, out, dtype } => {
            let n = zero_candle::export::export_checkpoint(&checkpoint, &out, dtype)?;
            println!("exported {} ({n} parameters, {dtype}) to {}", checkpoint.display(), out.display());
        }
        Command::ConvertGguf { gguf, out, dtype } => {
            let summary = zero_candle::gguf::convert_gguf(&gguf, &out, dtype)?;
            println!("{}", summary.line(&gguf));
        }
        Command::Sample { model, prompt, max_new_tokens, temperature, top_k, top_p, seed, device } => {
            init_compute_threads(0);
            let cfg = SampleConfig { prompt: prompt.clone(), max_new_tokens, temperature, top_k, top_p };
            if temperature < 0.0 {
                return Err("--temperature must be >= 0 (0 = greedy)".into());
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err("--top-p must be in (0, 1]".into());
            }
            let device = zero_candle::train::parse_device(&device)?;
            let text = run_sample(&model, &cfg, seed, &device)?;
            println!("{prompt}{text}");
        }
        Command::Eval { model, text, tokens, batch, seq_len, device } => {
            init_compute_threads(0);
            let input = zero_candle::eval::EvalInput::from_args(text, tokens)?;
            let report = zero_candle::eval::run_eval(&zero_candle::eval::EvalOptions { model, input, batch, seq_len, device })?;
            println!("{}", report.to_json());
        }
        Command::Estimate { params, model, vocab, world } => {
            if world == 0 {
                return Err("--world must be at least 1".into());
            }
            let (sizes, what) = match (params, model) {
                (Some(p), None) if p > 0.0 => (Sizes::from_params(p), "parameter count".to_string()),
                (None, Some(m)) => (Sizes::from_preset(&m, vocab, world)?, format!("preset {m} (vocab {vocab})")),
                _ => return Err("give exactly one of --params N (> 0) or --model PRESET".into()),
            };
            print!("{}", format_estimate(&sizes, world, &what));
        }
        Command::Bench { model, from, batch, seq_len, vocab, steps, warmup, threads, world, zero_stage, recompute, sweep_stages, matmul, device, precision } => {
            let matmul = zero_candle::train::parse_matmul(&matmul)?;
            init_compute_threads(threads);
            if steps == 0 {
                return Err("--steps must be at least 1".into());
            }
            let opts = BenchOptions { preset: from.as_ref().map_or(model, |f| f.display().to_string()), from, batch, seq_len, vocab, steps, warmup, world, stage: zero_stage, recompute, matmul, device, precision };
            if sweep_stages {
                let mut results = Vec::new();
                for (stage, recompute) in [(0, false), (1, false), (2, false), (3, false), (3, true)] {
                    let o = BenchOptions { stage, recompute, ..opts.clone() };
                    results.push((stage, recompute, run_bench(&o)?));
                }
                println!("{}", format_sweep(&opts, &results));
            } else {
                let result = run_bench(&opts)?;
                println!("{}", format_table(&opts, &result));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
