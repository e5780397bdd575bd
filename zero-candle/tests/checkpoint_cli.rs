//! Checkpoints end to end through the program: bitwise resume at the same world size and stage,
//! resume at other world sizes and stages (re-sliced shards), SIGTERM (finish the step, save,
//! exit 0), kill -9 in the middle of saves (the previous checkpoint stays loadable), bad input
//! (no DONE, truncated, corrupted, missing rank file, another model, unwritable folder), export.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zero-candle"));
    c.current_dir(root());
    c
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zc-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A tiny run: 2 blocks of width 32 on the bundled text, batch 8 x 16.
fn tiny_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train", "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "train.seq_len=16", "--set", "train.batch_size=8", "--set", "train.eval_interval=0",
        "--set", "train.eval_batches=2", "--set", "sample.max_new_tokens=5", "--set", "train.warmup_steps=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--set".into());
    args.push(format!("train.out_dir={}", out.display()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(out: &Path, extra: &[&str]) -> Output {
    let o = bin().args(tiny_args(out, extra)).output().expect("run zero-candle");
    o
}

fn ok(o: &Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    stdout
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure:\n{}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// (step, loss) of every training record in metrics.jsonl.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some() && r.get("step").is_some() && r.get("event").is_none())
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn resume_at_same_world_and_stage_matches_uninterrupted_run_bitwise() {
    let full = temp("full");
    ok(&run(&full, &["--world", "2", "--zero-stage", "3", "--set", "train.max_steps=12", "--set", "checkpoint.every_steps=6"]));
    let uninterrupted = losses(&full);
    assert_eq!(uninterrupted.len(), 12);

    let resumed = temp("resumed");
    let ckpt = full.join("step_000006");
    assert!(ckpt.join("DONE").is_file());
    ok(&run(&resumed, &["--world", "2", "--zero-stage", "3", "--set", "train.max_steps=12", "--resume", &ckpt.display().to_string()]));
    let after = losses(&resumed);
    assert_eq!(after.iter().map(|l| l.0).collect::<Vec<_>>(), (7..=12).collect::<Vec<_>>());
    for ((s, a), (_, b)) in after.iter().zip(&uninterrupted[6..]) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {s}: resumed loss {a} vs uninterrupted {b}");
    }
    // `latest` in the run's own folder resumes too (here: at its last step, so nothing to do but
    // extend the run by two steps).
    let o = run(&full, &["--world", "2", "--zero-stage", "3", "--set", "train.max_steps=14", "--resume", "latest"]);
    assert!(ok(&o).contains("continuing at step 13"));
    let _ = (std::fs::remove_dir_all(&full), std::fs::remove_dir_all(&resumed));
}

#[test]
fn checkpoint_from_world4_stage3_resumes_at_world2_stage1_and_world1_stage0() {
    let full = temp("w4");
    ok(&run(&full, &["--world", "4", "--zero-stage", "3", "--set", "train.max_steps=8", "--set", "checkpoint.every_steps=4"]));
    let reference = losses(&full);
    let ckpt = full.join("step_000004").display().to_string();
    for (world, stage) in [("2", "1"), ("1", "0")] {
        let out = temp(&format!("w{world}s{stage}"));
        ok(&run(&out, &["--world", world, "--zero-stage", stage, "--set", "train.max_steps=8", "--resume", &ckpt]));
        let got = losses(&out);
        assert_eq!(got.len(), 4);
        for ((s, a), (_, b)) in got.iter().zip(&reference[4..]) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "world {world} stage {stage} step {s}: {a} vs {b}");
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&full);
}

#[test]
fn sigterm_finishes_the_step_saves_and_exits_zero() {
    let out = temp("sigterm");
    let mut child = bin()
        .args(tiny_args(&out, &["--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=0"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way.
    for _ in 0..200 {
        if losses_if_any(&out) >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let step: usize = latest.trim().trim_start_matches("step_").parse().unwrap();
    assert!(step >= 3 && step < 100000, "{latest}");
    assert!(out.join(latest.trim()).join("DONE").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

fn losses_if_any(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count()).unwrap_or(0)
}

#[test]
fn kill_during_saves_leaves_the_previous_checkpoint_loadable() {
    let out = temp("kill9");
    // A wider model so that each save (every step) takes a while, then kill -9 at several points.
    for (i, wait_ms) in [400u64, 700, 1000].into_iter().enumerate() {
        let mut child = bin()
            .args(tiny_args(&out, &[
                "--set", "model.n_embd=256", "--set", "model.n_head=4", "--set", "train.max_steps=100000",
                "--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep_last=2",
            ]))
            .args(if i > 0 { vec!["--resume".to_string(), "latest".to_string()] } else { vec![] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(wait_ms));
        for _ in 0..100 {
            if out.join("latest").is_file() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(37 * i as u64));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Every step_* folder is complete; `latest` names one of them.
        for e in std::fs::read_dir(&out).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("step_") {
                assert!(p.join("DONE").is_file(), "{name} has no DONE");
            }
        }
        let latest = std::fs::read_to_string(out.join("latest")).unwrap();
        assert!(out.join(latest.trim()).join("DONE").is_file(), "latest -> {latest}");
    }
    // The last `latest` resumes and trains one more step; its save clears the temporary folders
    // the killed processes left.
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let step: usize = latest.trim().trim_start_matches("step_").parse().unwrap();
    let o = bin()
        .args(tiny_args(&out, &["--set", "model.n_embd=256", "--set", "model.n_head=4", "--set", &format!("train.max_steps={}", step + 1), "--resume", "latest"]))
        .output()
        .unwrap();
    ok(&o);
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".step_"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_checkpoints_get_errors_naming_the_file_and_lose_nothing() {
    let out = temp("bad");
    ok(&run(&out, &["--world", "2", "--zero-stage", "1", "--set", "train.max_steps=2", "--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep_last=0"]));
    let good = out.join("step_000002");
    let resume = |dir: &Path, extra: &[&str]| {
        let o_dir = temp("bad-resume");
        let mut args = vec!["--world", "2", "--set", "train.max_steps=3"];
        args.extend_from_slice(extra);
        let d = dir.display().to_string();
        args.extend_from_slice(&["--resume", &d]);
        let e = err(&run(&o_dir, &args));
        let _ = std::fs::remove_dir_all(&o_dir);
        e
    };
    let variant = |name: &str, f: &dyn Fn(&Path)| -> PathBuf {
        let d = out.join(name);
        copy_dir(&good, &d);
        f(&d);
        d
    };
    let no_done = variant("no_done", &|d| std::fs::remove_file(d.join("DONE")).unwrap());
    assert!(resume(&no_done, &[]).contains("no DONE"), "{}", resume(&no_done, &[]));
    let truncated = variant("truncated", &|d| {
        let f = d.join("rank_00001.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    });
    let e = resume(&truncated, &[]);
    assert!(e.contains("rank_00001.safetensors") && e.contains("truncated"), "{e}");
    let corrupted = variant("corrupted", &|d| {
        let f = d.join("rank_00000.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0x40;
        std::fs::write(&f, &bytes).unwrap();
    });
    let e = resume(&corrupted, &[]);
    assert!(e.contains("rank_00000.safetensors") && e.contains("checksum"), "{e}");
    let missing = variant("missing", &|d| std::fs::remove_file(d.join("rank_00001.safetensors")).unwrap());
    let e = resume(&missing, &[]);
    assert!(e.contains("rank_00001.safetensors"), "{e}");
    let e = resume(&good, &["--set", "model.n_embd=64"]);
    assert!(e.contains("saved for model"), "{e}");
    // The original checkpoint is untouched and still resumes.
    let o_dir = temp("bad-good");
    ok(&run(&o_dir, &["--world", "2", "--set", "train.max_steps=3", "--resume", &good.display().to_string()]));
    // An output folder that cannot be created (its parent is a file).
    let file = out.join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let e = err(&run(&file.join("run"), &["--set", "train.max_steps=1"]));
    assert!(e.contains("a_file"), "{e}");
    let _ = (std::fs::remove_dir_all(&out), std::fs::remove_dir_all(&o_dir));
}

#[test]
fn export_writes_hugging_face_names_and_samples() {
    let out = temp("export");
    ok(&run(&out, &["--world", "2", "--zero-stage", "3", "--set", "train.max_steps=3", "--set", "checkpoint.every_steps=0"]));
    let folder = out.join("exported");
    let o = bin().args(["export", &out.join("step_000003").display().to_string(), "--out", &folder.display().to_string()]).output().unwrap();
    ok(&o);
    let bytes = std::fs::read(folder.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    assert!(names.contains(&"transformer.h.1.attn.c_attn.weight".to_string()), "{names:?}");
    assert_eq!(st.tensor("transformer.h.0.mlp.c_fc.weight").unwrap().shape(), &[32, 128]);
    // The export equals the model folder the run wrote at its end (same weights).
    let end = std::fs::read(out.join("model").join("model.safetensors")).unwrap();
    let end = safetensors::SafeTensors::deserialize(&end).unwrap();
    for n in &names {
        assert_eq!(st.tensor(n).unwrap().data(), end.tensor(n).unwrap().data(), "{n}");
    }
    let o = bin().args(["sample", "--model", &folder.display().to_string(), "--max-new-tokens", "5"]).output().unwrap();
    ok(&o);
    // `generate` reads the checkpoint itself too, with nucleus sampling; greedy output is the
    // same from the checkpoint and from its export.
    let greedy = |model: &Path| {
        let o = bin().args(["generate", "--model", &model.display().to_string(), "--prompt", "KING", "--temperature", "0", "--max-new-tokens", "12"]).output().unwrap();
        ok(&o)
    };
    assert_eq!(greedy(&out.join("step_000003")), greedy(&folder));
    let o = bin().args(["generate", "--model", &out.join("step_000003").display().to_string(), "--top-p", "0.9", "--max-new-tokens", "5"]).output().unwrap();
    ok(&o);
    // bf16: every value is the f32 one rounded to bf16.
    let half = out.join("exported-bf16");
    let o = bin().args(["export", &out.join("step_000003").display().to_string(), "--out", &half.display().to_string(), "--dtype", "bf16"]).output().unwrap();
    ok(&o);
    let bytes16 = std::fs::read(half.join("model.safetensors")).unwrap();
    let st16 = safetensors::SafeTensors::deserialize(&bytes16).unwrap();
    let w32 = st.tensor("transformer.wte.weight").unwrap();
    let w16 = st16.tensor("transformer.wte.weight").unwrap();
    assert_eq!(w16.dtype(), safetensors::Dtype::BF16);
    for (a, b) in w32.data().chunks_exact(4).zip(w16.data().chunks_exact(2)) {
        let x = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
        let y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        assert!((x - y).abs() <= x.abs() / 128.0, "{x} vs bf16 {y}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
