#!/usr/bin/env bash
# Build what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain, into one folder
# and one .tar.xz beside it:
#   out/gpu-bundle/bin/zero-candle       the program (release, --features cuda,nccl, stripped)
#   out/gpu-bundle/tests/<crate>-<test>  the test binaries that run on CUDA: every kernels test
#                                        target, the kernels unit tests, and any other test whose
#                                        source loops over kernels::testing::test_devices()
#                                        (tests/tests/tensor_state.rs: the engine on the GPU)
#   out/gpu-bundle/scripts/              gpu-check.sh and torch_gpt_step.py
#   out/gpu-bundle/MANIFEST              commit, build flags, toolchain, file sizes
#   out/gpu-bundle.tar.xz                all of it (~15 MB: the binaries share most of their bytes,
#                                        so xz gets a dictionary larger than one binary)
# On the GPU machine (the repository copied there, with the .tar.xz):
#   bash scripts/gpu-check.sh out/gpu-bundle.tar.xz
#
# Usage: bash scripts/build-gpu-bundle.sh [OUT_DIR]       (default out/gpu-bundle)
# Environment: ZC_BUNDLE_RUSTFLAGS (default "-C target-cpu=x86-64-v3": the GPU host's CPU differs
# from this one, so nothing beyond AVX2/FMA is assumed; this RUSTFLAGS also overrides any
# build.rustflags such as target-cpu=native in a .cargo/config.toml), ZC_BUNDLE_TARGET_DIR (default
# target/gpu-bundle: its own target dir, since other RUSTFLAGS would rebuild target/cuda;
# cold, about 20 minutes on 2 cores, most of it candle-kernels), CUDA_COMPUTE_CAP (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-out/gpu-bundle}
case $out in /*) ;; *) out=$root/$out ;; esac

for cfg in .cargo/config.toml .cargo/config "${CARGO_HOME:-$HOME/.cargo}/config.toml"; do
  if grep -qs 'target-cpu=native' "$cfg"; then
    echo "note: $cfg sets target-cpu=native; RUSTFLAGS below overrides it for this build"
  fi
done

echo "== CUDA toolchain (scripts/setup-cuda.sh, idempotent)"
bash scripts/setup-cuda.sh > /dev/null
# shellcheck disable=SC1091
source .cuda/env.sh
export CARGO_TARGET_DIR=${ZC_BUNDLE_TARGET_DIR:-$root/target/gpu-bundle}
export RUSTFLAGS=${ZC_BUNDLE_RUSTFLAGS:--C target-cpu=x86-64-v3}
echo "RUSTFLAGS=$RUSTFLAGS CARGO_TARGET_DIR=$CARGO_TARGET_DIR CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-}"

echo "== build (release, --features cuda,nccl): the program and every test target"
start=$(date +%s)
json=$(mktemp)
trap 'rm -f "$json"' EXIT
# One package/feature selection (the workspace's, as .ci/run), so candle-kernels builds once. The
# program is built too: zero-candle's integration tests depend on it.
nice -n 19 cargo test --release --workspace --features cuda,nccl --no-run --message-format=json-render-diagnostics > "$json"
echo "built in $(( $(date +%s) - start )) s"

rm -rf "$out" "$out.tar.xz"
mkdir -p "$out/bin" "$out/tests" "$out/scripts"
# Pick the artifacts: the zero-candle binary, and the test binaries that run on a GPU.
python3 - "$json" "$out" "$root" <<'PY'
import json, os, shutil, sys
path, out, root = sys.argv[1:4]
picked = []
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    crate_dir = os.path.basename(os.path.dirname(m["manifest_path"]))
    exe = m["executable"]
    if not m["profile"]["test"]:
        if "bin" in t["kind"] and t["name"] == "zero-candle":
            shutil.copy2(exe, os.path.join(out, "bin", "zero-candle"))
            picked.append("bin/zero-candle")
        continue
    src = open(t["src_path"], encoding="utf-8", errors="replace").read()
    gpu = crate_dir == "kernels" or "test_devices" in src
    if not gpu:
        continue
    name = f"{crate_dir}-{'lib' if 'lib' in t['kind'] else t['name']}"
    shutil.copy2(exe, os.path.join(out, "tests", name))
    picked.append(f"tests/{name}")
if "bin/zero-candle" not in picked:
    sys.exit("build-gpu-bundle: no zero-candle binary in cargo's output")
print("\n".join(sorted(picked)))
PY
strip --strip-all "$out"/bin/* "$out"/tests/*
cp scripts/gpu-check.sh scripts/torch_gpt_step.py "$out/scripts/"
{
  echo "zero-candle GPU bundle"
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
  echo "rustc: $(rustc --version)"
  echo "features: cuda,nccl; profile release; RUSTFLAGS=$RUSTFLAGS; CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-}"
  echo "nvcc: $(nvcc --version | tail -1)"
  echo "files:"
  (cd "$out" && find bin tests scripts -type f -printf '  %p %s\n' | sort)
} > "$out/MANIFEST"

echo "== compress"
# The binaries share most of their bytes (candle, its PTX): a 256 MiB dictionary spans several of
# them, so each one after the first costs about 1 MB; preset 1 keeps it to about a minute here.
tar -C "$(dirname "$out")" -cf - "$(basename "$out")" | xz -T1 --lzma2=preset=1,dict=256MiB > "$out.tar.xz"
echo "bundle: $out ($(du -sh "$out" | cut -f1)), $out.tar.xz ($(du -h "$out.tar.xz" | cut -f1))"
echo "on the GPU machine: bash scripts/gpu-check.sh ${out#"$root"/}.tar.xz"
