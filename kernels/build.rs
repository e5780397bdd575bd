//! With the `cuda` feature only: compiles every `src/cuda/*.cu` to `$OUT_DIR/<name>.ptx` with nvcc,
//! which `src/cuda/mod.rs` embeds with `include_str!`. The default (CPU) build does nothing here and
//! needs no CUDA.
//!
//! - nvcc: `$NVCC`, else `$CUDA_HOME`, `$CUDA_PATH`, `$CUDA_ROOT` (each `/bin/nvcc`), else `PATH`
//!   (the order cudaforge uses for candle's kernels). `scripts/setup-cuda.sh` installs one.
//! - Architecture: `$ZC_CUDA_ARCH`, else `$CUDA_COMPUTE_CAP`, else 90 (H100/H200): `-arch=sm_XX`.
//! - No `--use_fast_math`: IEEE division, sqrt and denormals, so results match the CPU kernels
//!   within the tests' tolerances (AdamW and the scaled cast bitwise).
//! - `$NVCC_CCBIN` picks the host compiler, as for candle's kernels.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "ZC_CUDA_ARCH", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let src_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("src/cuda");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", src_dir.display());

    let mut sources = Vec::new();
    let mut headers = Vec::new();
    for entry in std::fs::read_dir(&src_dir).unwrap_or_else(|e| panic!("reading {}: {e}", src_dir.display())) {
        let path = entry.unwrap().path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => sources.push(path),
            Some("cuh") => headers.push(path),
            _ => {}
        }
    }
    sources.sort();
    for path in sources.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let nvcc = find_nvcc();
    let arch = arch();
    let ccbin = std::env::var("NVCC_CCBIN").ok().filter(|s| !s.is_empty());
    // One nvcc per file, all at once (each takes about a second).
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
            let ptx = out_dir.join(format!("{stem}.ptx"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg("--ptx")
                .arg(format!("-arch=sm_{arch}"))
                .arg("-std=c++17")
                .arg("-I")
                .arg(&src_dir)
                .arg("-o")
                .arg(&ptx)
                .arg(src);
            if let Some(ccbin) = &ccbin {
                cmd.arg("-ccbin").arg(ccbin).arg("-allow-unsupported-compiler");
            }
            let child = cmd
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            (src.clone(), cmd, child)
        })
        .collect();
    for (src, cmd, child) in jobs {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            panic!(
                "nvcc failed on {}:\n{cmd:?}\n{}{}",
                src.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC").filter(|s| !s.is_empty()) {
        return PathBuf::from(nvcc);
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            let nvcc = Path::new(&root).join("bin/nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    panic!(
        "kernels: the `cuda` feature compiles src/cuda/*.cu with nvcc, and none was found (looked at \
         $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $CUDA_ROOT/bin and PATH). Run scripts/setup-cuda.sh \
         once, then `source .cuda/env.sh` in the shell that runs cargo."
    )
}

/// "90", "90a", "sm_90" or "compute_90" -> "90" / "90a".
fn arch() -> String {
    let raw = std::env::var("ZC_CUDA_ARCH")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::env::var("CUDA_COMPUTE_CAP").ok().filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| "90".to_string());
    let arch = raw.trim().trim_start_matches("sm_").trim_start_matches("compute_").replace('.', "");
    if arch.is_empty() || !arch.chars().next().unwrap().is_ascii_digit() || !arch.chars().all(|c| c.is_ascii_alphanumeric()) {
        panic!("kernels: bad CUDA architecture {raw:?} in ZC_CUDA_ARCH / CUDA_COMPUTE_CAP (expected e.g. 90 or 80)");
    }
    arch
}
