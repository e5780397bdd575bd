//! `zero-candle bench`: time full training steps of a preset on random tokens and print the
//! median step split into forward, backward and optimizer, with tokens/s and achieved GFLOP/s
//! (training FLOPs as nanoGPT's estimate_mfu). Results go to docs/benchmarks.md by hand, with the
//! machine, date and command.

use candle_core::{Device, Tensor};
use kernels::AdamWHyper;
use models::{Gpt2, Gpt2Config};

use crate::engine::{Engine, EngineOptions, MicroBatch, StepStats};
use crate::rng::SplitMix64;
use crate::train::BoxError;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: String,
    /// Sequences per step; 0 = the preset's default (12 for char-small/gpt2-mini, 4 for gpt2-124m).
    pub batch: usize,
    pub seq_len: usize,
    /// Vocabulary; 0 = 65 (characters) for the char presets, 50257 for gpt2-124m.
    pub vocab: usize,
    pub steps: usize,
    pub warmup: usize,
}

/// Median of each phase over the timed steps.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub config: Gpt2Config,
    pub batch: usize,
    pub seq_len: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
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
    let big = opts.preset == "gpt2-124m";
    let vocab = if opts.vocab > 0 { opts.vocab } else if big { 50257 } else { 65 };
    let batch = if opts.batch > 0 { opts.batch } else if big { 4 } else { 12 };
    let config = Gpt2Config::preset(&opts.preset, vocab)?;
    let seq_len = if opts.seq_len > 0 { opts.seq_len } else { 256.min(config.context) };
    if seq_len > config.context {
        return Err(format!("--seq-len {seq_len} exceeds the context {} of {}", config.context, opts.preset).into());
    }
    let device = Device::Cpu;
    let mut engine = Engine::new(Gpt2::new(config.clone())?, crate::train::single_rank()?, 1, device.clone(), EngineOptions::single())?;
    let mut rng = SplitMix64::new(42);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect() };
    let batch_data = MicroBatch {
        inputs: Tensor::from_vec(tokens(batch * seq_len), (batch, seq_len), &device)?,
        targets: Tensor::from_vec(tokens(batch * seq_len), (batch, seq_len), &device)?,
    };
    let hyper = AdamWHyper { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut runs: Vec<(StepStats, f64)> = Vec::new();
    for i in 0..opts.warmup + opts.steps {
        let t0 = std::time::Instant::now();
        let stats = engine.train_step(std::slice::from_ref(&batch_data), 1e-4, &hyper, 1.0)?;
        let total = t0.elapsed().as_secs_f64();
        if i >= opts.warmup {
            runs.push((stats, total));
        }
    }
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
    })
}

/// The table printed by `zero-candle bench`.
pub fn format_table(opts: &BenchOptions, r: &BenchResult) -> String {
    let pct = |x: f64| 100.0 * x / r.step_s;
    format!(
        "model {} ({:.1}M params), batch {} x {}, {} timed steps after {} warmup, {} threads\n\
         | phase     | median s | share |\n|-----------|----------|-------|\n\
         | forward   | {:8.3} | {:4.0}% |\n| backward  | {:8.3} | {:4.0}% |\n| optimizer | {:8.3} | {:4.0}% |\n\
         | step      | {:8.3} |  100% |\n\
         tokens/s {:.0}, training GFLOP/s {:.1}",
        opts.preset,
        r.config.num_params() as f64 / 1e6,
        r.batch,
        r.seq_len,
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
