//! `zero-candle estimate`: model-state bytes per rank for each ZeRO stage, as in the ZeRO paper
//! (Rajbhandari et al. 2020, section 3.1 and figure 1): mixed-precision Adam holds 2 bytes of fp16
//! parameters, 2 of fp16 gradients and K = 12 of fp32 master weights and moments per parameter,
//! so stage 0 needs 16P, stage 1 4P + 12P/N, stage 2 2P + 14P/N and stage 3 16P/N bytes per rank.
//! With a preset, P comes from the real layout (each unit padded to a multiple of N), and stage 3
//! adds the peak of gathered parameters (the root unit and two blocks: the one in use and the one
//! prefetched). This engine holds exactly that with `train.precision = "bf16"` and
//! `parallel.grad_dtype = "bf16"`; a second table gives its default, fp32 gradient buffers
//! (4 bytes per gradient, exact accumulation).

use models::{BlockModel, Gpt2, Gpt2Config};

/// Bytes per rank for one stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageBytes {
    pub stage: u8,
    pub params: f64,
    pub grads: f64,
    pub optimizer: f64,
    /// Stage 3 only: gathered parameters alive at once (root + two blocks).
    pub gathered_peak: f64,
}

impl StageBytes {
    pub fn model_state(&self) -> f64 {
        self.params + self.grads + self.optimizer
    }
}

/// What to size: `padded` = sum of per-unit padded sizes, `numel` = parameters,
/// `gathered_peak_numel` = root + two largest blocks (0 without a layout).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub numel: f64,
    pub padded: f64,
    pub gathered_peak_numel: f64,
}

impl Sizes {
    pub fn from_params(params: f64) -> Self {
        Self { numel: params, padded: params, gathered_peak_numel: 0.0 }
    }

    pub fn from_preset(preset: &str, vocab_size: usize, world: usize) -> Result<Self, String> {
        let model = Gpt2::new(Gpt2Config::preset(preset, vocab_size).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let units = model.units();
        let numel: usize = units.iter().map(|u| u.numel()).sum();
        let padded: usize = units.iter().map(|u| u.numel().div_ceil(world) * world).sum();
        let mut blocks: Vec<usize> = units[1..].iter().map(|u| u.numel()).collect();
        blocks.sort_unstable_by(|a, b| b.cmp(a));
        let peak = units[0].numel() + blocks.iter().take(2).sum::<usize>();
        Ok(Self { numel: numel as f64, padded: padded as f64, gathered_peak_numel: peak as f64 })
    }
}

/// Per-stage bytes with `param_bytes`/`grad_bytes` per element and 12 bytes of fp32 optimizer
/// state (master, exp_avg, exp_avg_sq). `param_shard_bytes` is what a stage-3 rank keeps of its
/// parameter shard between steps (2 in the paper and in this engine with 2-byte compute).
pub fn stage_bytes(s: &Sizes, world: usize, param_bytes: f64, grad_bytes: f64, param_shard_bytes: f64) -> Vec<StageBytes> {
    let n = world as f64;
    (0..=3u8)
        .map(|stage| {
            let sharded = |yes: bool, bytes: f64| if yes { bytes * s.padded / n } else { bytes * s.numel };
            StageBytes {
                stage,
                params: if stage >= 3 { param_shard_bytes * s.padded / n } else { param_bytes * s.numel },
                grads: sharded(stage >= 2, grad_bytes),
                optimizer: sharded(stage >= 1, 12.0),
                gathered_peak: if stage >= 3 { param_bytes * s.gathered_peak_numel } else { 0.0 },
            }
        })
        .collect()
}

fn gb(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else {
        format!("{:.1} MB", bytes / 1e6)
    }
}

/// The tables printed by `zero-candle estimate`.
pub fn format_estimate(s: &Sizes, world: usize, what: &str) -> String {
    let mut out = format!("{what}: {:.4e} parameters, world size {world}\n", s.numel);
    let table = |title: &str, rows: &[StageBytes]| -> String {
        let mut t = format!("\n{title}\n| stage | params | grads | optimizer | model state per rank | + gathered peak (stage 3) |\n|---|---|---|---|---|---|\n");
        for r in rows {
            let peak = if r.stage == 3 && r.gathered_peak > 0.0 { gb(r.model_state() + r.gathered_peak) } else { "-".into() };
            t += &format!("| {} | {} | {} | {} | {} | {} |\n", r.stage, gb(r.params), gb(r.grads), gb(r.optimizer), gb(r.model_state()), peak);
        }
        t
    };
    out += &table("ZeRO paper accounting (fp16/bf16 params and grads, fp32 Adam: 2 + 2 + 12 bytes per parameter)", &stage_bytes(s, world, 2.0, 2.0, 2.0));
    out += &table(
        "this engine with bf16 compute and its default fp32 gradient buffers (parallel.grad_dtype = \"f32\"; with \"bf16\" it holds the table above)",
        &stage_bytes(s, world, 2.0, 4.0, 2.0),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_example_7_5b_parameters_on_64_ranks() {
        // ZeRO paper, figure 1: 120, 31.4, 16.6 and 1.9 GB per device.
        let rows = stage_bytes(&Sizes::from_params(7.5e9), 64, 2.0, 2.0, 2.0);
        let totals: Vec<f64> = rows.iter().map(|r| (r.model_state() / 1e8).round() / 10.0).collect();
        assert_eq!(totals, vec![120.0, 31.4, 16.6, 1.9]);
    }

    #[test]
    fn preset_layout_is_padded_and_counts_the_gathered_peak() {
        let s = Sizes::from_preset("gpt2-124m", 50257, 64).unwrap();
        assert_eq!(s.numel, 124_439_808.0);
        assert!(s.padded >= s.numel && s.padded < s.numel + 13.0 * 64.0);
        let block = 12.0 * 768.0 * 768.0 + 13.0 * 768.0;
        let root = 50257.0 * 768.0 + 1024.0 * 768.0 + 2.0 * 768.0;
        assert_eq!(s.gathered_peak_numel, root + 2.0 * block);
    }
}
