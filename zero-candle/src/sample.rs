//! Text generation from a trained engine: temperature, top-k and top-p sampling (temperature 0 =
//! greedy) with a KV cache: one forward over the prompt, then one forward of a single token per new
//! token. When the cache would outgrow the `context` window it is dropped and refilled with the
//! last `context / 2` tokens (so the refill costs one prefill per `context / 2` tokens; the model
//! then sees between `context / 2` and `context` tokens of history). Models without a cache
//! (`BlockModel::supports_kv_cache` false) re-run the cropped window for every token instead.

use candle_core::{DType, Device, Result, Tensor};
use models::block_model::KvCache;
use models::BlockModel;

use crate::comm::Comm;
use crate::engine::Engine;
use crate::rng::SplitMix64;

/// Pick a token from `logits` (one row, f32) with `temperature`, `top_k` (0 = all) and nucleus
/// `top_p` (keep the most likely tokens whose probabilities sum to at least `top_p`; 1 = all).
pub fn pick_token(logits: &[f32], temperature: f64, top_k: usize, top_p: f64, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0usize, |best, (i, &v)| if v > logits[best] { i } else { best }) as u32;
    if temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = logits[order[0]] as f64;
    let mut weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
    let mut total: f64 = weights.iter().sum();
    if top_p < 1.0 {
        // Smallest prefix (most likely first) whose probability reaches top_p.
        let mut cumulative = 0.0;
        let keep = weights.iter().position(|w| {
            cumulative += w / total;
            cumulative >= top_p
        });
        let keep = keep.map_or(weights.len(), |k| k + 1);
        order.truncate(keep);
        weights.truncate(keep);
        total = weights.iter().sum();
    }
    let mut u = rng.next_f64() * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    order[order.len() - 1] as u32
}

/// Continue `prompt` (token ids) by `max_new_tokens`, keeping at most `context` tokens as input.
pub fn generate<M: BlockModel, C: Comm>(
    engine: &mut Engine<M, C>,
    prompt: &[u32],
    max_new_tokens: usize,
    context: usize,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    seed: u64,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("generate: the prompt encodes to no tokens; give a non-empty prompt");
    }
    let mut rng = SplitMix64::new(seed);
    let mut tokens = prompt.to_vec();
    let context = context.max(1);
    let cached = engine.model.supports_kv_cache();
    let mut cache = KvCache::new();
    for _ in 0..max_new_tokens {
        let feed: &[u32] = if !cached || cache.is_empty() {
            &tokens[tokens.len().saturating_sub(context)..]
        } else if cache.len() + 1 > context {
            // Positions past the window do not exist (GPT-2) or were never trained on, and cached
            // keys cannot be shifted (their values depend on the dropped history): start over from
            // the recent half, which leaves room for context / 2 cheap steps before the next refill.
            cache.clear();
            &tokens[tokens.len() - (context / 2).max(1)..]
        } else {
            &tokens[tokens.len() - 1..]
        };
        let ids = Tensor::from_slice(feed, (1, feed.len()), &engine.device)?;
        let logits = if cached { engine.logits_cached(&ids, &mut cache)? } else { engine.logits(&ids)? }; // (1, T, V)
        let last = logits.get(0)?.get(feed.len() - 1)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        tokens.push(pick_token(&last, temperature, top_k, top_p, &mut rng));
    }
    Ok(tokens[prompt.len()..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_argmax_and_top1_is_greedy() {
        let mut rng = SplitMix64::new(1);
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(pick_token(&logits, 0.0, 0, 1.0, &mut rng), 1);
        for _ in 0..20 {
            assert_eq!(pick_token(&logits, 1.0, 1, 1.0, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_likely_prefix() {
        let mut rng = SplitMix64::new(3);
        // Probabilities 0.6, 0.3, 0.1: top_p 0.5 keeps only the first, 0.85 the first two.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        for _ in 0..50 {
            assert_eq!(pick_token(&logits, 1.0, 0, 0.5, &mut rng), 0);
            assert_ne!(pick_token(&logits, 1.0, 0, 0.85, &mut rng), 2);
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let mut rng = SplitMix64::new(7);
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let n = 20_000;
        let ones = (0..n).filter(|_| pick_token(&logits, 1.0, 0, 1.0, &mut rng) == 1).count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.02, "sampled frequency {p}");
    }
}
