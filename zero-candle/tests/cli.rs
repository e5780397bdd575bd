//! The `zero-candle` program end to end: a tiny training run on the bundled Shakespeare (from the
//! workspace root, as the README runs it), its metrics and model folder, `sample` and `prepare`,
//! and non-zero exits with clear messages on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn zero_candle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zero-candle")).args(args).current_dir(root()).output().expect("run zero-candle")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zc-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn tiny_training_run_lowers_loss_writes_metrics_model_and_sample() {
    let out = temp("train");
    let out_s = out.display().to_string();
    let o = zero_candle(&[
        "train",
        "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2",
        "--set", "train.seq_len=32", "--set", "train.batch_size=8", "--set", "train.max_steps=60",
        "--set", "train.warmup_steps=5", "--set", "train.eval_interval=30", "--set", "train.eval_batches=4",
        "--set", "sample.max_new_tokens=40", "--set", &format!("train.out_dir={out_s}"),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "train failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("--- sample ---"), "{stdout}");

    let recs = records(&out.join("metrics.jsonl"));
    let losses: Vec<f64> = recs.iter().filter(|r| r.get("loss").is_some() && r.get("step").is_some()).map(|r| r["loss"].as_f64().unwrap()).collect();
    let vals: Vec<f64> = recs.iter().filter(|r| r.get("val_loss").is_some() && r.get("step").is_some()).map(|r| r["val_loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 60);
    assert_eq!(vals.len(), 2, "val_loss at steps 30 and 60");
    // ln(80) = 4.38 at initialization; a working trainer gets well below within 60 steps.
    assert!(losses[0] > 4.0, "initial loss {}", losses[0]);
    assert!(vals[1] < 3.3, "val loss after 60 steps {vals:?}");

    // The model folder samples.
    let model = out.join("model");
    assert!(model.join("model.safetensors").is_file() && model.join("config.json").is_file());
    let o = zero_candle(&["sample", "--model", &model.display().to_string(), "--prompt", "ROMEO:", "--max-new-tokens", "20"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("ROMEO:") && text.trim_end().chars().count() >= 20, "{text}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn unknown_config_key_exits_nonzero_naming_it() {
    let o = zero_candle(&["train", "--set", "train.max_stepz=3"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("max_stepz"), "{err}");
}

#[test]
fn missing_data_source_exits_nonzero_naming_the_path() {
    let out = temp("missing");
    let o = zero_candle(&["train", "--set", "data.sources=[\"/nonexistent/texts\"]", "--set", &format!("train.out_dir={}", out.display())]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/texts"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn prepare_writes_a_dataset_and_sample_rejects_a_missing_model() {
    let out = temp("prepare");
    let o = zero_candle(&["prepare", "--input", "data/shakespeare/tempest_gut.txt", "--out", &out.display().to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert!(meta["train_tokens"].as_u64().unwrap() > 80_000, "{meta}");
    let o = zero_candle(&["sample", "--model", "/nonexistent/model"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn zero_stage3_at_world2_trains_and_reports_per_rank_memory() {
    let out = temp("zero3");
    let o = zero_candle(&[
        "train", "--world", "2", "--zero-stage", "3",
        "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "train.seq_len=16", "--set", "train.batch_size=4", "--set", "train.max_steps=5",
        "--set", "train.eval_batches=2", "--set", "sample.max_new_tokens=5",
        "--set", &format!("train.out_dir={}", out.display()),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("world 2, ZeRO stage 3, recompute true"), "{stdout}");
    let recs = records(&out.join("metrics.jsonl"));
    let memory: Vec<&serde_json::Value> = recs.iter().filter(|r| r["event"] == "memory" && r["when"] == "after step 1").collect();
    assert_eq!(memory.len(), 2, "one memory record per rank");
    for m in memory {
        assert_eq!(m["params_bytes"].as_f64(), Some(0.0), "stage 3 keeps no parameters between steps: {m}");
        assert!(m["peak_gathered_bytes"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert_eq!(recs.iter().filter(|r| r.get("loss").is_some() && r.get("step").is_some()).count(), 5);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn batch_not_divisible_by_world_exits_nonzero_naming_both() {
    let o = zero_candle(&["train", "--world", "3", "--set", "train.batch_size=16"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("train.batch_size") && err.contains("world_size"), "{err}");
}

#[test]
fn a_hub_id_resolves_in_the_local_hugging_face_cache_and_a_missing_one_names_where_it_looked() {
    // Train a tiny model, then lay its folder out as the hub cache does.
    let out = temp("hub");
    let o = zero_candle(&[
        "train", "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "train.seq_len=16", "--set", "train.batch_size=4", "--set", "train.max_steps=2",
        "--set", "train.eval_batches=1", "--set", "sample.max_new_tokens=2", "--set", "checkpoint.at_end=false",
        "--set", &format!("train.out_dir={}", out.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let repo = out.join("hf/hub/models--org--tiny");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(out.join("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snapshot.join(f.file_name())).unwrap();
    }
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_zero-candle"))
            .args(["generate", "--model", id, "--max-new-tokens", "3"])
            .env("HF_HOME", out.join("hf"))
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(root())
            .output()
            .unwrap()
    };
    let o = run("org/tiny");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run("org/absent");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("models--org--absent") && err.contains("HF_HUB_OFFLINE=1"), "{err}");
    // Not offline: the hf-hub download is attempted; an unreachable endpoint is a clear error.
    let o = Command::new(env!("CARGO_BIN_EXE_zero-candle"))
        .args(["generate", "--model", "org/absent", "--max-new-tokens", "3"])
        .env("HF_HOME", out.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot download config.json of org/absent from http://127.0.0.1:9"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
