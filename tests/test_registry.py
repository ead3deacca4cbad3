"""Adding an op means a registry entry, an emitter in every backend, and a place in a parity spec (tests/specs/)."""
import pytest

from lbdlc import ops
from lbdlc.backends import onnx as onnx_backend
from lbdlc.backends import pytorch as pytorch_backend
from lbdlc.backends import tvm as tvm_backend
from lbdlc.lower import load

from conftest import ROOT


@pytest.mark.parametrize("backend", [pytorch_backend, onnx_backend, tvm_backend], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_op_has_an_emitter(backend):
    missing = sorted(set(ops.REGISTRY) - set(backend.EMITTERS))
    assert not missing, f"{backend.__name__} lacks emitters for {missing}"
    assert not set(backend.EMITTERS) - set(ops.REGISTRY), "emitter for an op that is not registered"


def test_every_op_is_in_the_parity_spec():
    """Each op appears in some parity spec: all_ops.yaml (float inputs) or transformer_ops.yaml (token ids)."""
    specs = sorted((ROOT / "tests" / "specs").glob("*.yaml"))
    used = {layer.op for path in specs for layer in load(path).spec.layers}
    assert sorted(set(ops.REGISTRY) - used) == []


def test_every_op_documents_itself():
    for name, op in ops.REGISTRY.items():
        assert op.summary, f"op {name} has no docstring"
