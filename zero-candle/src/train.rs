//! `zero-candle train`: data, model, engine, schedule, evaluation, metrics and the final sample,
//! read top-down as one loop (nanoGPT's train.py is the model of this file).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use datasets::{BatchLoader, CompletionDataset, CompletionLoader, LoaderState, Split, TokenDataset, TokenizerSpec};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::AdamWHyper;
use models::{AnyConfig, BlockModel, Gpt2Config};

use crate::checkpoint;
use crate::comm::{Comm, LocalComm};
use crate::config::{Config, ModelConfig};
use crate::engine::{Engine, EngineOptions, MicroBatch};
use crate::grad::GradDtype;
use crate::stage::ZeroStage;
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

/// The data of a run: token shards (text) or prompt/completion examples (`.jsonl` sources).
pub enum RunData {
    Text(TokenDataset),
    Completions(CompletionDataset),
}

/// The training loader of either kind of data; both save and restore a `LoaderState`.
enum RunLoader {
    Text(BatchLoader),
    Completions(CompletionLoader),
}

impl RunLoader {
    fn next_batch(&mut self) -> datasets::Batch {
        match self {
            RunLoader::Text(l) => l.next_batch(),
            RunLoader::Completions(l) => l.next_batch(),
        }
    }

    fn state(&self) -> LoaderState {
        match self {
            RunLoader::Text(l) => l.state(),
            RunLoader::Completions(l) => l.state(),
        }
    }

    fn restore(&mut self, state: &LoaderState) -> datasets::Result<()> {
        match self {
            RunLoader::Text(l) => l.restore(state),
            RunLoader::Completions(l) => l.restore(state),
        }
    }
}

impl RunData {
    pub fn vocab_size(&self) -> usize {
        match self {
            RunData::Text(d) => d.vocab_size(),
            RunData::Completions(d) => d.vocab_size(),
        }
    }

    pub fn tokenizer(&self) -> &datasets::Tokenizer {
        match self {
            RunData::Text(d) => d.tokenizer(),
            RunData::Completions(d) => d.tokenizer(),
        }
    }

    fn loader(&self, batch: usize, context: usize, seed: u64) -> datasets::Result<RunLoader> {
        Ok(match self {
            RunData::Text(d) => RunLoader::Text(d.loader(Split::Train, batch, context, seed)?),
            RunData::Completions(d) => RunLoader::Completions(d.loader(batch, context, seed)?),
        })
    }

    fn val_batches(&self, batch: usize, context: usize, max_batches: usize) -> datasets::Result<Vec<datasets::Batch>> {
        match self {
            RunData::Text(d) => Ok(d.val_batches(batch, context, max_batches)?.collect()),
            RunData::Completions(d) => d.val_batches(batch, context, max_batches),
        }
    }

    /// One line for the run's header.
    fn describe(&self) -> String {
        match self {
            RunData::Text(d) => format!("{} ({} train / {} val tokens)", d.dir().display(), d.tokens(Split::Train).len(), d.tokens(Split::Val).len()),
            RunData::Completions(d) => format!(
                "{} prompt/completion files ({} train / {} val examples; loss on completion tokens only{})",
                d.sources().len(),
                d.examples(Split::Train).len(),
                d.examples(Split::Val).len(),
                if d.eos().is_some() { ", EOS appended" } else { "" }
            ),
        }
    }
}

/// The data of a run: `data.prepared_dir`; or, when every source is a `.jsonl` file,
/// prompt/completion examples tokenized in memory; or `data.sources` tokenized into
/// `<out_dir>/data` now (a character vocabulary over ~1 MB takes well under a second).
pub fn load_data(cfg: &Config) -> Result<RunData, BoxError> {
    if !cfg.data.prepared_dir.as_os_str().is_empty() {
        return Ok(RunData::Text(TokenDataset::open(&cfg.data.prepared_dir)?));
    }
    let dir = cfg.train.out_dir.join("data");
    let init_tokenizer = if cfg.model.init_from.as_os_str().is_empty() {
        PathBuf::new()
    } else {
        model_io::resolve_model_path(&cfg.model.init_from)?.join("tokenizer.json")
    };
    let spec = match cfg.data.tokenizer.as_str() {
        // A pre-trained model reads the text with its own tokenizer.
        "char" if !cfg.model.init_from.as_os_str().is_empty() && init_tokenizer.is_file() => TokenizerSpec::HuggingFace(init_tokenizer),
        "char" => TokenizerSpec::Char,
        path => TokenizerSpec::HuggingFace(PathBuf::from(path)),
    };
    let sources = &cfg.data.sources;
    let jsonl = sources.iter().filter(|p| datasets::is_jsonl(p)).count();
    if jsonl > 0 && jsonl == sources.len() {
        return Ok(RunData::Completions(CompletionDataset::load(sources, spec, cfg.data.val_fraction)?));
    }
    if let Some(p) = sources.iter().find(|p| datasets::is_jsonl(p)) {
        return Err(format!("{}: data.sources mixes .jsonl prompt/completion files with text; use one kind per run", p.display()).into());
    }
    datasets::prepare(sources, &dir, spec, cfg.data.val_fraction)?;
    Ok(RunData::Text(TokenDataset::open(&dir)?))
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

/// A single-rank communicator (world size 1), for sampling, benchmarks and examples.
pub fn single_rank() -> Result<LocalComm, BoxError> {
    LocalComm::group(1, Duration::from_secs(300)).pop().ok_or_else(|| "could not create a single-rank communicator".into())
}

/// `train.matmul_precision` / `bench --matmul`: "f32" or "bf16".
pub fn parse_matmul(value: &str) -> Result<kernels::MatmulPrecision, BoxError> {
    match value {
        "f32" => Ok(kernels::MatmulPrecision::F32),
        "bf16" => Ok(kernels::MatmulPrecision::Bf16),
        other => Err(format!("matmul precision {other:?}: expected \"f32\" or \"bf16\"").into()),
    }
}

/// `train.device` / `--device`: "cpu", "cuda" (GPU 0) or "cuda:N", opened. A binary built without
/// the `cuda` feature says how to rebuild; a GPU that does not open gives the driver's error.
pub fn parse_device(value: &str) -> Result<Device, BoxError> {
    if !crate::config::valid_device(value) {
        return Err(format!("device {value:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"").into());
    }
    if value == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = value.strip_prefix("cuda:").map_or(Ok(0), str::parse).map_err(|e| format!("device {value:?}: {e}"))?;
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "device {value}: this zero-candle was built without --features cuda: rebuild with \
             `bash scripts/setup-cuda.sh && source .cuda/env.sh && cargo build --release --features cuda,nccl` \
             (or use --device cpu)"
        )
        .into());
    }
    Device::new_cuda(ordinal).map_err(|e| format!("device {value}: CUDA device {ordinal} does not open: {e}").into())
}

/// The compute dtype named by `train.precision` / `bench --precision` ("f32", "bf16", "f16").
pub fn parse_precision(value: &str) -> Result<DType, BoxError> {
    match value {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("precision {other:?}: expected \"f32\", \"bf16\" or \"f16\"").into()),
    }
}

/// What the matmul precision does on this machine, for logs and bench tables.
pub fn matmul_label(precision: kernels::MatmulPrecision) -> &'static str {
    match precision {
        kernels::MatmulPrecision::F32 => "f32",
        kernels::MatmulPrecision::Bf16 if kernels::gemm::amx_available() => "bf16 (AMX, f32 sums)",
        kernels::MatmulPrecision::Bf16 => "f32 (bf16 asked; no AMX on this CPU)",
    }
}

/// Engine options from the config.
pub fn engine_options(cfg: &Config) -> Result<EngineOptions, BoxError> {
    let stage = ZeroStage::new(cfg.parallel.zero_stage)?;
    let compute_dtype = parse_precision(&cfg.train.precision)?;
    let grad_dtype = if cfg.parallel.grad_dtype == "bf16" { GradDtype::Bf16 } else { GradDtype::F32 };
    Ok(EngineOptions { stage, recompute: cfg.parallel.recompute.unwrap_or(stage.get() == 3), compute_dtype, grad_dtype })
}

pub fn run_training(cfg: &Config) -> Result<RunSummary, BoxError> {
    crate::cpu::init_compute_threads(cfg.train.threads);
    kernels::set_matmul_precision(parse_matmul(&cfg.train.matmul_precision)?);
    crate::signals::install();
    // The device opens first: a missing GPU or a CPU-only binary fails before any data work.
    let device = parse_device(&cfg.train.device).map_err(|e| format!("train.device: {e}"))?;
    if !device.is_cpu() && cfg.parallel.world_size != 1 {
        return Err(format!("train.device {}: one GPU per run for now (parallel.world_size must be 1)", cfg.train.device).into());
    }
    let out_dir = &cfg.train.out_dir;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("cannot create train.out_dir {}: {e}", out_dir.display()))?;
    std::fs::write(out_dir.join("config.toml"), cfg.to_toml())
        .map_err(|e| format!("cannot write {}: {e}", out_dir.join("config.toml").display()))?;
    let data = load_data(cfg)?;
    // The starting model: a folder to fine-tune (read once, shared by the ranks) or a preset.
    let init = if cfg.model.init_from.as_os_str().is_empty() {
        None
    } else {
        let loaded = model_io::load_model_folder(&cfg.model.init_from).map_err(|e| format!("model.init_from: {e}"))?;
        if data.vocab_size() > loaded.config.vocab_size() {
            return Err(format!(
                "the data's tokenizer has {} tokens but the model {} has {}; prepare the data with the model's tokenizer.json",
                data.vocab_size(),
                cfg.model.init_from.display(),
                loaded.config.vocab_size()
            )
            .into());
        }
        Some(loaded)
    };
    let timeout = Duration::from_secs_f64(cfg.parallel.comm_timeout_s);
    // Read once, shared by the rank threads, and dropped as soon as every rank has copied its range.
    let init_config = init.as_ref().map(|l| l.config.clone());
    let init = std::sync::RwLock::new(init);
    let mut results = crate::comm::run_ranks(cfg.parallel.world_size, timeout, |comm| train_rank(cfg, &data, init_config.as_ref(), &init, &device, comm))
        .map_err(|e| -> BoxError { e.to_string().into() })?;
    match results.first_mut().and_then(Option::take) {
        Some(summary) => Ok(summary),
        None => Err("rank 0 returned no summary".into()),
    }
}

/// One rank's training loop (rank 0 also logs, writes metrics, saves the model and samples).
fn train_rank(
    cfg: &Config,
    data: &RunData,
    init_config: Option<&AnyConfig>,
    init: &std::sync::RwLock<Option<model_io::LoadedModel>>,
    device: &Device,
    comm: LocalComm,
) -> Result<Option<RunSummary>, BoxError> {
    let t = &cfg.train;
    let (rank, world) = (comm.rank(), comm.world_size());
    let main = rank == 0;
    let out_dir = &t.out_dir;
    let model_cfg = match init_config {
        Some(config) => config.clone(),
        None => AnyConfig::Gpt2(resolve_model_config(&cfg.model, data.vocab_size())?),
    };
    let seq_len = if t.seq_len == 0 { model_cfg.context() } else { t.seq_len };
    if seq_len > model_cfg.context() {
        return Err(format!("train.seq_len {seq_len} exceeds the model context {}; lower it or set model.context", model_cfg.context()).into());
    }
    // Every rank draws the same global batches and keeps its rows of each.
    let mut loader = data.loader(t.batch_size, seq_len, t.seed)?;
    let device = device.clone();
    let val_batches: Vec<MicroBatch> = data
        .val_batches(t.batch_size, seq_len, t.eval_batches)?
        .into_iter()
        .map(|b| -> Result<MicroBatch, BoxError> { Ok(to_micro_batch(b.rank_rows(rank, world)?, &device)?) })
        .collect::<Result<_, _>>()?;

    let options = engine_options(cfg)?;
    let mut engine = Engine::new(model_cfg.build()?, comm, t.seed, device.clone(), options)?;
    if init_config.is_some() {
        {
            let guard = init.read().map_err(|_| "model.init_from: a rank panicked while loading")?;
            if let Some(loaded) = guard.as_ref() {
                engine.load_parameters(&loaded.params).map_err(|e| format!("model.init_from {}: {e}", cfg.model.init_from.display()))?;
            }
        }
        // Every rank now holds its range: free the full copy.
        engine.comm.barrier("init loaded")?;
        if rank == 0 {
            init.write().map_err(|_| "model.init_from: a rank panicked while loading")?.take();
        }
    }
    let hyper = AdamWHyper {
        lr: t.lr as f32,
        beta1: t.beta1 as f32,
        beta2: t.beta2 as f32,
        eps: t.eps as f32,
        weight_decay: t.weight_decay as f32,
    };
    let tokens_per_step = t.batch_size * t.grad_accum_steps * seq_len;
    // Resume: engine state (any saved world size and stage), data position, step count.
    let (mut first_step, mut tokens_seen) = (1usize, 0usize);
    let resume_from = if cfg.checkpoint.resume.is_empty() {
        None
    } else {
        let dir = checkpoint::resolve(Path::new(&cfg.checkpoint.resume), out_dir)?;
        let manifest = checkpoint::read_manifest(&dir)?;
        checkpoint::restore(&mut engine, &dir, &manifest, &model_cfg)?;
        loader.restore(&manifest.loader).map_err(|e| format!("resuming from {}: {e}", dir.display()))?;
        first_step = manifest.step + 1;
        tokens_seen = manifest.tokens_seen as usize;
        Some((dir, manifest.world_size, manifest.zero_stage))
    };
    let mut metrics = if main { Some(MetricsWriter::open(out_dir, resume_from.is_some())?) } else { None };
    if main {
        println!("model: {} ({:.2}M parameters)", describe(&model_cfg), engine.num_params() as f64 / 1e6);
        if init_config.is_some() {
            println!("initialized from {}", cfg.model.init_from.display());
        }
        println!(
            "data: {}; {} tokens per step ({} x {} x {}); {} steps; threads {}",
            data.describe(),
            tokens_per_step,
            t.batch_size,
            t.grad_accum_steps,
            seq_len,
            t.max_steps,
            rayon::current_num_threads()
        );
        println!(
            "parallel: world {world}, ZeRO stage {}, recompute {}, precision {}, matmul {}, device {}",
            options.stage, options.recompute, t.precision, matmul_label(kernels::matmul_precision()), t.device
        );
        if let Some((dir, saved_world, saved_stage)) = &resume_from {
            println!("resumed from {} (saved at world {saved_world}, stage {saved_stage}); continuing at step {first_step}", dir.display());
        }
    }
    report_memory(&mut engine, metrics.as_mut(), "start")?;
    if let Some(m) = metrics.as_mut() {
        m.write(serde_json::json!({
            "event": "start", "num_params": engine.num_params(), "tokens_per_step": tokens_per_step,
            "model": model_cfg, "threads": rayon::current_num_threads(), "world_size": world,
            "zero_stage": options.stage.get(), "recompute": options.recompute, "precision": t.precision,
            "matmul_precision": matmul_label(kernels::matmul_precision()), "device": t.device,
        }))?;
    }

    let bar = if main { ProgressBar::new(t.max_steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
            .map_err(|e| format!("progress bar template: {e}"))?,
    );
    bar.set_position(first_step as u64 - 1);
    let start = Instant::now();
    let (mut last_loss, mut val_loss) = (f64::NAN, f64::NAN);
    let mut last_step = first_step - 1;
    let tokens_at_start = tokens_seen;
    for step in first_step..=t.max_steps {
        let lr = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        let micro: Vec<MicroBatch> = (0..t.grad_accum_steps)
            .map(|_| -> Result<MicroBatch, BoxError> { Ok(to_micro_batch(loader.next_batch().rank_rows(rank, world)?, &device)?) })
            .collect::<Result<_, _>>()?;
        let step_start = Instant::now();
        let stats = engine.train_step(&micro, lr, &hyper, t.grad_clip)?;
        let step_s = step_start.elapsed().as_secs_f64();
        tokens_seen += stats.tokens;
        last_loss = stats.loss;
        if step == 1 {
            report_memory(&mut engine, metrics.as_mut(), "after step 1")?;
        }
        last_step = step;
        let elapsed = start.elapsed().as_secs_f64();
        let tok_s = (tokens_seen - tokens_at_start) as f64 / elapsed;
        if let Some(m) = metrics.as_mut() {
            m.write(serde_json::json!({
                "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                "step_s": step_s, "tokens_per_s": stats.tokens as f64 / step_s, "elapsed_s": elapsed,
                "loss_scale": stats.loss_scale, "skipped": stats.skipped,
            }))?;
            bar.set_position(step as u64);
            bar.set_message(format!("loss {:.4} | {:.0} tok/s", stats.loss, tok_s));
            if stats.skipped {
                log_line(&bar, format!("step {step:>5} | gradient overflow at loss scale {}: step skipped, scale lowered", stats.loss_scale));
            }
            if t.log_interval > 0 && (step % t.log_interval == 0 || step == 1) {
                log_line(&bar, format!(
                    "step {step:>5} | loss {:.4} | lr {lr:.2e} | grad norm {:.3} | {:.0} ms | {tok_s:.0} tok/s",
                    stats.loss, stats.grad_norm, step_s * 1e3
                ));
            }
        }
        if (t.eval_interval > 0 && step % t.eval_interval == 0) || step == t.max_steps {
            val_loss = engine.eval_loss(&val_batches)?;
            if let Some(m) = metrics.as_mut() {
                m.write(serde_json::json!({"step": step, "val_loss": val_loss, "elapsed_s": start.elapsed().as_secs_f64()}))?;
                log_line(&bar, format!("step {step:>5} | val loss {val_loss:.4} | {:.1} min", start.elapsed().as_secs_f64() / 60.0));
            }
        }

        // Checkpoint: every N steps, at the end, and when any rank saw SIGINT/SIGTERM.
        let mut stop = [if crate::signals::stop_requested() { 1.0f64 } else { 0.0 }];
        engine.comm.all_reduce_sum(&mut stop, "stop request")?;
        let stop = stop[0] > 0.0;
        let c = &cfg.checkpoint;
        if stop || (c.every_steps > 0 && step % c.every_steps == 0) || (c.at_end && step == t.max_steps) {
            let run = checkpoint::RunState {
                step,
                model: &model_cfg,
                config_toml: cfg.to_toml(),
                loader: loader.state(),
                tokens_seen: tokens_seen as u64,
                tokenizer: data.tokenizer(),
                compute_dtype: t.precision.clone(),
            };
            let dir = checkpoint::save(&engine, out_dir, &run, c.keep_last)?;
            if let Some(m) = metrics.as_mut() {
                m.write(serde_json::json!({"event": "checkpoint", "step": step, "path": dir}))?;
                log_line(&bar, format!("step {step:>5} | checkpoint {}", dir.display()));
            }
        }
        if stop {
            if main {
                log_line(&bar, format!("step {step:>5} | stop requested (SIGINT/SIGTERM): checkpoint saved, exiting"));
            }
            break;
        }
    }
    bar.finish_and_clear();
    let elapsed_s = start.elapsed().as_secs_f64();
    let tokens_per_s = (tokens_seen - tokens_at_start) as f64 / elapsed_s;

    // Gather the weights (a collective), then rank 0 saves and samples on its own.
    let params = engine.full_parameters()?;
    drop(engine);
    if !main {
        return Ok(None);
    }
    let named: Vec<(&str, &[usize], &[f32])> = params.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    let model_dir = model_io::model_dir(out_dir);
    model_io::save_model_folder(&model_dir, &model_cfg, seq_len, &named, data.tokenizer())?;
    let mut solo = Engine::new(model_cfg.build()?, single_rank()?, t.seed, device, EngineOptions::single())?;
    let by_name = params.into_iter().map(|(n, s, v)| (n, (s, v))).collect();
    solo.load_parameters(&by_name)?;
    let sample = sample_text(&mut solo, data.tokenizer(), &cfg.sample, seq_len, t.seed)?;
    if let Some(m) = metrics.as_mut() {
        m.write(serde_json::json!({
            "event": "end", "steps": last_step, "loss": last_loss, "val_loss": val_loss,
            "elapsed_s": elapsed_s, "tokens_per_s": tokens_per_s, "model_dir": model_dir,
        }))?;
    }
    println!(
        "done: {} steps in {:.1} min, final train loss {last_loss:.4}, val loss {val_loss:.4}, {tokens_per_s:.0} tok/s",
        last_step + 1 - first_step,
        elapsed_s / 60.0
    );
    println!("model written to {}", model_dir.display());
    println!("--- sample ---\n{}{}\n--------------", cfg.sample.prompt, sample);
    Ok(Some(RunSummary { steps: last_step, final_loss: last_loss, final_val_loss: val_loss, elapsed_s, tokens_per_s, sample, model_dir }))
}

/// One line describing a model's shape.
fn describe(cfg: &AnyConfig) -> String {
    match cfg {
        AnyConfig::Gpt2(m) => format!("gpt2 {} layers, {} heads, width {}, context {}, vocab {}", m.n_layer, m.n_head, m.n_embd, m.context, m.vocab_size),
        AnyConfig::Llama(m) => format!(
            "llama {} layers, {} heads ({} kv), width {}, mlp {}, context {}, vocab {}",
            m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads, m.hidden_size, m.intermediate_size, m.max_position_embeddings, m.vocab_size
        ),
    }
}

/// Every rank's memory report, gathered to rank 0, printed and written to the metrics.
fn report_memory<M: BlockModel, C: Comm>(engine: &mut Engine<M, C>, metrics: Option<&mut MetricsWriter>, when: &str) -> Result<(), BoxError> {
    let r = engine.memory_report();
    let mine = [r.params_bytes as f64, r.grads_bytes as f64, r.optimizer_bytes as f64, r.peak_gathered_bytes as f64];
    let world = engine.comm.world_size();
    let mut all = vec![0f64; 4 * world];
    engine.comm.all_gather(&mine, &mut all, "memory report")?;
    if let Some(m) = metrics {
        let mb = |b: f64| b / (1 << 20) as f64;
        for (rank, v) in all.chunks_exact(4).enumerate() {
            println!(
                "memory ({when}) rank {rank}: params {:.1} MiB, grads {:.1} MiB, optimizer {:.1} MiB, model state {:.1} MiB, peak gathered {:.1} MiB",
                mb(v[0]), mb(v[1]), mb(v[2]), mb(v[0] + v[1] + v[2]), mb(v[3])
            );
            m.write(serde_json::json!({
                "event": "memory", "when": when, "rank": rank, "params_bytes": v[0], "grads_bytes": v[1],
                "optimizer_bytes": v[2], "model_state_bytes": v[0] + v[1] + v[2], "peak_gathered_bytes": v[3],
            }))?;
        }
    }
    Ok(())
}

/// Generate a continuation of `cfg.prompt` and decode it, feeding at most `window` tokens.
pub fn sample_text<M: models::BlockModel, C: Comm>(
    engine: &mut Engine<M, C>,
    tokenizer: &datasets::Tokenizer,
    cfg: &crate::config::SampleConfig,
    window: usize,
    seed: u64,
) -> Result<String, BoxError> {
    let prompt = tokenizer.encode(&cfg.prompt)?;
    let ids = crate::sample::generate(engine, &prompt, cfg.max_new_tokens, window, cfg.temperature, cfg.top_k, cfg.top_p, seed)?;
    Ok(tokenizer.decode(&ids)?)
}

/// `zero-candle sample` / `generate`: load a model folder, or a training checkpoint folder (any
/// world size and stage), and continue a prompt. Prints tokens/s to stderr.
pub fn run_sample(model_dir: &Path, cfg: &crate::config::SampleConfig, seed: u64, device: &Device) -> Result<String, BoxError> {
    let model_dir = &model_io::resolve_model_path(model_dir)?;
    let (config, params, tokenizer, window) = if model_dir.join("manifest.json").is_file() {
        let manifest = checkpoint::read_manifest(model_dir)?;
        let params = checkpoint::full_parameters(model_dir, &manifest)?.into_iter().map(|(n, s, v)| (n, (s, v))).collect();
        let seq_len = toml::from_str::<Config>(&manifest.config).map(|c| c.train.seq_len).unwrap_or(0);
        let window = if seq_len == 0 { manifest.model.context() } else { seq_len.min(manifest.model.context()) };
        (manifest.model.clone(), params, checkpoint::tokenizer(model_dir, &manifest)?, window)
    } else {
        let loaded = model_io::load_model_folder(model_dir)?;
        let window = loaded.train_seq_len.min(loaded.config.context());
        (loaded.config, loaded.params, loaded.tokenizer, window)
    };
    let mut engine = Engine::new(config.build()?, single_rank()?, seed, device.clone(), EngineOptions::single())?;
    engine.load_parameters(&params).map_err(|e| format!("{}: {e}", model_dir.display()))?;
    let start = Instant::now();
    let text = sample_text(&mut engine, &tokenizer, cfg, window, seed)?;
    eprintln!("generated {} tokens in {:.2} s ({:.1} tokens/s)", cfg.max_new_tokens, start.elapsed().as_secs_f64(), cfg.max_new_tokens as f64 / start.elapsed().as_secs_f64());
    Ok(text)
}
