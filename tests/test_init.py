"""Per-layer initialisers (`init:`): the build's initial weights follow them, and mistakes
are located errors."""
import math

import torch
import torch.nn.functional as F

from lbdlc.lower import load, lower
from lbdlc.weights import initialize

from conftest import SPECS, located

TINY_GPT = ["n_layer=4", "d_model=64", "n_head=4", "vocab=500", "ctx=32", "dropout=0.0"]


def test_gpt2_starts_like_gpt2():
    """GPT-2's initialisation (std 0.02, residual projections 0.02/sqrt(2 n_layer), zero
    biases): an untrained model predicts nearly uniformly, so its loss is close to ln(vocab).
    With PyTorch's default N(0, 1) embedding and the tied head it would be far above."""
    graph = lower(load(SPECS / "gpt2.yaml", TINY_GPT))
    w = initialize(graph, seed=0)
    assert abs(w["wte.weight"].std().item() - 0.02) < 0.001
    assert abs(w["h.1.mlp.c_proj.weight"].std().item() - 0.02 / math.sqrt(8)) < 0.0005
    assert torch.count_nonzero(w["h.2.attn.out_proj.bias"]) == 0
    assert torch.all(w["h.0.ln_1.weight"] == 1)  # untouched: the op's own default

    namespace: dict = {}
    from backends.pytorch import generate
    exec(generate(graph, "gpt2.yaml", None, "test"), namespace)
    model = namespace["Model"]()
    model.load_state_dict(w)
    tokens = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 500), tokens[:, 1:].reshape(-1)).item()
    assert abs(loss - math.log(500)) < 0.1, loss


def test_unknown_parameter_is_located(cli, write_spec):
    path = write_spec("""
lbdlc: 1
inputs:
  x: {shape: [batch, 4]}
layers:
  - {op: linear, out_features: 2, init: {weigth: {kind: zeros}}}
""")
    code, _, err = cli("check", path)
    assert code == 2
    first = located(err, path, 6, "weigth")
    assert "linear has no parameter 'weigth' to initialise" in first
    assert "did you mean 'weight'" in err


def test_init_arguments_must_fit_the_kind(cli, write_spec):
    path = write_spec("""
lbdlc: 1
inputs:
  x: {shape: [batch, 4]}
layers:
  - op: linear
    out_features: 2
    init:
      weight: {kind: uniform}
      bias: {kind: zeros, std: 0.1}
""")
    code, _, err = cli("check", path)
    assert code == 2
    assert "init kind 'uniform' needs `bound`" in err
    assert "Traceback" not in err
