//! Prompt/completion (.jsonl) fine-tuning: the loss counts completion tokens only. Checked
//! directly through the engine at world 2, ZeRO stage 2 (prompt targets are IGNORE_INDEX and
//! the step's loss and eval loss equal the mean over completion tokens computed from the
//! logits), and end to end with `zero-candle finetune` on a tiny Llama folder with SmolLM2's
//! tokenizer at world 2 stage 2: the validation loss falls, a resumed mid-run checkpoint
//! reproduces the uninterrupted run's losses bitwise, and a malformed line is an error naming
//! the file and line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use candle_core::{Device, Tensor};
use datasets::{CompletionDataset, Split, TokenizerSpec};
use models::Llama;
use zero_candle::comm::{run_ranks, Comm};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions, MicroBatch, ZeroStage};

mod common;
use common::{by_name, root, tiny_llama_config, tiny_llama_folder, tiny_llama_params, tokenizer_path};

const NAMES: [&str; 8] = ["Zorvia", "Quell", "Brandor", "Mistral", "Oskland", "Pellia", "Tarn", "Vexmoor"];

/// Pair `i`: "Q: what is the capital of X?" -> " A: Xville".
fn pair(i: usize) -> (String, String) {
    let name = format!("{}{}", NAMES[i % NAMES.len()], i / NAMES.len());
    (format!("Q: what is the capital of {name}?"), format!(" A: {name}ville"))
}

/// Pairs 0..n, one JSON object a line.
fn write_jsonl(path: &Path, n: usize) {
    let lines: String = (0..n)
        .map(|i| {
            let (prompt, completion) = pair(i);
            serde_json::json!({"prompt": prompt, "completion": completion}).to_string() + "\n"
        })
        .collect();
    std::fs::write(path, lines).unwrap();
}

fn temp_base(label: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!("zc-completions-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base
}

fn micro(b: &datasets::Batch) -> MicroBatch {
    let shape = (b.rows, b.context);
    MicroBatch { inputs: Tensor::from_vec(b.inputs.clone(), shape, &Device::Cpu).unwrap(), targets: Tensor::from_vec(b.targets.clone(), shape, &Device::Cpu).unwrap() }
}

#[test]
fn loss_is_the_mean_over_completion_tokens_at_world_2_stage_2() {
    assert_eq!(datasets::IGNORE_TARGET, kernels::IGNORE_INDEX);
    let base = temp_base("engine");
    let jsonl = base.join("qa.jsonl");
    write_jsonl(&jsonl, 40);
    // 6 validation examples: two batches of 4, the second completed by two ignored rows (all of
    // rank 1's share of it).
    let data = CompletionDataset::load(&[jsonl], TokenizerSpec::HuggingFace(tokenizer_path()), 0.15).unwrap();
    let context = 32;
    let batches = data.val_batches(4, context, 10).unwrap();
    assert_eq!(batches.len(), 2);
    let val = data.examples(Split::Val);
    assert_eq!(val.len(), 6);
    let tok = data.tokenizer();
    for (i, ex) in val.iter().enumerate() {
        let (b, r) = (&batches[i / 4], i % 4);
        let targets = &b.targets[r * context..(r + 1) * context];
        // The last 6 of the 40 pairs, in order; the row starts with prompt and completion.
        let (prompt, completion) = pair(34 + i);
        let (prompt, completion) = (tok.encode(&prompt).unwrap(), tok.encode(&completion).unwrap());
        assert_eq!(ex.prompt_len, prompt.len());
        assert_eq!(&b.inputs[r * context..r * context + prompt.len()], &prompt[..]);
        assert_eq!(ex.tokens.len(), prompt.len() + completion.len() + 1);
        for (t, &target) in targets.iter().enumerate() {
            let counted = t + 1 >= ex.prompt_len && t + 1 < ex.tokens.len();
            assert_eq!(target == kernels::IGNORE_INDEX, !counted, "example {i} position {t}");
        }
        // The completion ends with the EOS token: <|im_end|>, as tokenizer_config.json says.
        assert_eq!(ex.tokens.last(), Some(&2));
    }

    // The mean over completion targets, computed from world-1 logits.
    let params = tiny_llama_params();
    let mut solo = Engine::new(Llama::new(tiny_llama_config()).unwrap(), single_rank().unwrap(), 1, Device::Cpu, EngineOptions::single()).unwrap();
    solo.load_parameters(&by_name(&params)).unwrap();
    let (mut sum, mut count, mut total) = (0f64, 0usize, 0usize);
    for b in &batches {
        let logits = solo.logits(&micro(b).inputs).unwrap().to_vec3::<f32>().unwrap();
        for (i, &target) in b.targets.iter().enumerate() {
            total += 1;
            if target == kernels::IGNORE_INDEX {
                continue;
            }
            let row = &logits[i / context][i % context];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - row[target as usize] as f64;
            count += 1;
        }
    }
    let expected = sum / count as f64;
    assert!(count < total / 2, "most positions are prompt or padding: {count} of {total}");

    let results = run_ranks(2, Duration::from_secs(60), |comm| -> Result<(f64, usize, f64), Box<dyn std::error::Error + Send + Sync>> {
        let rank = comm.rank();
        let options = EngineOptions { stage: ZeroStage::new(2)?, ..EngineOptions::single() };
        let mut engine = Engine::new(Llama::new(tiny_llama_config())?, comm, 1, Device::Cpu, options)?;
        engine.load_parameters(&by_name(&params))?;
        let mine: Vec<MicroBatch> = batches.iter().map(|b| micro(&b.rank_rows(rank, 2).unwrap())).collect();
        let eval = engine.eval_loss(&mine)?;
        let stats = engine.compute_gradients(&mine)?;
        Ok((stats.loss, stats.tokens, eval))
    })
    .unwrap();
    for (rank, (loss, tokens, eval)) in results.into_iter().enumerate() {
        assert_eq!(tokens, count, "rank {rank}: the step counts completion targets only");
        assert!((loss - expected).abs() < 1e-5 * expected, "rank {rank}: step loss {loss} vs {expected}");
        assert!((eval - expected).abs() < 1e-5 * expected, "rank {rank}: eval loss {eval} vs {expected}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn metric_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("event").is_none())
        .collect()
}

/// (step, key) -> value bits, for rows that have `key`.
fn series(rows: &[serde_json::Value], key: &str) -> Vec<(u64, u64)> {
    rows.iter().filter(|r| r.get(key).is_some()).map(|r| (r["step"].as_u64().unwrap(), r[key].as_f64().unwrap().to_bits())).collect()
}

#[test]
fn finetune_on_jsonl_lowers_val_loss_and_resumes_bitwise_at_world_2_stage_2() {
    let base = temp_base("cli");
    let model = base.join("tiny-llama");
    tiny_llama_folder(&model);
    let jsonl = base.join("qa.jsonl");
    write_jsonl(&jsonl, 40);
    let bin = env!("CARGO_BIN_EXE_zero-candle");
    let args = |out: &Path| -> Vec<String> {
        [
            "finetune", "--model", &model.display().to_string(), "--data", &jsonl.display().to_string(),
            "--world", "2", "--zero-stage", "2", "--set", "train.max_steps=30", "--set", "train.lr=3e-3",
            "--set", "train.warmup_steps=5", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
            "--set", "train.eval_interval=10", "--set", "train.eval_batches=4", "--set", "checkpoint.every_steps=15",
            "--set", "checkpoint.keep_last=0", "--set", "sample.max_new_tokens=5", "--set", &format!("train.out_dir={}", out.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let out = base.join("run");
    let o = Command::new(bin).args(args(&out)).current_dir(root()).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("loss on completion tokens only"), "{stdout}");
    let rows = metric_rows(&out);
    let vals: Vec<f64> = series(&rows, "val_loss").iter().map(|&(_, b)| f64::from_bits(b)).collect();
    assert_eq!(vals.len(), 3, "{vals:?}");
    assert!(vals[2] < vals[0] - 1.0, "val loss did not fall: {vals:?}");

    // Resume the step-15 checkpoint at the same world size and stage: steps 16-30 bitwise.
    let out2 = base.join("run2");
    let mut resume = args(&out2);
    resume.extend(["--resume".to_string(), out.join("step_000015").display().to_string()]);
    let o = Command::new(bin).args(&resume).current_dir(root()).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let rows2 = metric_rows(&out2);
    let after = |s: Vec<(u64, u64)>| s.into_iter().filter(|&(step, _)| step > 15).collect::<Vec<_>>();
    let (losses, losses2) = (after(series(&rows, "loss")), series(&rows2, "loss"));
    assert_eq!(losses.len(), 15);
    assert_eq!(losses, losses2, "resumed losses differ");
    assert_eq!(after(series(&rows, "val_loss")), series(&rows2, "val_loss"));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn finetune_reports_a_malformed_line_with_file_and_line() {
    let base = temp_base("bad");
    let model = base.join("tiny-llama");
    tiny_llama_folder(&model);
    let jsonl = base.join("bad.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"Q\", \"completion\": \" A\"}\n{\"prompt\": \"Q\", \"completion\": \" A\"}\n{\"prompt\": \"Q\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_zero-candle"))
        .args(["finetune", "--model", &model.display().to_string(), "--data", &jsonl.display().to_string()])
        .args(["--set", &format!("train.out_dir={}", base.join("run").display())])
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("bad.jsonl: line 3: missing key \"completion\""), "{stderr}");
    let _ = std::fs::remove_dir_all(&base);
}
