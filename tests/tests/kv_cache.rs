//! The KV-cached sampling path against the full forward: for tiny random GPT-2 and Llama (grouped-
//! query attention, tied and untied heads), logits of a 5-token prefill plus 4 single-token steps
//! equal the no-cache forward's at the same positions, and greedy generation through the cache
//! (`sample::generate`) picks the same tokens as a reference written here on `Engine::logits`, both
//! inside the window and across the cache's refills when the window is small.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use kernels::testing::{assert_close, Tolerance};
use models::block_model::KvCache;
use models::{AnyModel, BlockModel, Gpt2, Gpt2Config, Init, Llama, LlamaConfig};
use zero_candle::comm::LocalComm;
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions};

const VOCAB: usize = 29;
const TOL: Tolerance = Tolerance { rtol: 1e-4, atol: 1e-5 };

fn gpt2() -> AnyModel {
    AnyModel::Gpt2(Gpt2::new(Gpt2Config { vocab_size: VOCAB, context: 64, n_layer: 2, n_head: 2, n_embd: 16, layer_norm_eps: 1e-5 }).unwrap())
}

fn llama(tied: bool) -> AnyModel {
    AnyModel::Llama(
        Llama::new(LlamaConfig {
            vocab_size: VOCAB,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
        })
        .unwrap(),
    )
}

fn models() -> Vec<(&'static str, AnyModel)> {
    vec![("gpt2", gpt2()), ("llama tied", llama(true)), ("llama untied", llama(false))]
}

/// An engine with weights far larger than the 0.02 init, so that the logits are peaked and greedy
/// choices are not near-ties that rounding could flip.
fn engine(model: AnyModel) -> Engine<AnyModel, LocalComm> {
    let mut s = 11u64;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut params = HashMap::new();
    for unit in model.units() {
        for p in unit.params {
            let n = p.numel();
            let values: Vec<f32> = match p.init {
                Init::Ones => (0..n).map(|_| 1.0 + 0.1 * next()).collect(),
                Init::Zeros => (0..n).map(|_| 0.1 * next()).collect(),
                Init::Normal { .. } => (0..n).map(|_| 0.5 * next()).collect(),
            };
            params.insert(p.name.clone(), (p.shape.clone(), values));
        }
    }
    let mut e = Engine::new(model, single_rank().unwrap(), 3, Device::Cpu, EngineOptions::single()).unwrap();
    e.load_parameters(&params).unwrap();
    e
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + 3) % VOCAB) as u32).collect()
}

#[test]
fn prefill_then_single_steps_match_the_full_forward() {
    for (name, model) in models() {
        let mut e = engine(model);
        let tokens = prompt(9);
        let full = e.logits(&ids(&tokens)).unwrap(); // (1, 9, V)
        let mut cache = KvCache::new();
        let mut parts = vec![e.logits_cached(&ids(&tokens[..5]), &mut cache).unwrap()];
        assert_eq!(cache.len(), 5, "{name}");
        for i in 5..9 {
            parts.push(e.logits_cached(&ids(&tokens[i..i + 1]), &mut cache).unwrap());
            assert_eq!(cache.len(), i + 1, "{name}");
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        assert_close(&cached, &full, TOL, &format!("{name}: cached logits"));
    }
}

/// Greedy generation on `Engine::logits` over the whole window `tokens[start..]`, with the window
/// start that `generate` uses: the last `context` tokens at first, and once the window would exceed
/// `context`, the last `context / 2` tokens (the cache's refill).
fn greedy_reference(e: &mut Engine<AnyModel, LocalComm>, prompt: &[u32], steps: usize, context: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    let mut start = tokens.len().saturating_sub(context);
    for _ in 0..steps {
        if tokens.len() - start > context {
            start = tokens.len() - (context / 2).max(1);
        }
        let window = &tokens[start..];
        let logits = e.logits(&ids(window)).unwrap();
        let last = logits.get(0).unwrap().get(window.len() - 1).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        tokens.push(zero_candle::sample::pick_token(&last, 0.0, 0, 1.0, &mut zero_candle::rng::SplitMix64::new(0)));
    }
    tokens[prompt.len()..].to_vec()
}

#[test]
fn greedy_generation_with_the_cache_matches_the_full_forward() {
    for (name, model) in models() {
        let mut e = engine(model);
        let p = prompt(5);
        // A window of 64 holds all 35 tokens: a pure prefill plus 30 single steps.
        let cached = zero_candle::sample::generate(&mut e, &p, 30, 64, 0.0, 0, 1.0, 0).unwrap();
        assert_eq!(cached, greedy_reference(&mut e, &p, 30, 64), "{name}");
        // A window of 8 forces refills (and a prompt longer than half the window).
        let cached = zero_candle::sample::generate(&mut e, &prompt(7), 30, 8, 0.0, 0, 1.0, 0).unwrap();
        assert_eq!(cached, greedy_reference(&mut e, &prompt(7), 30, 8), "{name} (window 8)");
        // A prompt longer than the window is cropped to it.
        let cached = zero_candle::sample::generate(&mut e, &prompt(12), 10, 5, 0.0, 0, 1.0, 0).unwrap();
        assert_eq!(cached, greedy_reference(&mut e, &prompt(12), 10, 5), "{name} (long prompt)");
        // The tokens are not all the same (the check would be vacuous on a constant model).
        assert!(cached.iter().any(|&t| t != cached[0]), "{name}: degenerate generation {cached:?}");
    }
}

#[test]
fn models_without_a_cache_say_so() {
    struct NoCache;
    impl BlockModel for NoCache {
        fn units(&self) -> Vec<models::UnitSpec> {
            Vec::new()
        }
        fn num_blocks(&self) -> usize {
            0
        }
        fn embed(&self, _: &[Tensor], _: &Tensor) -> candle_core::Result<models::Carry> {
            candle_core::bail!("unused")
        }
        fn block(&self, _: usize, _: &[Tensor], _: &models::Carry) -> candle_core::Result<models::Carry> {
            candle_core::bail!("unused")
        }
        fn logits(&self, _: &[Tensor], _: &models::Carry) -> candle_core::Result<Tensor> {
            candle_core::bail!("unused")
        }
        fn head_loss(&self, _: &[Tensor], _: &models::Carry, _: &Tensor, _: Option<f64>) -> candle_core::Result<Tensor> {
            candle_core::bail!("unused")
        }
    }
    assert!(!NoCache.supports_kv_cache());
    let err = NoCache.forward_cached(&[], &ids(&[1]), &mut KvCache::new()).unwrap_err();
    assert!(err.to_string().contains("no KV cache"), "{err}");
}
