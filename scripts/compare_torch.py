#!/usr/bin/env python3
"""Run zero-candle's training step and PyTorch eager's on the same shapes, one after the other on
this machine, and print one table: step time, tokens/s, peak memory and ours / PyTorch.

Cases (the CPU performance issue's): char-small at batch 12 x 256 and gpt2-124m at 4 x 256, each
in exact fp32 (ours `--matmul f32`, PyTorch fp32) and with bf16 matrix products (ours `--matmul
bf16`: bf16 inputs, f32 sums on AMX; PyTorch: forward under CPU autocast to bf16). Peak memory is
each process's maximum resident set (wait4's ru_maxrss), measured the same way for both.

Needs the release binary (cargo build --release) and a Python with PyPI torch
(python3 -m venv .venv && .venv/bin/pip install torch):
  python3 scripts/compare_torch.py [--python .venv/bin/python] [--threads 2] [--models char-small,gpt2-124m]
"""

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = {"char-small": (12, 5), "gpt2-124m": (4, 3)}  # model: (batch, timed steps)


def run(cmd):
    """Run cmd, return (stdout, peak RSS MiB) or exit with its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{out}")
    return out, usage.ru_maxrss / 1024


def ours(binary, model, batch, steps, threads, matmul):
    if not os.path.exists(binary):
        sys.exit(f"no binary at {binary}: run `cargo build --release` first, or pass --binary")
    out, rss = run([binary, "bench", "--model", model, "--batch", str(batch), "--seq-len", "256",
                    "--steps", str(steps), "--threads", str(threads), "--matmul", matmul])
    step = float(re.search(r"\| step\s+\|\s+([0-9.]+)", out).group(1))
    return step, rss


def torch_step(python, model, batch, steps, threads, bf16):
    if not os.path.exists(python):
        sys.exit(f"no Python at {python}: create it with `python3 -m venv .venv && .venv/bin/pip install torch`, or pass --python")
    cmd = [python, os.path.join(HERE, "torch_gpt_step.py"), "--model", model, "--batch", str(batch),
           "--steps", str(steps), "--threads", str(threads)] + (["--bf16"] if bf16 else [])
    out, rss = run(cmd)
    result = json.loads(out.strip().splitlines()[-1])
    return result["step_s"], rss, result["framework"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "zero-candle"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="char-small,gpt2-124m")
    a = ap.parse_args()
    print("| model | batch | matmul | PyTorch s | ours s | ours / PyTorch | ours tokens/s | peak RSS PyTorch / ours MiB |")
    print("|---|---|---|---|---|---|---|---|")
    framework = ""
    for model in a.models.split(","):
        batch, steps = CASES[model]
        for bf16 in (False, True):
            t_s, t_rss, framework = torch_step(a.python, model, batch, steps, a.threads, bf16)
            o_s, o_rss = ours(a.binary, model, batch, steps, a.threads, "bf16" if bf16 else "f32")
            label = "bf16 (ours AMX / torch autocast)" if bf16 else "fp32"
            print(f"| {model} | {batch} x 256 | {label} | {t_s:.3f} | {o_s:.3f} | {o_s / t_s:.2f}x | "
                  f"{batch * 256 / o_s:.0f} | {t_rss:.0f} / {o_rss:.0f} |", flush=True)
    print(f"\n{framework.split(' eager')[0]}, {a.threads} threads; ours: {a.binary}")


if __name__ == "__main__":
    main()
