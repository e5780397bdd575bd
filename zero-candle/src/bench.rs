//! `zero-candle bench`: time full training steps of a preset on random tokens and print the
//! median step split into forward, backward and optimizer, with tokens/s and achieved GFLOP/s
//! (training FLOPs as nanoGPT's estimate_mfu). Results go to docs/benchmarks.md by hand, with the
//! machine, date and command.

use candle_core::Tensor;
use kernels::AdamWHyper;
use models::{AnyConfig, Gpt2Config};

use std::time::Duration;

use crate::comm::{run_ranks, Comm, LocalComm};
use crate::engine::{Engine, EngineOptions, MemoryReport, MicroBatch, StepStats};
use crate::stage::ZeroStage;
use crate::rng::SplitMix64;
use crate::train::BoxError;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: String,
    /// Benchmark this model folder (Hugging Face GPT-2 or Llama, its weights) instead of a preset.
    pub from: Option<std::path::PathBuf>,
    /// Sequences per step; 0 = the preset's default (12 for char-small/gpt2-mini, 4 for gpt2-124m).
    pub batch: usize,
    pub seq_len: usize,
    /// Vocabulary; 0 = 65 (characters) for the char presets, 50257 for gpt2-124m.
    pub vocab: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Ranks (threads); each takes batch / world rows of every batch.
    pub world: usize,
    pub stage: u8,
    pub recompute: bool,
    /// f32 matrix products: exact f32, or bf16 inputs with f32 sums (AMX); see kernels::linear.
    pub matmul: kernels::MatmulPrecision,
    /// "cpu", "cuda" or "cuda:N" (see `train::parse_device`).
    pub device: String,
    /// Compute dtype: "f32", "bf16" or "f16" (the engine's `compute_dtype`).
    pub precision: String,
}

/// Median of each phase over the timed steps.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub config: AnyConfig,
    pub batch: usize,
    pub seq_len: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    /// Every rank's memory report after the timed steps.
    pub memory: Vec<MemoryReport>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub fn run_bench(opts: &BenchOptions) -> Result<BenchResult, BoxError> {
    kernels::set_matmul_precision(opts.matmul);
    let big = opts.preset == "gpt2-124m" || opts.from.is_some();
    let loaded = opts.from.as_deref().map(crate::model_io::load_model_folder).transpose()?;
    let config = match &loaded {
        Some(l) => l.config.clone(),
        None => {
            let vocab = if opts.vocab > 0 { opts.vocab } else if big { 50257 } else { 65 };
            AnyConfig::Gpt2(Gpt2Config::preset(&opts.preset, vocab)?)
        }
    };
    let vocab = config.vocab_size();
    let batch = if opts.batch > 0 { opts.batch } else if big { 4 } else { 12 };
    let seq_len = if opts.seq_len > 0 { opts.seq_len } else { 256.min(config.context()) };
    if seq_len > config.context() {
        return Err(format!("--seq-len {seq_len} exceeds the model context {}", config.context()).into());
    }
    if opts.world == 0 || batch % opts.world != 0 {
        return Err(format!("--batch {batch} must be a positive multiple of --world {}", opts.world).into());
    }
    let device = crate::train::parse_device(&opts.device)?;
    let compute_dtype = crate::train::parse_precision(&opts.precision)?;
    let mut rng = SplitMix64::new(42);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect() };
    let (inputs, targets) = (tokens(batch * seq_len), tokens(batch * seq_len));
    let hyper = AdamWHyper { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let options = EngineOptions { stage: ZeroStage::new(opts.stage)?, recompute: opts.recompute, compute_dtype, ..EngineOptions::single() };
    let world = opts.world;
    let rows = batch / world;
    let per_rank = run_ranks(world, Duration::from_secs(600), |comm: LocalComm| -> Result<_, BoxError> {
        let rank = comm.rank();
        let mut engine = Engine::new(config.build()?, comm, 1, device.clone(), options)?;
        if let Some(l) = &loaded {
            engine.load_parameters(&l.params)?;
        }
        let slice = |v: &[u32]| Tensor::from_slice(&v[rank * rows * seq_len..(rank + 1) * rows * seq_len], (rows, seq_len), &device);
        let micro = MicroBatch { inputs: slice(&inputs)?, targets: slice(&targets)? };
        let mut runs: Vec<(StepStats, f64)> = Vec::new();
        for i in 0..opts.warmup + opts.steps {
            let t0 = std::time::Instant::now();
            let stats = engine.train_step(std::slice::from_ref(&micro), 1e-4, &hyper, 1.0)?;
            let total = t0.elapsed().as_secs_f64();
            if i >= opts.warmup {
                runs.push((stats, total));
            }
        }
        Ok((runs, engine.memory_report()))
    })
    .map_err(|e| -> BoxError { e.to_string().into() })?;
    let memory = per_rank.iter().map(|r| r.1).collect();
    let runs = per_rank.into_iter().next().map(|r| r.0).unwrap_or_default();
    let step_s = median(runs.iter().map(|r| r.1).collect());
    let flops = config.train_flops_per_token(seq_len) * (batch * seq_len) as f64;
    Ok(BenchResult {
        forward_s: median(runs.iter().map(|r| r.0.forward_s).collect()),
        backward_s: median(runs.iter().map(|r| r.0.backward_s).collect()),
        optimizer_s: median(runs.iter().map(|r| r.0.optimizer_s).collect()),
        step_s,
        tokens_per_s: (batch * seq_len) as f64 / step_s,
        gflops: flops / step_s / 1e9,
        config,
        batch,
        seq_len,
        memory,
    })
}

/// The table printed by `zero-candle bench`.
pub fn format_table(opts: &BenchOptions, r: &BenchResult) -> String {
    let pct = |x: f64| 100.0 * x / r.step_s;
    format!(
        "model {} ({:.1}M params), batch {} x {}, world {}, ZeRO stage {}, recompute {}, device {}, precision {}, matmul {}, {} timed steps after {} warmup, {} threads\n\
         | phase     | median s | share |\n|-----------|----------|-------|\n\
         | forward   | {:8.3} | {:4.0}% |\n| backward  | {:8.3} | {:4.0}% |\n| optimizer | {:8.3} | {:4.0}% |\n\
         | step      | {:8.3} |  100% |\n\
         tokens/s {:.0}, training GFLOP/s {:.1}",
        opts.preset,
        r.config.num_params() as f64 / 1e6,
        r.batch,
        r.seq_len,
        opts.world,
        opts.stage,
        opts.recompute,
        opts.device,
        opts.precision,
        crate::train::matmul_label(opts.matmul),
        opts.steps,
        opts.warmup,
        rayon::current_num_threads(),
        r.forward_s,
        pct(r.forward_s),
        r.backward_s,
        pct(r.backward_s),
        r.optimizer_s,
        pct(r.optimizer_s),
        r.step_s,
        r.tokens_per_s,
        r.gflops
    )
}

/// `bench --sweep-stages`: stages 0-3 (stage 3 with and without recompute) at `opts.world`,
/// step time relative to stage 0 and rank 0's memory.
pub fn format_sweep(opts: &BenchOptions, results: &[(u8, bool, BenchResult)]) -> String {
    let base = results.first().map(|r| r.2.step_s).unwrap_or(f64::NAN);
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut out = format!(
        "model {}, batch {} x {}, world {}, device {}, precision {}, {} timed steps after {} warmup, {} threads\n\
         | stage | recompute | step s | vs stage 0 | fwd s | bwd s | opt s | rank 0 model state MiB | rank 0 peak gathered MiB |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        opts.preset,
        results.first().map(|r| r.2.batch).unwrap_or(0),
        results.first().map(|r| r.2.seq_len).unwrap_or(0),
        opts.world,
        opts.device,
        opts.precision,
        opts.steps,
        opts.warmup,
        rayon::current_num_threads()
    );
    for (stage, recompute, r) in results {
        let m = r.memory.first().copied().unwrap_or_default();
        out += &format!(
            "| {stage} | {recompute} | {:.3} | {:+.1}% | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} |\n",
            r.step_s,
            100.0 * (r.step_s / base - 1.0),
            r.forward_s,
            r.backward_s,
            r.optimizer_s,
            mib(m.model_state_bytes()),
            mib(m.peak_gathered_bytes)
        );
    }
    out
}
