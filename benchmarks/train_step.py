"""Training step time: the generated GPT-2 small (model.py + train.py) against nanoGPT.

The reference is a nanoGPT-style GPT-2 written by hand in this file (fused q/k/v projection,
tied LM head, the same dropout sites), trained with the same AdamW settings, parameter
groups and next-token loss. Before timing, the script copies the generated model's weights
into the reference and checks that both compute the same loss (dropout off), so the two
sides do the same work. Steps alternate between the two models after a warm-up, and the
table reports medians.

    python benchmarks/train_step.py                      # GPT-2 small, batch 1 x 64 tokens, 7 steps each
    python benchmarks/train_step.py --seq 128 --reps 11
    python benchmarks/train_step.py --tiny               # a 2-layer model, for a quick check
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ("train={data: {kind: synthetic, samples: 64, sizes: {seq: 64}}, batch_size: 1, steps: 1, loss: {kind: next_token}, "
         "optimizer: {kind: adamw, lr: 0.0003, betas: [0.9, 0.95], weight_decay: 0.1, no_decay: [biases, norms, embeddings]}}")
TINY = ("n_layer=2", "d_model=64", "n_head=4", "vocab=512", "ctx=128")


# -- the hand-written reference (after Karpathy's nanoGPT model.py) -----------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads, self.dropout = heads, dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, dropout)

    def forward(self, x):
        x = x + self.attn_drop(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, n_layer: int, d: int, heads: int, dropout: float):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d, heads, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # the LM head, tied to the token embedding


def reference_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The same AdamW and groups as the spec's protocol: no decay on biases, norms, embeddings."""
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or ".ln_" in n or n.startswith(("ln_f", "wte", "wpe"))]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


def reference_step(model, optimizer, tokens):
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def copy_weights(generated: nn.Module, reference: NanoGPT) -> None:
    """The generated model's weights (IR names) into the reference (fused q/k/v)."""
    src = generated.state_dict()
    out = {"wte.weight": src["wte.weight"], "wpe.weight": src["wpe.weight"], "ln_f.weight": src["ln_f.weight"], "ln_f.bias": src["ln_f.bias"]}
    for i in range(len(reference.h)):
        p = f"h.{i}."
        for part in ("weight", "bias"):
            out[p + "attn.c_attn." + part] = torch.cat([src[p + f"attn.{x}_proj.{part}"] for x in "qkv"])
            out[p + "attn.c_proj." + part] = src[p + f"attn.out_proj.{part}"]
            for name in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                out[p + f"{name}.{part}"] = src[p + f"{name}.{part}"]
    reference.load_state_dict(out)


# -- the generated side ------------------------------------------------------------------------


def generated_module(work: Path, overrides: tuple[str, ...]):
    """Build specs/gpt2.yaml with a training protocol; import its train.py."""
    from lbdlc.driver import BuildOptions, build

    out = build(ROOT / "specs" / "gpt2.yaml", work / "gpt2", BuildOptions(backends=("pytorch",), overrides=overrides + (TRAIN,))).out_dir
    sys.modules.pop("model", None)
    sys.path.insert(0, str(out))
    try:
        spec = importlib.util.spec_from_file_location("generated_train", out / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(out))
    return module


def sizes(overrides: tuple[str, ...]) -> dict:
    """The spec's variables (vocab, ctx, n_layer, d_model, n_head, dropout) after the overrides."""
    from lbdlc.compose import load_composed

    return dict(load_composed(ROOT / "specs" / "gpt2.yaml", list(overrides))["vars"])


def measure(tiny: bool, batch: int, seq: int, reps: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    overrides = TINY if tiny else ()
    s = sizes(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        gen = generated_module(Path(tmp), overrides)
    generated = gen.Model()
    reference = NanoGPT(s["vocab"], s["ctx"], s["n_layer"], s["d_model"], s["n_head"], s["dropout"])
    copy_weights(generated, reference)
    tokens = torch.randint(0, s["vocab"], (batch, seq))
    # Same function: equal losses with dropout off.
    generated.eval(), reference.eval()
    with torch.no_grad():
        a = gen.loss_fn(gen.forward(generated, {"tokens": tokens}), {"tokens": tokens})
        b = F.cross_entropy(reference(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    generated.train(), reference.train()
    opt_g, opt_r = gen.make_optimizer(generated), reference_optimizer(reference)
    params = sum(p.numel() for p in generated.parameters())
    times = {"generated": [], "nanogpt": []}
    for k in range(warmup + reps):
        for name in ("generated", "nanogpt") if k % 2 == 0 else ("nanogpt", "generated"):
            start = time.perf_counter()
            if name == "generated":
                gen.train_step(generated, opt_g, [{"tokens": tokens}])
            else:
                reference_step(reference, opt_r, tokens)
            if k >= warmup:
                times[name].append(time.perf_counter() - start)
    return {"params": params, "loss_diff": abs(float(a) - float(b)), "loss": float(a),
            "generated": statistics.median(times["generated"]), "nanogpt": statistics.median(times["nanogpt"]),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model instead of GPT-2 small")
    args = parser.parse_args()
    r = measure(args.tiny, args.batch, args.seq, args.reps)
    ratio = r["generated"] / r["nanogpt"]
    print(f"GPT-2 {'tiny' if args.tiny else 'small'}: {r['params']:,} parameters, batch {args.batch} x {args.seq} tokens, "
          f"{r['threads']} threads, median of {args.reps} steps (AdamW, next-token loss)")
    print(f"same function: |loss(generated) - loss(nanoGPT)| = {r['loss_diff']:.2e} (loss {r['loss']:.4f}, ln vocab {math.log(sizes(TINY if args.tiny else ())['vocab']):.4f})")
    print()
    print("| model | step (ms) | ratio |")
    print("|---|---:|---:|")
    print(f"| lbdlc generated (model.py + train.py) | {1000 * r['generated']:.1f} | {ratio:.3f} |")
    print(f"| nanoGPT-style, hand-written | {1000 * r['nanogpt']:.1f} | 1.000 |")


if __name__ == "__main__":
    main()
