//! `zero-candle train`: data, model, engine, schedule, evaluation, metrics and the final sample,
//! read top-down as one loop (nanoGPT's train.py is the model of this file).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use datasets::{Split, TokenDataset, TokenizerSpec};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::AdamWHyper;
use models::{Gpt2, Gpt2Config};

use crate::config::{Config, ModelConfig};
use crate::engine::{Engine, MicroBatch};
use crate::metrics::MetricsWriter;
use crate::model_io;
use crate::schedule::learning_rate;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: usize,
    pub final_loss: f64,
    pub final_val_loss: f64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub sample: String,
    pub model_dir: PathBuf,
}

/// The GPT-2 sizes of a run: the preset, with any size the config sets.
pub fn resolve_model_config(cfg: &ModelConfig, vocab_size: usize) -> Result<Gpt2Config, BoxError> {
    let mut m = Gpt2Config::preset(&cfg.preset, vocab_size)?;
    m.n_layer = cfg.n_layer.unwrap_or(m.n_layer);
    m.n_head = cfg.n_head.unwrap_or(m.n_head);
    m.n_embd = cfg.n_embd.unwrap_or(m.n_embd);
    m.context = cfg.context.unwrap_or(m.context);
    m.validate().map_err(|e| format!("[model] section: {e}"))?;
    Ok(m)
}

/// The prepared dataset folder of a run: `data.prepared_dir`, or `data.sources` tokenized into
/// `<out_dir>/data` now (a character vocabulary over ~1 MB takes well under a second).
fn prepared_data(cfg: &Config) -> Result<PathBuf, BoxError> {
    if !cfg.data.prepared_dir.as_os_str().is_empty() {
        return Ok(cfg.data.prepared_dir.clone());
    }
    let dir = cfg.train.out_dir.join("data");
    let spec = match cfg.data.tokenizer.as_str() {
        "char" => TokenizerSpec::Char,
        path => TokenizerSpec::HuggingFace(PathBuf::from(path)),
    };
    datasets::prepare(&cfg.data.sources, &dir, spec, cfg.data.val_fraction)?;
    Ok(dir)
}

fn to_micro_batch(batch: datasets::Batch, device: &Device) -> candle_core::Result<MicroBatch> {
    let shape = (batch.rows, batch.context);
    Ok(MicroBatch { inputs: Tensor::from_vec(batch.inputs, shape, device)?, targets: Tensor::from_vec(batch.targets, shape, device)? })
}

/// Print above the progress bar (or plainly when the bar is hidden, e.g. output to a file).
fn log_line(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

pub fn run_training(cfg: &Config) -> Result<RunSummary, BoxError> {
    crate::cpu::init_compute_threads(cfg.train.threads);
    let t = &cfg.train;
    let out_dir = &t.out_dir;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("cannot create train.out_dir {}: {e}", out_dir.display()))?;
    std::fs::write(out_dir.join("config.toml"), cfg.to_toml())
        .map_err(|e| format!("cannot write {}: {e}", out_dir.join("config.toml").display()))?;

    // Data.
    let data_dir = prepared_data(cfg)?;
    let data = TokenDataset::open(&data_dir)?;
    let model_cfg = resolve_model_config(&cfg.model, data.vocab_size())?;
    let seq_len = if t.seq_len == 0 { model_cfg.context } else { t.seq_len };
    if seq_len > model_cfg.context {
        return Err(format!("train.seq_len {seq_len} exceeds the model context {}; lower it or set model.context", model_cfg.context).into());
    }
    let mut loader = data.loader(Split::Train, t.batch_size, seq_len, t.seed)?;
    let device = Device::Cpu;
    let val_batches: Vec<MicroBatch> = data
        .val_batches(t.batch_size, seq_len, t.eval_batches)?
        .map(|b| to_micro_batch(b, &device))
        .collect::<candle_core::Result<_>>()?;

    // Model and engine.
    let mut engine = Engine::new(Gpt2::new(model_cfg.clone())?, t.seed, device.clone(), DType::F32)?;
    let hyper = AdamWHyper {
        lr: t.lr as f32,
        beta1: t.beta1 as f32,
        beta2: t.beta2 as f32,
        eps: t.eps as f32,
        weight_decay: t.weight_decay as f32,
    };
    let tokens_per_step = t.batch_size * t.grad_accum_steps * seq_len;
    println!(
        "model: gpt2 {} layers, {} heads, width {}, context {}, vocab {} ({:.2}M parameters)",
        model_cfg.n_layer,
        model_cfg.n_head,
        model_cfg.n_embd,
        model_cfg.context,
        model_cfg.vocab_size,
        engine.num_params() as f64 / 1e6
    );
    println!(
        "data: {} ({} train / {} val tokens); {} tokens per step ({} x {} x {}); {} steps; threads {}",
        data_dir.display(),
        data.tokens(Split::Train).len(),
        data.tokens(Split::Val).len(),
        tokens_per_step,
        t.batch_size,
        t.grad_accum_steps,
        seq_len,
        t.max_steps,
        rayon::current_num_threads()
    );
    let mut metrics = MetricsWriter::create(out_dir)?;
    metrics.write(serde_json::json!({
        "event": "start", "num_params": engine.num_params(), "tokens_per_step": tokens_per_step,
        "model": model_cfg, "threads": rayon::current_num_threads(),
    }))?;

    let bar = ProgressBar::new(t.max_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
            .map_err(|e| format!("progress bar template: {e}"))?,
    );
    let start = Instant::now();
    let (mut last_loss, mut val_loss) = (f64::NAN, f64::NAN);
    let mut tokens_seen = 0usize;
    for step in 1..=t.max_steps {
        let lr = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        let micro: Vec<MicroBatch> = (0..t.grad_accum_steps)
            .map(|_| to_micro_batch(loader.next_batch(), &device))
            .collect::<candle_core::Result<_>>()?;
        let step_start = Instant::now();
        let stats = engine.train_step(&micro, lr, &hyper, t.grad_clip)?;
        let step_s = step_start.elapsed().as_secs_f64();
        tokens_seen += stats.tokens;
        last_loss = stats.loss;
        let elapsed = start.elapsed().as_secs_f64();
        let tok_s = tokens_seen as f64 / elapsed;
        metrics.write(serde_json::json!({
            "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
            "step_s": step_s, "tokens_per_s": stats.tokens as f64 / step_s, "elapsed_s": elapsed,
        }))?;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {:.4} | {:.0} tok/s", stats.loss, tok_s));
        if t.log_interval > 0 && (step % t.log_interval == 0 || step == 1) {
            log_line(&bar, format!(
                "step {step:>5} | loss {:.4} | lr {lr:.2e} | grad norm {:.3} | {:.0} ms | {tok_s:.0} tok/s",
                stats.loss, stats.grad_norm, step_s * 1e3
            ));
        }
        if (t.eval_interval > 0 && step % t.eval_interval == 0) || step == t.max_steps {
            val_loss = engine.eval_loss(&val_batches)?;
            metrics.write(serde_json::json!({"step": step, "val_loss": val_loss, "elapsed_s": start.elapsed().as_secs_f64()}))?;
            log_line(&bar, format!("step {step:>5} | val loss {val_loss:.4} | {:.1} min", start.elapsed().as_secs_f64() / 60.0));
        }
    }
    bar.finish_and_clear();
    let elapsed_s = start.elapsed().as_secs_f64();
    let tokens_per_s = tokens_seen as f64 / elapsed_s;

    let model_dir = model_io::model_dir(out_dir);
    model_io::save_model_folder(&model_dir, &model_cfg, seq_len, &engine.named_parameters(), data.tokenizer())?;
    let sample = sample_text(&engine, data.tokenizer(), &cfg.sample, seq_len, t.seed)?;
    metrics.write(serde_json::json!({
        "event": "end", "steps": t.max_steps, "loss": last_loss, "val_loss": val_loss,
        "elapsed_s": elapsed_s, "tokens_per_s": tokens_per_s, "model_dir": model_dir,
    }))?;
    println!(
        "done: {} steps in {:.1} min, final train loss {last_loss:.4}, val loss {val_loss:.4}, {tokens_per_s:.0} tok/s",
        t.max_steps,
        elapsed_s / 60.0
    );
    println!("model written to {}", model_dir.display());
    println!("--- sample ---\n{}{}\n--------------", cfg.sample.prompt, sample);
    Ok(RunSummary { steps: t.max_steps, final_loss: last_loss, final_val_loss: val_loss, elapsed_s, tokens_per_s, sample, model_dir })
}

/// Generate a continuation of `cfg.prompt` and decode it, feeding at most `window` tokens.
pub fn sample_text(
    engine: &Engine<Gpt2>,
    tokenizer: &datasets::Tokenizer,
    cfg: &crate::config::SampleConfig,
    window: usize,
    seed: u64,
) -> Result<String, BoxError> {
    let prompt = tokenizer.encode(&cfg.prompt)?;
    let ids = crate::sample::generate(engine, &prompt, cfg.max_new_tokens, window, cfg.temperature, cfg.top_k, seed)?;
    Ok(tokenizer.decode(&ids)?)
}

/// `zero-candle sample`: load a model folder and print a continuation.
pub fn run_sample(model_dir: &Path, cfg: &crate::config::SampleConfig, seed: u64) -> Result<String, BoxError> {
    let loaded = model_io::load_model_folder(model_dir)?;
    let mut engine = Engine::new(Gpt2::new(loaded.config.clone())?, seed, Device::Cpu, DType::F32)?;
    engine.load_parameters(&loaded.params).map_err(|e| format!("{}: {e}", model_dir.display()))?;
    sample_text(&engine, &loaded.tokenizer, cfg, loaded.train_seq_len.min(loaded.config.context), seed)
}
