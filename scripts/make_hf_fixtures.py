#!/usr/bin/env python3
"""Write the Hugging Face parity fixtures used by tests/tests/hf_parity.rs.

For each tiny model below, builds it with transformers from a fixed seed, replaces every
parameter with non-trivial random values (norm weights around 1, non-zero biases, weights of
about unit fan-in variance, so that logits are O(1) and every parameter gets a gradient worth
comparing), and writes into tests/fixtures/hf/<name>/:

  config.json, model.safetensors  `save_pretrained`, float32 (what the Rust loader reads)
  tokenizer.json                  a WordLevel vocabulary "t0".."t{V-1}" (the loader insists on a
                                  tokenizer file; the tests never tokenize text)
  expected.safetensors            for one fixed batch of 2 x 12 token ids:
      input_ids  (2, 12) int64
      labels     (2, 11) int64    the next-token targets, input_ids[:, 1:]
      logits     (2, 12, V) f32   model(input_ids).logits
      loss       () f32           model(input_ids, labels=input_ids).loss: transformers shifts the
                                  labels itself, so this is the mean cross-entropy over all
                                  2 * 11 next-token predictions
      grad.<parameter name>       d loss / d parameter, f32, one entry per `named_parameters()`
                                  (a tied head appears once, under the embedding's name)

Models:
  gpt2         GPT2LMHeadModel: vocab 61, n_positions 16, n_embd 32, 2 layers, 4 heads,
               gelu_new, dropouts 0, tied head
  llama        LlamaForCausalLM: vocab 67, hidden 32, intermediate 48, 2 layers, 4 heads,
               2 kv heads, rope_theta 10000, rms_norm_eps 1e-5, max_position_embeddings 32,
               untied head
  llama_tied   the same shape with tie_word_embeddings True and rope_theta 500 (a non-default
               theta, so that a loader reading the wrong config key cannot pass by luck)

Everything is computed in float32 on the CPU with one thread and the eager attention, so a
rerun rewrites identical files. The script also reruns each model in float64 and prints how far
the float32 reference itself is from it (the reference's own rounding noise).

Needs torch, transformers (and the `tokenizers` and `safetensors` packages they bring), e.g.
    python3 -m venv .venv && .venv/bin/pip install torch transformers
Run from the repository root:
    .venv/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf]
"""

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

BATCH, SEQ = 2, 12


def gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=61,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(cfg)


def llama(tied: bool, rope_theta: float) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


MODELS = {
    "gpt2": lambda: gpt2(),
    "llama": lambda: llama(tied=False, rope_theta=10000.0),
    "llama_tied": lambda: llama(tied=True, rope_theta=500.0),
}


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Non-trivial values for every parameter (the default init has unit norms, zero biases and
    0.02-std weights, which would leave logits near zero and norm/bias gradients untested)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding):
                p.normal_(0.0, 0.5)
            elif name == "bias":
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:  # LayerNorm / RMSNorm weight
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif isinstance(module, Conv1D):  # GPT-2 stores (in, out)
                p.normal_(0.0, p.shape[0] ** -0.5)
            elif isinstance(module, torch.nn.Linear):  # (out, in)
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                raise SystemExit(f"no init rule for {type(module).__name__}.{name} {tuple(p.shape)}")


def token_batch(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)


def run(model: torch.nn.Module, ids: torch.Tensor) -> tuple:
    """Logits, loss and {name: grad} for one forward/backward with labels = ids."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():  # de-duplicates a tied head
        if p.grad is None:
            raise SystemExit(f"{name} got no gradient")
        grads[name] = p.grad.detach().clone()
    return out.logits.detach().clone(), out.loss.detach().clone(), grads


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (a scale-aware measure that is finite for tensors with zeros)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tokenizer_json(vocab: int) -> str:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str(pretty=True)


def write(name: str, out_root: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.config._attn_implementation = "eager"
    randomize(model)
    model.eval()  # dropouts are 0 anyway
    vocab = model.config.vocab_size
    ids = token_batch(vocab, seed + 1)
    logits, loss, grads = run(model, ids)

    # Sanity: the stored loss is the mean next-token cross-entropy over all B*(T-1) predictions.
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    assert torch.allclose(manual, loss, rtol=1e-6, atol=0), (manual, loss)

    # The float32 reference's own noise: the same model and batch in float64.
    m64 = copy.deepcopy(model).double()
    logits64, loss64, grads64 = run(m64, ids)
    noise_logits = max_rel(logits, logits64)
    noise_loss = abs(loss.double().item() - loss64.item()) / abs(loss64.item())
    noise_grad = max(max_rel(grads[n], grads64[n]) for n in grads)

    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json(vocab) + "\n")
    expected = {
        "input_ids": ids.contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "logits": logits.float().contiguous(),
        "loss": loss.float().reshape(()).contiguous(),
    }
    for n, g in grads.items():
        expected[f"grad.{n}"] = g.float().contiguous()
    save_file(expected, str(folder / "expected.safetensors"), metadata={"format": "pt"})

    files = sorted(p for p in folder.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    stored = json.loads((folder / "config.json").read_text())
    print(
        f"{name}: {sum(p.numel() for p in model.parameters())} parameters, loss {loss.item():.6f}, "
        f"|logits| max {logits.abs().max().item():.3f}, {size / 1024:.1f} KiB "
        f"({', '.join(p.name for p in files)}); config keys: {sorted(stored)}"
    )
    print(f"  f32 reference vs f64 (max|d|/max|ref|): logits {noise_logits:.2e}, loss {noise_loss:.2e}, grads {noise_grad:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/hf"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for i, name in enumerate(MODELS):
        write(name, args.out, seed=1000 + 10 * i)


if __name__ == "__main__":
    main()
