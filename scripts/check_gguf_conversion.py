#!/usr/bin/env python3
"""Check a folder written by `zero-candle convert-gguf` with Hugging Face transformers.

Loads FOLDER with `LlamaForCausalLM.from_pretrained(FOLDER)` (failing on any missing, unexpected
or mismatched weight) and `AutoTokenizer.from_pretrained(FOLDER)`, greedily generates 8 tokens
from "The capital of France is", prints the continuation, and exits 1 unless it starts with
" Paris" (a wrong Q/K un-permutation or a transposed layout produces gibberish instead), 2 on
bad input. Written for SmolLM2-135M-Instruct; other prompts/expectations via --prompt/--expect.

With --gguf FILE (the GGUF the folder was converted from) it also checks the conversion exactly,
independently of zero-candle's code: it dequantizes FILE itself (numpy; F32, F16, Q4_0, Q4_1,
Q8_0), keeps llama.cpp's tensor layout (q/k rows in GGUF order) and runs the model with
llama.cpp's rotary embedding (adjacent dimension pairs 2i, 2i+1) in place of transformers'
rotate_half; the logits over a paragraph must match the folder's under plain transformers
within --atol. The greedy continuation alone cannot catch a wrong Q/K permutation (q and k are
permuted alike, and on a short prompt a mis-paired RoPE still often says " Paris"), so the script
also prints how far the folder with q/k left in GGUF order is from the reference (it must be far).

Needs torch and transformers (and numpy), e.g. in a venv:
    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
Usage:
    .venv/bin/python scripts/check_gguf_conversion.py FOLDER [--gguf FILE.gguf] [--prompt TEXT] [--expect PREFIX]
"""

import argparse
import sys
from pathlib import Path


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}


def read_gguf(path: Path) -> tuple:
    """Metadata (scalars only) and {name: float32 numpy array in row-major [.., ne1, ne0] order}."""
    import struct

    import numpy as np

    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return take(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    pos = 4
    version = take("I")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported by this check")
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        v = value(take("I"))
        if not isinstance(v, list):
            meta[k] = v
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = meta.get("general.alignment", 32)
    base = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, t, off in infos:
        if t not in GGML_TYPES:
            raise ValueError(f"{path}: tensor {name} has ggml type {t}, not supported by this check")
        _, block, size = GGML_TYPES[t]
        n = int(np.prod(dims))
        raw = np.frombuffer(data, dtype=np.uint8, count=n // block * size, offset=base + off)
        if t == 0:
            x = raw.view("<f4").astype(np.float32)
        elif t == 1:
            x = raw.view("<f2").astype(np.float32)
        else:
            b = raw.reshape(-1, size)
            d = b[:, 0:2].copy().view("<f2").astype(np.float32)
            if t == 8:
                x = d * b[:, 2:].copy().view(np.int8).astype(np.float32)
            else:
                qs = b[:, size - 16:]
                q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
                if t == 2:
                    x = d * (q - 8.0)
                else:
                    x = d * q + b[:, 2:4].copy().view("<f2").astype(np.float32)
        tensors[name] = x.reshape(-1).reshape(list(reversed(dims)))
    return meta, tensors


GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, layer, kind, suffix = name.split(".")
    return f"model.layers.{layer}.{GGUF_TO_HF[kind]}.{suffix}"


def interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """llama.cpp's rotary embedding: rotates adjacent pairs (2i, 2i+1) by the angle transformers
    uses for (i, i + head_dim/2)."""
    import torch

    half = cos.shape[-1] // 2
    c = cos[..., :half].unsqueeze(unsqueeze_dim)
    s = sin[..., :half].unsqueeze(unsqueeze_dim)

    def rot(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)

    return rot(q), rot(k)


def check_against_gguf(folder: Path, gguf: Path, model, tok, atol: float) -> bool:
    import torch
    import transformers.models.llama.modeling_llama as llama

    from transformers import LlamaForCausalLM

    enc = tok(PARAGRAPH, return_tensors="pt")
    with torch.no_grad():
        folder_logits = model(**enc).logits.float()

    meta, tensors = read_gguf(gguf)
    ref = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    state = {hf_name(n): torch.from_numpy(v.copy()) for n, v in tensors.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if missing or unexpected:
        print(f"error: GGUF tensors vs the folder's model: missing {missing}, unexpected {unexpected}", file=sys.stderr)
        return False
    original = llama.apply_rotary_pos_emb
    llama.apply_rotary_pos_emb = interleaved_rope
    try:
        with torch.no_grad():
            ref_logits = ref(**enc).logits.float()
    finally:
        llama.apply_rotary_pos_emb = original
    # Negative control: the reference's weights (q/k rows in GGUF order) under transformers' RoPE.
    with torch.no_grad():
        wrong_logits = ref(**enc).logits.float()

    n = enc["input_ids"].shape[1]
    diff = (folder_logits - ref_logits).abs().max().item()
    control = (wrong_logits - ref_logits).abs().max().item()
    agree = (folder_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"reference: {gguf} dequantized in numpy, llama.cpp layout and interleaved RoPE, {n} tokens")
    print(f"max |logit difference| folder vs reference: {diff:.3g} (atol {atol}); argmax agreement {agree:.3f}")
    print(f"control: q/k left in GGUF order under transformers' RoPE: max |logit difference| {control:.3g}")
    if diff > atol:
        print(f"FAIL: the folder's logits differ from the GGUF reference by {diff:.3g} > {atol}", file=sys.stderr)
        return False
    if control <= 10 * atol:
        print("FAIL: the control is not distinguishable from the reference; this check proves nothing", file=sys.stderr)
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--expect", default=" Paris")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--gguf", type=Path, help="the source GGUF: also compare logits with an independent llama.cpp-semantics reference")
    ap.add_argument("--atol", type=float, default=1e-3, help="--gguf: max |logit difference| allowed (f32 folder)")
    args = ap.parse_args()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (args.folder / f).is_file():
            print(f"error: {args.folder / f} not found; expected a folder written by `zero-candle convert-gguf`", file=sys.stderr)
            return 2

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(args.folder), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if problems:
        print(f"error: loading {args.folder}: {problems}", file=sys.stderr)
        return 1
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(args.folder))
    cfg = model.config
    print(
        f"loaded {args.folder}: {sum(p.numel() for p in model.parameters())} parameters, dtype {model.dtype}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} kv heads, "
        f"vocab {cfg.vocab_size}, rope {getattr(cfg, 'rope_parameters', None)}, tied {cfg.tie_word_embeddings}"
    )

    enc = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    new_ids = out[0, enc["input_ids"].shape[1]:]
    continuation = tok.decode(new_ids, skip_special_tokens=False)
    print(f"prompt: {args.prompt!r}")
    print(f"continuation: {continuation!r}")
    if not continuation.startswith(args.expect):
        print(f"FAIL: the continuation does not start with {args.expect!r}", file=sys.stderr)
        return 1
    print(f"OK: starts with {args.expect!r}")
    if args.gguf is not None:
        if not args.gguf.is_file():
            print(f"error: {args.gguf} not found", file=sys.stderr)
            return 2
        if not check_against_gguf(args.folder, args.gguf, model, tok, args.atol):
            return 1
        print("OK: logits match the GGUF reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
