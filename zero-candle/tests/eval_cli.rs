//! `zero-candle eval` end to end: a model folder saved from an engine (f32 and bf16) evaluated by
//! the program on a `--tokens` file (sequences of different lengths, batched with padding) and on
//! a `--text` file (windows, the last partial), compared with the loss computed directly through
//! the engine one unpadded sequence at a time; and non-zero exits naming the file on bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use datasets::{CharTokenizer, Tokenizer};
use models::{Gpt2, Gpt2Config};
use zero_candle::comm::LocalComm;
use zero_candle::model_io::{self, ExportDtype};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions, MicroBatch};

const VOCAB_TEXT: &str = "abcdefghijklmnopqrstuvwxyz .,\n";

fn zero_candle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zero-candle")).args(args).output().expect("run zero-candle")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zc-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tokenizer() -> Tokenizer {
    Tokenizer::Char(CharTokenizer::from_text(VOCAB_TEXT).unwrap())
}

fn config() -> Gpt2Config {
    Gpt2Config { vocab_size: tokenizer().vocab_size(), context: 24, n_layer: 2, n_head: 2, n_embd: 16, layer_norm_eps: 1e-5 }
}

/// Deterministic parameters far from initialization (so the logits are far from uniform and the
/// loss depends on every weight): uniform values, layer-norm weights around 1.
fn parameters(cfg: &Gpt2Config) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let engine = Engine::new(Gpt2::new(cfg.clone()).unwrap(), single_rank().unwrap(), 3, Device::Cpu, EngineOptions::single()).unwrap();
    let mut s = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    engine
        .full_parameters()
        .unwrap()
        .into_iter()
        .map(|(name, shape, values)| {
            let is_ln_weight = name.contains("ln_") && name.ends_with(".weight");
            let v = values.iter().map(|_| if is_ln_weight { 1.0 + 0.4 * next() } else { 0.8 * next() }).collect();
            (name, (shape, v))
        })
        .collect()
}

fn save(dir: &Path, cfg: &Gpt2Config, params: &HashMap<String, (Vec<usize>, Vec<f32>)>, dtype: ExportDtype) {
    let named: Vec<(&str, &[usize], &[f32])> = params.iter().map(|(n, (s, v))| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    model_io::save_model_folder_as(dir, &models::AnyConfig::Gpt2(cfg.clone()), 16, &named, &tokenizer(), dtype).unwrap();
}

/// An engine holding the weights of a saved folder, as read back (bf16 rounded).
fn engine_for(dir: &Path) -> Engine<models::AnyModel, LocalComm> {
    let loaded = model_io::load_model_folder(dir).unwrap();
    let mut engine = Engine::new(loaded.config.build().unwrap(), single_rank().unwrap(), 0, Device::Cpu, EngineOptions::single()).unwrap();
    engine.load_parameters(&loaded.params).unwrap();
    engine
}

/// Summed next-token loss over `rows` (inputs, targets), each evaluated alone with no padding.
fn direct_loss(engine: &mut Engine<models::AnyModel, LocalComm>, rows: &[(Vec<u32>, Vec<u32>)]) -> (f64, usize) {
    let (mut sum, mut count) = (0.0, 0);
    for (x, y) in rows {
        let b = MicroBatch {
            inputs: Tensor::from_vec(x.clone(), (1, x.len()), &Device::Cpu).unwrap(),
            targets: Tensor::from_vec(y.clone(), (1, y.len()), &Device::Cpu).unwrap(),
        };
        sum += engine.eval_loss(&[b]).unwrap() * y.len() as f64;
        count += y.len();
    }
    (sum, count)
}

fn report(o: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "eval failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["loss", "model", "perplexity", "tokens", "tokens_per_s"]);
    let loss = v["loss"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() <= 1e-9 * loss.exp());
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    v
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

fn token_sequences(vocab: u32) -> Vec<Vec<u32>> {
    // Different lengths (2 ..= the context of 24), so batches of 3 pad most rows.
    [24usize, 2, 9, 17, 5, 24, 11]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| ((i * 7 + j * j * 3 + j) % vocab as usize) as u32).collect())
        .collect()
}

#[test]
fn eval_tokens_matches_the_engine_in_f32_and_bf16() {
    let dir = temp("tokens");
    let cfg = config();
    let params = parameters(&cfg);
    let (f32_dir, bf16_dir) = (dir.join("model-f32"), dir.join("model-bf16"));
    save(&f32_dir, &cfg, &params, ExportDtype::F32);
    save(&bf16_dir, &cfg, &params, ExportDtype::Bf16);
    let seqs = token_sequences(cfg.vocab_size as u32);
    let tokens_file = dir.join("tokens.json");
    std::fs::write(&tokens_file, serde_json::to_string(&seqs).unwrap()).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = seqs.iter().map(|s| (s[..s.len() - 1].to_vec(), s[1..].to_vec())).collect();

    let mut losses = Vec::new();
    for model in [&f32_dir, &bf16_dir] {
        let (sum, count) = direct_loss(&mut engine_for(model), &rows);
        let want = sum / count as f64;
        let v = report(&zero_candle(&["eval", "--model", &model.display().to_string(), "--tokens", &tokens_file.display().to_string(), "--batch", "3"]));
        assert_eq!(v["tokens"], count);
        assert_eq!(v["model"], model.display().to_string());
        let got = v["loss"].as_f64().unwrap();
        assert!(rel(got, want) < 1e-5, "{}: eval {got} vs engine {want}", model.display());
        // Far from the uniform ln(V) = 3.4: the weights matter.
        assert!((got - (cfg.vocab_size as f64).ln()).abs() > 0.05, "loss {got}");
        losses.push(got);
    }
    assert!(rel(losses[1], losses[0]) < 1e-2, "bf16 {} vs f32 {}", losses[1], losses[0]);
    assert!(losses[1] != losses[0], "the bf16 folder holds rounded weights");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_text_uses_windows_with_the_last_partial_one() {
    let dir = temp("text");
    let cfg = config();
    let model = dir.join("model");
    save(&model, &cfg, &parameters(&cfg), ExportDtype::F32);
    let text = "the quick brown fox jumps over the lazy dog.\nand then, it naps.";
    let text_file = dir.join("input.txt");
    std::fs::write(&text_file, text).unwrap();

    let ids = tokenizer().encode(text).unwrap();
    let mut engine = engine_for(&model);
    for (seq_len, window) in [("5", 5usize), ("0", 16)] {
        // Windows written out here: window k predicts tokens k*w+1 ..= (k+1)*w.
        let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..ids.len() - 1)
            .step_by(window)
            .map(|s| {
                let e = (s + window).min(ids.len() - 1);
                (ids[s..e].to_vec(), ids[s + 1..e + 1].to_vec())
            })
            .collect();
        assert!(rows.last().unwrap().1.len() < window, "the text ends in a partial window");
        let (sum, count) = direct_loss(&mut engine, &rows);
        assert_eq!(count, ids.len() - 1);
        let v = report(&zero_candle(&[
            "eval", "--model", &model.display().to_string(), "--text", &text_file.display().to_string(), "--seq-len", seq_len, "--batch", "4",
        ]));
        assert_eq!(v["tokens"], ids.len() - 1);
        let (got, want) = (v["loss"].as_f64().unwrap(), sum / count as f64);
        assert!(rel(got, want) < 1e-5, "--seq-len {seq_len}: eval {got} vs engine {want}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let o = zero_candle(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail; stdout: {}", String::from_utf8_lossy(&o.stdout));
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
    }
}

#[test]
fn eval_bad_input_exits_nonzero_naming_the_file() {
    let dir = temp("bad");
    let cfg = config();
    let model = dir.join("model");
    save(&model, &cfg, &parameters(&cfg), ExportDtype::F32);
    let m = model.display().to_string();
    let file = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };

    let missing = dir.join("nope.json").display().to_string();
    fails_with(&["eval", "--model", &m, "--tokens", &missing], &[&missing]);
    let bad_json = file("bad.json", "[[1, 2,");
    fails_with(&["eval", "--model", &m, "--tokens", &bad_json], &[&bad_json, "invalid JSON"]);
    let out_of_vocab = file("oov.json", &format!("[[1, 2, 3], [4, {}]]", cfg.vocab_size));
    fails_with(&["eval", "--model", &m, "--tokens", &out_of_vocab], &[&out_of_vocab, "sequence 1", "vocabulary"]);
    let too_long = file("long.json", &serde_json::to_string(&[vec![1u32; 3], vec![2u32; cfg.context + 1]]).unwrap());
    fails_with(&["eval", "--model", &m, "--tokens", &too_long], &[&too_long, "sequence 1", "context"]);
    let short = file("short.json", "[[1, 2], [3]]");
    fails_with(&["eval", "--model", &m, "--tokens", &short], &[&short, "sequence 1"]);
    let empty = file("empty.txt", "");
    fails_with(&["eval", "--model", &m, "--text", &empty], &[&empty, "empty"]);
    let unknown_char = file("unknown.txt", "ABC");
    fails_with(&["eval", "--model", &m, "--text", &unknown_char], &[&unknown_char]);
    let text = file("ok.txt", "hello there");
    fails_with(&["eval", "--model", &m, "--text", &text, "--seq-len", "25"], &["--seq-len", "25"]);
    let no_model = dir.join("no-model").display().to_string();
    fails_with(&["eval", "--model", &no_model, "--text", &text], &[&no_model]);
    fails_with(&["eval", "--model", &m], &["--text"]);
    let _ = std::fs::remove_dir_all(&dir);
}
