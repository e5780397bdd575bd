//! `--device` / `train.device` on the program: bad names and GPU runs with several ranks are
//! refused up front; a CUDA device on a binary built without the `cuda` feature says how to
//! rebuild, and on a CUDA build without a GPU the driver's error is reported. `--device cpu`
//! trains as before.

use std::path::PathBuf;
use std::process::{Command, Output};

fn zero_candle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zero-candle"))
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("run zero-candle")
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let o = zero_candle(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in:\n{err}");
    }
}

#[test]
fn bad_device_names_and_gpu_runs_with_several_ranks_are_refused() {
    fails_with(&["train", "--device", "gpu"], &["train.device", "\"cpu\", \"cuda\" or \"cuda:N\""]);
    fails_with(&["train", "--set", "train.device=\"cuda:x\""], &["train.device"]);
    fails_with(&["train", "--device", "cuda:1", "--world", "2"], &["train.device", "parallel.world_size must be 1", "NCCL"]);
    fails_with(&["bench", "--device", "tpu"], &["device \"tpu\""]);
    fails_with(&["bench", "--precision", "f8"], &["precision \"f8\""]);
}

#[test]
fn cuda_without_the_feature_or_a_gpu_gets_a_clear_error() {
    let out = std::env::temp_dir().join(format!("zc-device-{}", std::process::id()));
    let out_s = format!("train.out_dir=\"{}\"", out.display());
    let cases: [&[&str]; 4] = [
        &["train", "--device", "cuda", "--set", "train.max_steps=1", "--set", &out_s],
        &["bench", "--device", "cuda:0", "--precision", "bf16", "--steps", "1"],
        &["eval", "--model", "no-such-folder", "--text", "README.md", "--device", "cuda"],
        &["sample", "--model", "no-such-folder", "--device", "cuda"],
    ];
    for args in cases {
        let o = zero_candle(args);
        let err = String::from_utf8_lossy(&o.stderr);
        if cfg!(feature = "cuda") {
            // A CUDA build: without a GPU the driver's error; with one the run goes on (and the
            // eval/sample cases fail on the missing folder, not the device).
            assert!(o.status.success() || err.contains("does not open") || err.contains("no-such-folder"), "{args:?}:\n{err}");
        } else {
            assert!(!o.status.success(), "{args:?} should fail");
            assert!(err.contains("built without --features cuda") && err.contains("cargo build --release --features cuda"), "{args:?}:\n{err}");
        }
    }
    // Nothing was prepared: the device is checked before the data.
    assert!(cfg!(feature = "cuda") || !out.join("data").exists());
    let _ = std::fs::remove_dir_all(&out);
}
