#!/usr/bin/env python3
"""Time a GPT-2 training step in PyTorch eager (CPU, or one CUDA GPU), with the shapes of
zero-candle's presets, to compare with `zero-candle bench` on the same machine.

A nanoGPT-style GPT (pre-LayerNorm, learned positions, GELU-tanh MLP x4, tied head, no dropout,
no biases dropped: GPT-2's Conv1D biases kept), fp32, torch.optim.AdamW (weight decay 0.1 on
2-D parameters), random tokens, median of the timed steps after warmup; forward, backward and
optimizer timed separately; peak resident memory (ru_maxrss) at the end. With --bf16 the forward
runs under torch.autocast("cpu", dtype=torch.bfloat16) (bf16 matmuls through oneDNN, AMX where
the CPU has it; fp32 weights and optimizer): the counterpart of `zero-candle bench --matmul bf16`.

With --device cuda: the model, data and optimizer on GPU 0; --bf16 autocasts the forward to
bfloat16 on CUDA (the counterpart of `zero-candle bench --device cuda --precision bf16`), AdamW is
the fused CUDA one, torch.cuda.synchronize() closes every timed phase, and the peak GPU memory is
torch.cuda.max_memory_allocated (peak_cuda_mib).

Needs PyPI torch. Usage:
  .venv/bin/python scripts/torch_gpt_step.py --model char-small [--batch 12 --seq-len 256 --steps 5 --threads 2]
  .venv/bin/python scripts/torch_gpt_step.py --model gpt2-124m  [--batch 4 --seq-len 256 --steps 3]
  python3 scripts/torch_gpt_step.py --device cuda --bf16 --model gpt2-124m --batch 8 --seq-len 1024
Prints one JSON object.
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # name: (n_layer, n_head, n_embd, context, default vocab, default batch)
    "char-small": (6, 6, 384, 256, 65, 12),
    "gpt2-mini": (4, 4, 256, 256, 65, 12),
    "gpt2-124m": (12, 12, 768, 1024, 50257, 4),
}


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, c, context, vocab):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(context, c)
        self.blocks = nn.ModuleList(Block(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="char-small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="forward under autocast to bfloat16 (CPU or CUDA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: GPU 0")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n_layer, n_head, c, context, vocab, batch = PRESETS[a.model]
    batch = a.batch or batch
    model = GPT(n_layer, n_head, c, context, vocab).to(a.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if cuda else {}))
    idx = torch.randint(0, vocab, (batch, a.seq_len), device=a.device)
    tgt = torch.randint(0, vocab, (batch, a.seq_len), device=a.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(idx, tgt)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if i >= a.warmup:
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    out = {
        "framework": f"torch {torch.__version__} eager " + ("bf16 autocast" if a.bf16 else "fp32"), "model": a.model, "params": params,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch": batch, "seq_len": a.seq_len, "threads": a.threads, "steps": a.steps,
        "forward_s": med["forward"], "backward_s": med["backward"], "optimizer_s": med["optimizer"], "step_s": med["step"],
        "tokens_per_s": batch * a.seq_len / med["step"],
        # Training FLOPs per token as nanoGPT's estimate_mfu and `zero-candle bench` count them.
        "flops_per_token": 6 * (params - context * c) + 12 * n_layer * c * a.seq_len,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
