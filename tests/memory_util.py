"""Helpers of tests/test_memory.py and tests/test_checkpointing.py: the generated module of a
graph (with a checkpointing plan), inputs, a training step, and measured memory."""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from conftest import SPECS
from lbdlc.backends.pytorch import generate

from lbdlc.lower import load, lower
from lbdlc.memory import MemoryConfig, OptimizerInfo, PeakMeter

RESNET_SMALL = ["inputs.image.shape=[batch, 3, 64, 64]", "classes=10"]
GPT_SMALL = ["n_layer=2", "d_model=64", "n_head=4", "vocab=100", "ctx=32"]
GPT_24 = ["n_layer=24", "d_model=64", "n_head=4", "vocab=100", "ctx=64"]
# name -> (spec, overrides, sizes)
MODELS = {
    "mlp": (SPECS / "mlp.yaml", [], {"batch": 16}),
    "lenet": (SPECS / "lenet.yaml", [], {"batch": 8}),
    "resnet50": (SPECS / "resnet50.yaml", RESNET_SMALL, {"batch": 2}),
    "gpt2": (SPECS / "gpt2.yaml", GPT_SMALL, {"batch": 2, "seq": 32}),
    # encoder-decoder: the decoder's blocks also read the encoder's output; dropout 0 is the identity
    "transformer": (SPECS / "transformer.yaml", ["vocab=100", "d_model=32", "heads=4", "d_ff=64", "n_layers=3", "max_len=32",
                                                 "norm_first=true", "dropout=0.0"], {"batch": 2, "src_seq": 8, "tgt_seq": 6}),
}


@contextlib.contextmanager
def one_thread():
    """Small models run fastest (and steadiest) on one thread of a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def graph_of(name: str, extra: list[str] = ()):
    path, overrides, sizes = MODELS[name]
    return lower(load(path, list(overrides) + list(extra))), sizes


def config(sizes: dict, optimizer: str = "adamw", precision: str = "fp32") -> MemoryConfig:
    return MemoryConfig(sizes["batch"], tuple((k, v) for k, v in sizes.items() if k != "batch"), precision,
                        OptimizerInfo(optimizer), "cpu")


def model(graph, plan=None, seed: int = 0):
    """The generated model.py's Model, seeded, in training mode."""
    source = generate(graph, "spec.yaml", None, "test", plan)
    namespace = types.ModuleType("generated_model")
    exec(compile(source, "model.py", "exec"), namespace.__dict__)
    torch.manual_seed(seed)
    return namespace.Model().train()


def inputs(graph, sizes: dict, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else int(d.subs({s: sizes[str(s)] for s in d.free_symbols})) for d in v.type.shape]
        out.append(torch.randint(0, 50, shape, generator=gen) if v.type.dtype.startswith("int") else torch.randn(shape, generator=gen))
    return out


def loss_of(graph, xs: list[torch.Tensor]):
    """What train.py computes for a language model (next-token cross-entropy), else a mean square."""
    if len(graph.inputs) == 1 and graph.inputs[0].type.dtype == "int64":
        return lambda y: F.cross_entropy(y[:, :-1].flatten(0, 1), xs[0][:, 1:].flatten())
    return lambda y: y.float().square().mean()


def measured_peak(net, xs: list[torch.Tensor], loss_fn, optimizer) -> int:
    """The high-water mark of one training step after a first one (the optimizer state
    exists, gradients are None): weights, optimizer state and inputs, which exist before the
    step, plus the most the step's own tensors (PeakMeter) held at once."""
    loss_fn(net(*xs)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    meter = PeakMeter()
    with meter:
        loss_fn(net(*xs)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    before = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()) + list(xs))
    before += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())
    return before + meter.peak
