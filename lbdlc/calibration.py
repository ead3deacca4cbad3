"""Calibration and evaluation inputs for quantization (lbdlc/quant_int8.py, lbdlc/quant_report.py).

Data comes from the spec's own `train:` data section when it has one: the `make_data()`
function of the train.py that lbdlc generates for the spec (backends/train_script.py) is run
here, so calibration sees exactly the splits, preprocessing and seeds that training saw;
nothing about data kinds is repeated in this module. Without a `train:` section (or with
`split: synthetic`) the inputs are random draws of the model's signature: floats from a
standard normal, integer ids below the table they index.
"""
from __future__ import annotations

import numpy as np

from .errors import SpecError
from .ir import Graph

NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
BATCH = 16  # samples per calibration batch fed to ONNX Runtime


def has_data(loaded) -> bool:
    return getattr(loaded.spec, "train", None) is not None


_SPLITS: dict = {}  # (spec path, resolved spec hash) -> splits: a build's report and --verify read them once


def data_splits(loaded, graph: Graph) -> dict[str, dict[str, np.ndarray]]:
    """{split: {name: array}} from the spec's `train:` data, as the generated train.py makes it."""
    from .lock import resolved_sha256

    key = (str(loaded.path), resolved_sha256(loaded))
    if key not in _SPLITS:
        _SPLITS.clear()  # one spec's data at a time
        _SPLITS[key] = _make_splits(loaded, graph)
    return {s: dict(part) for s, part in _SPLITS[key].items()}


def _make_splits(loaded, graph: Graph) -> dict[str, dict[str, np.ndarray]]:
    from . import __version__
    from .backends import train_script
    from .training.check import plan

    source = train_script.generate(plan(loaded, graph), graph.name, __version__)
    # make_data() needs none of the training code; model.py is not needed to define it.
    source = source.replace("\nfrom model import Model\n", "\nModel = None\n")
    namespace = {"__name__": "_lbdlc_calibration_data", "__file__": str(loaded.path)}
    exec(compile(source, f"<train.py for {loaded.path.name}>", "exec"), namespace)  # noqa: S102  (lbdlc's own generated code, never spec text)
    made = namespace["make_data"]()
    splits = made[0] if isinstance(made, tuple) else made  # text data: (splits, vocabulary)
    return {s: {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in part.items()} for s, part in splits.items()}


def _int_high(loaded, graph: Graph) -> dict[str, int]:
    """Exclusive upper bound of each integer input: the smallest embedding table it indexes."""
    highs: dict[str, int] = {}
    names = {v.name for v in graph.inputs}
    for n in graph.nodes:
        if n.op == "embedding" and n.inputs and n.inputs[0].name in names:
            k = n.attrs.num_embeddings
            highs[n.inputs[0].name] = min(highs.get(n.inputs[0].name, k), k)
    return highs


def synthetic(graph: Graph, samples: int, seed: int = 0, sizes: dict[str, int] | None = None,
              int_high: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """`samples` random samples of the model's inputs (the first symbolic dim is the batch;
    other symbolic dims take `sizes`, default 16: calibrate at the sequence lengths the model
    will see, since ranges of position-dependent activations grow with them)."""
    rng = np.random.default_rng(seed)
    sizes, int_high = dict(sizes or {}), dict(int_high or {})
    out = {}
    for v in graph.inputs:
        shape, batch_seen = [], False
        for d in v.type.shape:
            if isinstance(d, int):
                shape.append(d)
            elif not batch_seen:
                shape.append(samples)
                batch_seen = True
            else:
                shape.append(sizes.get(str(d), 16))
        dtype = NUMPY.get(v.type.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            out[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[v.name] = np.ones(shape, dtype)
        else:
            out[v.name] = rng.integers(0, int_high.get(v.name, 2), shape).astype(dtype)
    return out


def samples(loaded, graph: Graph, split: str, count: int, seed: int = 0, loc=None, sizes: dict | None = None) -> tuple[dict[str, np.ndarray], str]:
    """`count` samples of the model's inputs from `split` (train, val, test or synthetic), and
    where they came from ("the 'train' split (seed 0)")."""
    if split == "synthetic" or not has_data(loaded):
        if split != "synthetic":
            raise SpecError(f"calibration split '{split}' needs a `train:` data section, and this spec has none", loc,
                            hint="use `calibration: {split: synthetic}` to calibrate on random inputs of the model's signature")
        sizes = dict(sizes or {})
        shown = "".join(f", {k}={v}" for k, v in sorted(sizes.items()))
        return synthetic(graph, count, seed, sizes, int_high=_int_high(loaded, graph)), f"synthetic inputs (seed {seed}{shown})"
    splits = data_splits(loaded, graph)
    part = splits.get(split) or {}
    names = [v.name for v in graph.inputs]
    missing = [n for n in names if n not in part]
    n_have = len(next(iter(part.values()))) if part else 0
    if missing or n_have == 0:
        have = ", ".join(f"{k} ({len(next(iter(v.values())))} samples)" for k, v in splits.items() if v)
        raise SpecError(f"the `train:` data has no samples of the model's inputs in split '{split}'", loc,
                        hint=f"splits: {have or 'none'}")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(n_have)[:count])
    dtypes = {v.name: NUMPY.get(v.type.dtype, np.float32) for v in graph.inputs}
    chosen = {n: np.ascontiguousarray(part[n][index]).astype(dtypes[n]) for n in names}
    return chosen, f"the '{split}' split (seed {seed})"


def batches(inputs: dict[str, np.ndarray], size: int = BATCH) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[i:i + size] for k, v in inputs.items()} for i in range(0, n, size)]
