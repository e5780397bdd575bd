//! Our Llama on real weights: SmolLM2-135M-Instruct converted from the shared GGUF, loaded as a
//! Hugging Face folder by `sample`, greedy-decodes "The capital of France is" into " Paris".

use std::path::PathBuf;
use std::process::Command;

#[test]
fn converted_smollm2_greedily_continues_the_capital_of_france_with_paris() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let gguf = root.join("../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "missing test model {}", gguf.display());
    let out = std::env::temp_dir().join(format!("zc-llama-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let bin = env!("CARGO_BIN_EXE_zero-candle");
    let o = Command::new(bin).args(["convert-gguf", &gguf.display().to_string(), "--out", &out.display().to_string()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(bin)
        .args(["sample", "--model", &out.display().to_string(), "--prompt", "The capital of France is", "--temperature", "0", "--max-new-tokens", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.starts_with("The capital of France is Paris"), "{text:?}");
    let _ = std::fs::remove_dir_all(&out);
}
