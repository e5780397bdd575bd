#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, PyTorch and no Rust toolchain, from the bundle
# that scripts/build-gpu-bundle.sh makes here:
#   1. the driver (nvidia-smi: card, driver, memory) and the CUDA 13 libraries of the Python
#      environment (site-packages/nvidia/cu13/lib and nvidia/nccl/lib, with unversioned links such
#      as libnccl.so, which cudarc opens by that name, made in a temporary folder);
#   2. every test binary of the bundle on the GPU (ZC_TEST_CUDA=require: a GPU that does not open
#      fails the test instead of being skipped): the kernels' tests, and the engine's
#      (tests-tensor_state: the engine with device state on CUDA against the CPU host path);
#   3. `zero-candle bench --device cuda --precision bf16` on char-small and gpt2-124m: median step,
#      tokens/s, training TFLOP/s and model FLOPs utilization against ZC_PEAK_TFLOPS (default 989:
#      H100/H200 SXM bf16 dense), peak GPU memory (nvidia-smi, sampled);
#   4. the same steps in PyTorch (scripts/torch_gpt_step.py --device cuda --bf16: same shapes, bf16
#      autocast, fused AdamW, synchronized timings, torch.cuda.max_memory_allocated);
#   5. one table. Every piece runs under `timeout`; the whole check stays within ZC_GPU_CHECK_SECONDS
#      (default 470, under 8 minutes): what would not fit is reported as skipped.
#
# Usage: bash scripts/gpu-check.sh [BUNDLE]   BUNDLE: a .tar.xz or folder from build-gpu-bundle.sh
#        (with the device tool: command `bash scripts/gpu-check.sh out/gpu-bundle.tar.xz`, carry
#        ["out/gpu-bundle.tar.xz"] since out/ is ignored, timeout_s 540)
#        (default: the bundle this script sits in, else out/gpu-bundle.tar.xz, else out/gpu-bundle)
# Environment: PYTHON (default python3, the one with torch), ZC_PEAK_TFLOPS, ZC_GPU_CHECK_SECONDS,
#   ZC_GPT2_BATCH / ZC_GPT2_SEQ (default 8 x 1024), ZC_BENCH_STEPS (default 5, after 2 warmup).
# Logs: a temporary folder (printed); when $OUT is a folder (the device tool), the summary and a
# tarball of the logs are copied there.
# Exit status: 0 when the libraries load, every test passed and both benchmarks ran; 1 otherwise.
set -uo pipefail

T0=$(date +%s)
LIMIT=${ZC_GPU_CHECK_SECONDS:-470}
PEAK=${ZC_PEAK_TFLOPS:-989}
PY=${PYTHON:-python3}
GPT2_BATCH=${ZC_GPT2_BATCH:-8}
GPT2_SEQ=${ZC_GPT2_SEQ:-1024}
STEPS=${ZC_BENCH_STEPS:-5}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/zc-gpu-check.XXXXXX)
logs=$work/logs
mkdir -p "$logs"
status=0
summary=$work/summary.md

say() { echo "$*" | tee -a "$summary"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
# run_for SECONDS LOG CMD...: CMD under `timeout`, at most SECONDS and never past the deadline (10 s
# kept for the table). Returns CMD's status, 124 on timeout, 125 when no time was left to start it.
run_for() {
  local want=$1 log=$2
  shift 2
  local left=$(( LIMIT - $(elapsed) - 10 ))
  local t=$(( want < left ? want : left ))
  if (( t < 5 )); then
    echo "skipped: no time left in the ${LIMIT} s budget" > "$log"
    return 125
  fi
  timeout --kill-after=5 "$t" "$@" > "$log" 2>&1
}

# ---- the bundle
bundle=${1:-}
if [[ -z $bundle ]]; then
  if [[ -x $here/../bin/zero-candle ]]; then
    bundle=$(cd "$here/.." && pwd)
  elif [[ -f $here/../out/gpu-bundle.tar.xz ]]; then
    bundle=$here/../out/gpu-bundle.tar.xz
  else
    bundle=$here/../out/gpu-bundle
  fi
fi
if [[ -f $bundle ]]; then
  tar -C "$work" -xJf "$bundle" || { echo "cannot unpack $bundle" >&2; exit 1; }
  bundle=$(find "$work" -mindepth 2 -maxdepth 2 -name MANIFEST -printf '%h\n' | head -1)
fi
if [[ ! -x ${bundle:-/nonexistent}/bin/zero-candle ]]; then
  echo "no bundle (bin/zero-candle) at ${1:-out/gpu-bundle[.tar.xz]}: run scripts/build-gpu-bundle.sh where Rust is" >&2
  exit 1
fi
zc=$bundle/bin/zero-candle
torch_step=$bundle/scripts/torch_gpt_step.py
[[ -f $torch_step ]] || torch_step=$here/torch_gpt_step.py

say "# zero-candle GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
say "bundle: $(sed -n 2p "$bundle/MANIFEST" 2>/dev/null) ($(sed -n 5p "$bundle/MANIFEST" 2>/dev/null))"
say "logs: $logs"

# ---- 1. driver and libraries
if ! command -v nvidia-smi > /dev/null; then
  say "nvidia-smi is not on PATH: no NVIDIA driver here"
  exit 1
fi
if ! gpu=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) || [[ -z $gpu ]]; then
  say "nvidia-smi found no GPU: $gpu"
  exit 1
fi
gpu=$(head -1 <<< "$gpu")
card=${gpu%%,*}
say "GPU: $gpu"

libdirs=$("$PY" - <<'PY' 2>/dev/null
import site, sys, os
roots = list(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + sys.path))
for r in roots:
    for sub in ("nvidia/cu13/lib", "nvidia/nccl/lib"):
        d = os.path.join(r, sub)
        if os.path.isdir(d):
            print(d)
PY
)
if [[ -z $libdirs ]]; then
  say "no nvidia/cu13/lib or nvidia/nccl/lib in $PY's site-packages: install the CUDA 13 wheels (nvidia-cublas, nvidia-cuda-runtime, nvidia-curand, nvidia-nccl-cu13)"
  exit 1
fi
links=$work/lib
mkdir -p "$links"
# Unversioned names (libnccl.so -> libnccl.so.2, ...) for libraries opened by name at run time.
while read -r dir; do
  for f in "$dir"/lib*.so.*; do
    [[ -e $f ]] || continue
    base=$(basename "$f")
    plain=${base%%.so.*}.so
    [[ -e $dir/$plain || -e $links/$plain ]] || ln -s "$f" "$links/$plain"
  done
done <<< "$libdirs"
export LD_LIBRARY_PATH="$links:$(paste -sd: <<< "$libdirs")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "CUDA libraries: $(paste -sd' ' <<< "$libdirs") (+ unversioned links in $links)"
missing=$(ldd "$zc" 2>&1 | grep "not found")
if [[ -n $missing ]]; then
  say "zero-candle cannot load: $missing"
  exit 1
fi
for lib in libcudart.so libcublas.so libcublasLt.so libcurand.so libnccl.so; do
  found=no
  while read -r dir; do [[ -e $dir/$lib || -e $links/$lib ]] && found=yes; done <<< "$libdirs"
  [[ $found == yes ]] || say "warning: $lib is in none of the CUDA library folders"
done

# ---- 2. tests on the GPU
say ""
say "## Tests on the GPU (ZC_TEST_CUDA=require)"
say "| binary | result | passed | failed | seconds |"
say "|---|---|---|---|---|"
tests_budget_end=$(( $(elapsed) + ${ZC_TESTS_SECONDS:-180} ))
for t in "$bundle"/tests/*; do
  [[ -x $t ]] || continue
  name=$(basename "$t")
  left=$(( tests_budget_end - $(elapsed) ))
  t0=$(date +%s)
  if (( left < 5 )); then
    echo "skipped: the tests' share of the time budget is spent" > "$logs/$name.log"
    rc=125
  else
    # The binaries were built elsewhere: run them from the work folder, with the GPU required.
    (cd "$work" && run_for $(( left < 60 ? left : 60 )) "$logs/$name.log" env ZC_TEST_CUDA=require "$t")
    rc=$?
  fi
  passed=$(grep '^test result:' "$logs/$name.log" | grep -o '[0-9]* passed' | awk '{s+=$1} END {print s+0}')
  failed=$(grep '^test result:' "$logs/$name.log" | grep -o '[0-9]* failed' | awk '{s+=$1} END {print s+0}')
  case $rc in
    0) result=ok ;;
    124) result="TIMEOUT"; status=1 ;;
    125) result="skipped (time)"; status=1 ;;
    *) result="FAILED (exit $rc)"; status=1 ;;
  esac
  say "| $name | $result | $passed | $failed | $(( $(date +%s) - t0 )) |"
  if [[ $rc -ne 0 && $rc -ne 125 ]]; then
    # The failed tests' names, then the first panic and its message.
    grep -E "^test .* FAILED$" "$logs/$name.log" | head -6 | sed 's/^/    /' | tee -a "$summary"
    grep -m1 -A1 "panicked at" "$logs/$name.log" | sed 's/^/    /' | tee -a "$summary"
  fi
done

# ---- 3 and 4. benchmarks: ours and PyTorch's on the same shapes
results=$work/results.jsonl
: > "$results"
bench_ours() { # preset batch seq seconds; GPU memory in use sampled by nvidia-smi every 200 ms
  local preset=$1 batch=$2 seq=$3 log=$logs/bench-$1.log mem=$work/mem-$1.txt pid rc
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$mem" 2>/dev/null &
  pid=$!
  run_for "$4" "$log" "$zc" bench --device cuda --precision bf16 --model "$preset" --batch "$batch" --seq-len "$seq" --steps "$STEPS" --warmup 2
  rc=$?
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  "$PY" - "$log" "$mem" "$preset" "$batch" "$seq" "$rc" >> "$results" <<'PY'
import json, re, sys
log, mem, preset, batch, seq, rc = sys.argv[1:]
text = open(log, errors="replace").read()
r = {"run": "zero-candle", "model": preset, "batch": int(batch), "seq": int(seq), "rc": int(rc)}
row = lambda name: re.search(r"\|\s*" + name + r"\s*\|\s*([0-9.]+)", text)
m = re.search(r"tokens/s ([0-9.]+), training GFLOP/s ([0-9.]+)", text)
if m and int(rc) == 0:
    r.update(tokens_per_s=float(m.group(1)), tflops=float(m.group(2)) / 1e3)
    for k in ("forward", "backward", "optimizer", "step"):
        v = row(k)
        if v:
            r[k + "_s"] = float(v.group(1))
try:
    used = [float(x) for x in open(mem).read().split() if x.replace(".", "").isdigit()]
    r["peak_mib"] = max(used) if used else None
except OSError:
    pass
if "tokens_per_s" not in r:
    lines = text.strip().splitlines() or ["no output"]
    r["error"] = next((l for l in lines if l.startswith("error:")), lines[-1])[:200]
print(json.dumps(r))
PY
}
bench_torch() { # preset batch seq seconds
  local preset=$1 batch=$2 seq=$3 log=$logs/torch-$1.log rc
  run_for "$4" "$log" "$PY" "$torch_step" --device cuda --bf16 --model "$preset" --batch "$batch" --seq-len "$seq" --steps "$STEPS" --warmup 2
  rc=$?
  "$PY" - "$log" "$preset" "$batch" "$seq" "$rc" >> "$results" <<'PY'
import json, sys
log, preset, batch, seq, rc = sys.argv[1:]
lines = open(log, errors="replace").read().strip().splitlines()
r = {"run": "torch", "model": preset, "batch": int(batch), "seq": int(seq), "rc": int(rc)}
try:
    j = json.loads(lines[-1])
    r.update(framework=j["framework"], tokens_per_s=j["tokens_per_s"], step_s=j["step_s"], forward_s=j["forward_s"],
             backward_s=j["backward_s"], optimizer_s=j["optimizer_s"], peak_mib=j.get("peak_cuda_mib"),
             tflops=j["tokens_per_s"] * j["flops_per_token"] / 1e12)
except (IndexError, ValueError, KeyError):
    r["error"] = (lines or ["no output"])[-1][:200]
print(json.dumps(r))
PY
}
say ""
say "## Training steps (bf16)"
bench_ours char-small 12 256 60
bench_torch char-small 12 256 60
bench_ours gpt2-124m "$GPT2_BATCH" "$GPT2_SEQ" 150
bench_torch gpt2-124m "$GPT2_BATCH" "$GPT2_SEQ" 120

# ---- 5. the table
"$PY" - "$results" "$PEAK" "$card" <<'PY' | tee -a "$summary"
import json, sys
path, peak, card = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open(path) if l.strip()]
print(f"{card}; MFU = training TFLOP/s (nanoGPT's 6N + 12LCT FLOPs per token) / {peak:g} TFLOP/s bf16 dense")
print("| run | model | batch x seq | step ms | fwd ms | bwd ms | opt ms | tokens/s | TFLOP/s | MFU | peak GPU MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
ms = lambda r, k: f"{1e3 * r[k]:.1f}" if r.get(k) is not None else "-"
for r in rows:
    name = "zero-candle bf16" if r["run"] == "zero-candle" else r.get("framework", "torch")
    shape = f"{r['batch']} x {r['seq']}"
    if "tokens_per_s" not in r:
        why = "TIMEOUT" if r["rc"] == 124 else "skipped (time)" if r["rc"] == 125 else "FAILED: " + r.get("error", "")
        print(f"| {name} | {r['model']} | {shape} | {why} | | | | | | | |")
        continue
    peak_mib = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"
    print(f"| {name} | {r['model']} | {shape} | {ms(r, 'step_s')} | {ms(r, 'forward_s')} | {ms(r, 'backward_s')} | {ms(r, 'optimizer_s')} | "
          f"{r['tokens_per_s']:.0f} | {r['tflops']:.3g} | {100 * r['tflops'] / peak:.3g}% | {peak_mib} |")
print("zero-candle's peak is nvidia-smi's memory in use (CUDA context included); torch's is max_memory_allocated.")
sys.exit(0 if all("tokens_per_s" in r for r in rows if r["run"] == "zero-candle") else 3)
PY
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

say ""
say "total $(elapsed) s; status $status"
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
  cp "$summary" "$OUT/gpu-check-summary.md"
  tar -C "$work" -czf "$OUT/gpu-check-logs.tar.gz" logs results.jsonl 2>/dev/null
fi
exit $status
