#!/usr/bin/env python3
"""Check a zero-candle model folder against Hugging Face transformers.

Loads FOLDER as is with `GPT2LMHeadModel.from_pretrained(FOLDER)` (no conversion, no dtype
argument: transformers picks the compute dtype), computes the mean next-token cross-entropy over
the token sequences in TOKENS (a JSON array of arrays of token ids, the format of `zero-candle
eval --tokens`), runs `zero-candle eval --model FOLDER --tokens TOKENS`, and compares the two
losses. Exits 1 if their relative difference exceeds 1e-4 (an f32 folder) or 1e-2 (a folder
whose config.json says torch_dtype "bfloat16"), 2 on bad input.

zero-candle computes in f32 whatever the file's dtype (bf16 values are upcast exactly). For a
bf16 folder the script therefore also loads it with `dtype=torch.float32`, the same upcast, and
requires that loss to agree within 1e-4 too: identical weights, f32 arithmetic on both sides.

Needs torch and transformers, e.g. in a venv:
    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
Usage:
    .venv/bin/python scripts/check_hf_export.py FOLDER TOKENS.json [--bin target/release/zero-candle]
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def fail(msg: str, code: int = 2) -> "None":
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def read_tokens(path: Path, vocab_size: int, n_positions: int) -> list:
    try:
        seqs = json.loads(path.read_text())
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    except json.JSONDecodeError as e:
        fail(f"{path}: invalid JSON ({e}); expected an array of arrays of token ids")
    if not isinstance(seqs, list) or not seqs:
        fail(f"{path}: expected a non-empty JSON array of arrays of token ids")
    for i, s in enumerate(seqs):
        if not isinstance(s, list) or len(s) < 2 or not all(isinstance(t, int) and 0 <= t < vocab_size for t in s):
            fail(f"{path}: sequence {i} must be an array of at least 2 token ids in 0..{vocab_size}")
        if len(s) > n_positions:
            fail(f"{path}: sequence {i} has {len(s)} tokens, more than n_positions = {n_positions}")
    return seqs


def hf_loss(folder: Path, seqs: list, upcast: bool = False) -> tuple:
    """Mean next-token loss over all predicted tokens, their count and the dtype transformers
    computed in; `upcast` loads the weights as float32."""
    import torch
    from transformers import GPT2LMHeadModel

    kwargs = {"output_loading_info": True}
    if upcast:
        kwargs["dtype"] = torch.float32
    try:
        model, info = GPT2LMHeadModel.from_pretrained(str(folder), **kwargs)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        kwargs["torch_dtype"] = kwargs.pop("dtype", None)
        model, info = GPT2LMHeadModel.from_pretrained(str(folder), **kwargs)
    problems = {k: list(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        fail(f"{folder}: transformers did not load the weights cleanly: {problems}", 1)
    model.eval()
    # The tied head really is the embedding (no separate lm_head.weight was in the file).
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head is not tied to wte"
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], dtype=torch.long)
            logits = model(ids).logits[0, :-1].double()
            targets = ids[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(s) - 1
    return total / count, count, str(model.transformer.wte.weight.dtype).replace("torch.", "")


def zero_candle_loss(binary: Path, folder: Path, tokens: Path) -> dict:
    cmd = [str(binary), "eval", "--model", str(folder), "--tokens", str(tokens)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        fail(f"cannot run {binary}: {e}; build it with `cargo build --release` or pass --bin")
    if out.returncode != 0:
        fail(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as e:
        fail(f"{' '.join(cmd)} printed no JSON ({e}):\n{out.stdout}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="model folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("tokens", type=Path, help="JSON array of arrays of token ids")
    p.add_argument("--bin", type=Path, default=Path("target/release/zero-candle"), help="the zero-candle binary")
    args = p.parse_args()

    config_path = args.folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read {config_path}: {e}")
    dtype = config.get("torch_dtype", "float32")
    tolerance = 1e-2 if dtype == "bfloat16" else 1e-4
    seqs = read_tokens(args.tokens, config["vocab_size"], config["n_positions"])

    hf, count, hf_dtype = hf_loss(args.folder, seqs)
    zc = zero_candle_loss(args.bin, args.folder, args.tokens)
    rel = abs(zc["loss"] - hf) / abs(hf)
    result = {
        "folder": str(args.folder),
        "torch_dtype": dtype,
        "sequences": len(seqs),
        "tokens": count,
        "transformers_compute_dtype": hf_dtype,
        "transformers_loss": hf,
        "zero_candle_loss": zc["loss"],
        "zero_candle_tokens": zc["tokens"],
        "relative_difference": rel,
        "tolerance": tolerance,
    }
    failures = []
    if not math.isfinite(hf):
        failures.append("the transformers loss is not finite")
    if zc["tokens"] != count:
        failures.append(f"zero-candle counted {zc['tokens']} predicted tokens, transformers {count}")
    if not rel <= tolerance:
        failures.append(f"relative difference {rel:.3e} exceeds {tolerance:g}")
    if dtype == "bfloat16":
        hf32, _, _ = hf_loss(args.folder, seqs, upcast=True)
        rel32 = abs(zc["loss"] - hf32) / abs(hf32)
        result.update({"transformers_loss_f32_upcast": hf32, "relative_difference_f32_upcast": rel32, "tolerance_f32_upcast": 1e-4})
        if not rel32 <= 1e-4:
            failures.append(f"relative difference to the f32-upcast model {rel32:.3e} exceeds 1e-4")
    result["ok"] = not failures
    print(json.dumps(result, indent=2))
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
