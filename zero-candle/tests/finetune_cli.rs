//! `zero-candle finetune` on a Llama folder: a tiny Llama with SmolLM2's tokenizer (49152 tokens)
//! is written as a Hugging Face folder, fine-tuned on a Shakespeare play at world 2, ZeRO stage 3;
//! its validation loss falls, the run's model folder is a Llama folder that `eval` reads, and a
//! checkpoint of it resumes.

use std::path::Path;
use std::process::Command;

mod common;
use common::{root, tiny_llama_folder};

fn val_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("val_loss").is_some() && r.get("event").is_none())
        .map(|r| r["val_loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn finetune_llama_folder_lowers_val_loss_exports_a_llama_folder_and_resumes() {
    let base = std::env::temp_dir().join(format!("zc-finetune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model = base.join("tiny-llama");
    tiny_llama_folder(&model);
    let out = base.join("run");
    let bin = env!("CARGO_BIN_EXE_zero-candle");
    let args = |steps: &str| -> Vec<String> {
        [
            "finetune", "--model", &model.display().to_string(), "--data", "data/shakespeare/tempest_gut.txt",
            "--world", "2", "--zero-stage", "3", "--set", &format!("train.max_steps={steps}"), "--set", "train.lr=3e-3",
            "--set", "train.warmup_steps=5", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
            "--set", "train.eval_interval=15", "--set", "train.eval_batches=4", "--set", "checkpoint.every_steps=15",
            "--set", "sample.max_new_tokens=5", "--set", &format!("train.out_dir={}", out.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let o = Command::new(bin).args(args("30")).current_dir(root()).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("llama 2 layers"), "{stdout}");
    let vals = val_losses(&out);
    assert_eq!(vals.len(), 2);
    // From random init (ln 49152 = 10.8): 15 steps of 128 tokens move it by ~0.4.
    assert!(vals[1] < vals[0] - 0.2, "val loss did not fall: {vals:?}");

    // The run's model folder is a Llama folder that eval reads.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    let o = Command::new(bin).args(["eval", "--model", &out.join("model").display().to_string(), "--text", "data/shakespeare/tempest_gut.txt"]).current_dir(root()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["loss"].as_f64().unwrap() < vals[0], "{report} vs first val loss {}", vals[0]);

    // Resume the step-15 checkpoint at world 1 stage 0 and continue to 30.
    let mut resume = args("30");
    resume.extend(["--resume".to_string(), out.join("step_000015").display().to_string()]);
    resume.iter_mut().for_each(|a| {
        if a == "2" {
            *a = "1".into();
        }
    });
    let out2 = base.join("run2");
    let last = resume.len() - 3;
    resume[last] = format!("train.out_dir={}", out2.display());
    let o = Command::new(bin).args(&resume).current_dir(root()).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&base);
}
