//! Parity with Hugging Face transformers: tiny GPT-2 and Llama folders written by transformers'
//! `save_pretrained` (tests/fixtures/hf/<name>, made by scripts/make_hf_fixtures.py), loaded with
//! `model_io::load_model_folder` and run through the engine, against what transformers computed
//! for the same weights and batch (expected.safetensors): logits, the mean next-token loss, and
//! the gradient of that loss for every parameter.
//!
//! Fixtures: `gpt2` (tied head), `llama` (untied, rope_theta 10000) and `llama_tied` (tied,
//! rope_theta 500: a non-default theta, so a loader that misses the key transformers 5 writes,
//! `rope_parameters.rope_theta`, and falls back to 10000 fails here instead of passing by luck).
//!
//! Tolerances (`assert_close`: |got - expected| <= atol + rtol * |expected|, element by element):
//! - logits: rtol 1e-4, atol 1e-5. Logits are O(1) (max |logit| about 4); both sides compute in
//!   f32 with different summation orders, and the f32 reference itself is within 5e-7 (relative
//!   to the largest logit) of the same model in f64. atol 1e-5 covers logits near zero, where a
//!   relative bound means nothing.
//! - loss: |got - expected| <= 1e-5 * |expected|.
//! - gradients: rtol 1e-3, atol 1e-6 * max|expected| of that parameter (2e-8 to 5e-7 here).
//!   A gradient entry is a sum over 22 predictions and many activations whose terms cancel, so
//!   an entry that ends up near zero keeps the absolute rounding error of its terms (f32 epsilon,
//!   1.2e-7, times their magnitude, which is about the parameter's largest gradient), not a
//!   relative one: the largest absolute slack observed beyond rtol 1e-3 is 1.7e-7 * max|expected|
//!   (2.2e-8 absolute), so 1e-6 * max leaves a margin of about 6. The f32 reference itself is
//!   within 1e-6 of f64 (relative to the parameter's largest entry).
//!
//! Run with `--nocapture` to see the largest observed differences per model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kernels::testing::{assert_close, Tolerance};
use models::{AnyConfig, AnyModel};
use safetensors::{Dtype, SafeTensors};
use zero_candle::comm::LocalComm;
use zero_candle::model_io::{load_model_folder, LoadedModel};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions, MicroBatch};

const LOGITS_TOL: Tolerance = Tolerance { rtol: 1e-4, atol: 1e-5 };
const LOSS_RTOL: f64 = 1e-5;
const GRAD_RTOL: f32 = 1e-3;
/// Gradient atol, as a fraction of the parameter's largest expected |gradient| (see the top).
const GRAD_ATOL_OF_MAX: f32 = 1e-6;

const REGENERATE: &str = "regenerate with `.venv/bin/python scripts/make_hf_fixtures.py` from the repository root";

fn fixture_dir(name: &str) -> PathBuf {
    tests::workspace_root().join("tests").join("fixtures").join("hf").join(name)
}

/// A tensor of expected.safetensors: (shape, values as f64; integer ids converted exactly).
struct Stored {
    shape: Vec<usize>,
    values: Vec<f64>,
}

struct Fixture {
    name: String,
    dir: PathBuf,
    loaded: LoadedModel,
    expected: BTreeMap<String, Stored>,
}

impl Fixture {
    /// Load `tests/fixtures/hf/<name>`; panics naming the missing or unreadable file.
    fn load(name: &str) -> Self {
        let dir = fixture_dir(name);
        for file in ["config.json", "model.safetensors", "tokenizer.json", "expected.safetensors"] {
            let path = dir.join(file);
            assert!(path.is_file(), "missing fixture file {}; {REGENERATE}", path.display());
        }
        let loaded = load_model_folder(&dir).unwrap_or_else(|e| panic!("load_model_folder({}): {e}", dir.display()));
        let path = dir.join("expected.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: not a safetensors file: {e}", path.display()));
        let mut expected = BTreeMap::new();
        for (key, view) in st.tensors() {
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::I64 => view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                other => panic!("{}: tensor {key} is {other:?}; expected F32 or I64", path.display()),
            };
            expected.insert(key, Stored { shape: view.shape().to_vec(), values });
        }
        Self { name: name.to_string(), dir, loaded, expected }
    }

    fn get(&self, key: &str) -> &Stored {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key:?}; {REGENERATE}", self.dir.join("expected.safetensors").display()))
    }

    fn tensor(&self, key: &str) -> Tensor {
        let s = self.get(key);
        let values: Vec<f32> = s.values.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(values, s.shape.as_slice(), &Device::Cpu).unwrap()
    }

    /// input_ids as a (B, T) u32 tensor.
    fn input_ids(&self) -> Tensor {
        let s = self.get("input_ids");
        let vocab = self.loaded.config.vocab_size();
        let ids: Vec<u32> = s
            .values
            .iter()
            .map(|&v| {
                assert!(v >= 0.0 && (v as usize) < vocab, "{}: input id {v} outside the vocabulary of {vocab}", self.name);
                v as u32
            })
            .collect();
        Tensor::from_vec(ids, s.shape.as_slice(), &Device::Cpu).unwrap()
    }

    /// An engine on one rank (stage 0, f32) holding the folder's weights.
    fn engine(&self) -> Engine<AnyModel, LocalComm> {
        let model = self.loaded.config.build().unwrap();
        let mut engine = Engine::new(model, single_rank().unwrap(), 0, Device::Cpu, EngineOptions::single()).unwrap();
        engine
            .load_parameters(&self.loaded.params)
            .unwrap_or_else(|e| panic!("{}: load_parameters: {e}", self.dir.display()));
        engine
    }
}

/// max |a - b| / max |b|: how far apart two tensors are, relative to the reference's scale.
fn max_rel_to_max(a: &[f32], b: &[f64]) -> f64 {
    let diff = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    diff / scale.max(f64::MIN_POSITIVE)
}

/// The largest elementwise |a - b| / |b| over entries with |b| >= `floor` * max |b|.
fn max_elementwise_rel(a: &[f32], b: &[f64], floor: f64) -> f64 {
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    a.iter()
        .zip(b)
        .filter(|(_, y)| y.abs() >= floor * scale && y.abs() > 0.0)
        .map(|(&x, &y)| (x as f64 - y).abs() / y.abs())
        .fold(0.0, f64::max)
}

fn check_logits(name: &str) {
    let f = Fixture::load(name);
    let mut engine = f.engine();
    let logits = engine.logits(&f.input_ids()).unwrap().to_dtype(DType::F32).unwrap();
    let expected = f.tensor("logits");
    assert_eq!(logits.dims(), expected.dims(), "{name}: logits shape");
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = &f.get("logits").values;
    println!(
        "{name}: logits max|d|/max|ref| {:.2e}, max elementwise rel (|ref| >= 1e-2 max) {:.2e}",
        max_rel_to_max(&got, want),
        max_elementwise_rel(&got, want, 1e-2)
    );
    assert_close(&logits, &expected, LOGITS_TOL, &format!("{name}: logits"));
}

/// The engine's loss and gradients for the fixture's batch: inputs = ids[:, :-1], targets =
/// ids[:, 1:], which is what transformers' `labels=input_ids` computes (it drops the last
/// position's logits and the first label), so the mean is over the same B * (T - 1) predictions.
fn engine_after_backward(f: &Fixture) -> (Engine<AnyModel, LocalComm>, f64) {
    let ids = f.input_ids();
    let t = ids.dim(1).unwrap();
    let batch = MicroBatch { inputs: ids.narrow(1, 0, t - 1).unwrap(), targets: ids.narrow(1, 1, t - 1).unwrap() };
    let labels = f.get("labels");
    let targets: Vec<f64> = batch.targets.flatten_all().unwrap().to_vec1::<u32>().unwrap().into_iter().map(f64::from).collect();
    assert_eq!(
        (labels.shape.as_slice(), labels.values.as_slice()),
        (batch.targets.dims(), targets.as_slice()),
        "{}: stored labels are not input_ids[:, 1:]",
        f.name
    );
    let mut engine = f.engine();
    let stats = engine.compute_gradients(std::slice::from_ref(&batch)).unwrap();
    assert_eq!(stats.tokens, labels.values.len(), "{}: target count", f.name);
    (engine, stats.loss)
}

fn check_loss(name: &str) {
    let f = Fixture::load(name);
    let (_, loss) = engine_after_backward(&f);
    let expected = f.get("loss").values[0];
    let rel = (loss - expected).abs() / expected.abs();
    println!("{name}: loss {loss:.7} vs transformers {expected:.7}, relative difference {rel:.2e}");
    assert!(rel <= LOSS_RTOL, "{name}: loss {loss} vs transformers {expected}: relative difference {rel:.2e} > {LOSS_RTOL:e}");
}

fn check_gradients(name: &str) {
    let f = Fixture::load(name);
    let (engine, _) = engine_after_backward(&f);
    let ours: BTreeSet<String> = engine.full_parameters().unwrap().into_iter().map(|(n, _, _)| n).collect();
    let theirs: BTreeSet<String> = f.expected.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
    assert_eq!(ours, theirs, "{name}: the engine's parameters vs the gradients transformers stored");

    let (mut worst_max, mut worst_elem) = ((0.0, String::new()), (0.0, String::new()));
    for param in &ours {
        let key = format!("grad.{param}");
        let want = f.get(&key);
        let (offset, got) = engine.gradient(param).unwrap_or_else(|| panic!("{name}: engine has no gradient for {param}"));
        assert_eq!((offset, got.len()), (0, want.values.len()), "{name}: {param}: gradient extent");
        let scale = want.values.iter().map(|v| v.abs()).fold(0.0, f64::max) as f32;
        assert!(scale > 0.0, "{name}: {param}: transformers' gradient is all zeros; the fixture tests nothing");
        let r = max_rel_to_max(&got, &want.values);
        if r > worst_max.0 {
            worst_max = (r, param.clone());
        }
        let e = max_elementwise_rel(&got, &want.values, 1e-2);
        if e > worst_elem.0 {
            worst_elem = (e, param.clone());
        }
        let tol = Tolerance { rtol: GRAD_RTOL, atol: GRAD_ATOL_OF_MAX * scale };
        let got = Tensor::from_vec(got, want.shape.as_slice(), &Device::Cpu).unwrap();
        assert_close(&got, &f.tensor(&key), tol, &format!("{name}: gradient of {param} (max |expected| {scale:.3e})"));
    }
    println!(
        "{name}: {} gradients; largest max|d|/max|ref| {:.2e} ({}), largest elementwise rel (|ref| >= 1e-2 max) {:.2e} ({})",
        ours.len(),
        worst_max.0,
        worst_max.1,
        worst_elem.0,
        worst_elem.1
    );
}

/// The config parse_hf_config made of config.json agrees with the file on every size and
/// constant the forward uses. transformers 5 writes RoPE's theta as `rope_parameters.rope_theta`
/// (older versions as top-level `rope_theta`); both spellings are accepted here.
fn check_config(name: &str) {
    let f = Fixture::load(name);
    let path = f.dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or_else(|| panic!("{}: no numeric {k:?}", path.display()));
    match &f.loaded.config {
        AnyConfig::Gpt2(c) => {
            let got = [c.vocab_size as f64, c.context as f64, c.n_embd as f64, c.n_layer as f64, c.n_head as f64, c.layer_norm_eps];
            let want = [num("vocab_size"), num("n_positions"), num("n_embd"), num("n_layer"), num("n_head"), num("layer_norm_epsilon")];
            assert_eq!(got, want, "{name}: (vocab, n_positions, n_embd, n_layer, n_head, eps) parsed vs {}", path.display());
            assert_eq!(v["activation_function"], "gelu_new", "{name}: the engine's GPT-2 uses gelu_new");
        }
        AnyConfig::Llama(c) => {
            let theta = v
                .get("rope_theta")
                .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
                .and_then(|x| x.as_f64())
                .unwrap_or_else(|| panic!("{}: neither rope_theta nor rope_parameters.rope_theta", path.display()));
            let got = [
                c.vocab_size as f64,
                c.hidden_size as f64,
                c.intermediate_size as f64,
                c.num_hidden_layers as f64,
                c.num_attention_heads as f64,
                c.num_key_value_heads as f64,
                c.max_position_embeddings as f64,
                c.rms_norm_eps,
            ];
            let want = [
                num("vocab_size"),
                num("hidden_size"),
                num("intermediate_size"),
                num("num_hidden_layers"),
                num("num_attention_heads"),
                num("num_key_value_heads"),
                num("max_position_embeddings"),
                num("rms_norm_eps"),
            ];
            assert_eq!(got, want, "{name}: Llama sizes and rms_norm_eps parsed vs {}", path.display());
            assert_eq!(c.tie_word_embeddings, v["tie_word_embeddings"].as_bool().unwrap(), "{name}: tie_word_embeddings");
            assert_eq!(c.head_dim() as f64, num("head_dim"), "{name}: head_dim");
            assert_eq!(c.rope_theta, theta, "{name}: rope_theta parsed from {} (rope_parameters.rope_theta = {theta})", path.display());
        }
    }
}

macro_rules! parity_tests {
    ($model:ident, $name:literal) => {
        mod $model {
            #[test]
            fn config_json_is_parsed_with_every_size_and_constant() {
                super::check_config($name);
            }
            #[test]
            fn logits_match_transformers_within_rtol_1e4() {
                super::check_logits($name);
            }
            #[test]
            fn mean_next_token_loss_matches_transformers_within_1e5_relative() {
                super::check_loss($name);
            }
            #[test]
            fn every_parameter_gradient_matches_transformers_within_rtol_1e3() {
                super::check_gradients($name);
            }
        }
    };
}

parity_tests!(gpt2, "gpt2");
parity_tests!(llama_untied, "llama");
parity_tests!(llama_tied, "llama_tied");

#[test]
fn a_missing_fixture_fails_naming_its_path() {
    let name = "no_such_fixture";
    let err = std::panic::catch_unwind(|| Fixture::load(name)).err().expect("loading a missing fixture must fail");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    let path = fixture_dir(name).join("config.json");
    assert!(msg.contains(&path.display().to_string()), "message {msg:?} does not name {}", path.display());
}
