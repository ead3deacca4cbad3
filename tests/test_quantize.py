"""Weight-only block quantization (BOOK.md §4): the Q8_0/Q4_0/Q4_1 byte formats
(lbdlc/quant_formats.py), the linear_q op on tests/specs/quant_ops.yaml (three backends
against a torch reference), and the `quantize` pass on a small GPT-2 (three backends agree on
the quantized model, error against fp32 bounded, bytes), and its located errors."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, located
from lbdlc.passes import PassManager
from lbdlc.passes.quantize import Quantize, Rule, dequantize, to_graph_layout
from safetensors.torch import save_file
from test_parity import TOLERANCE

from lbdlc import quant_formats as qf
from lbdlc.driver import BuildOptions, build
from lbdlc.errors import SpecError
from lbdlc.lower import load, lower
from lbdlc.verify import compare, random_inputs, run_onnx
from lbdlc.weights import initialize

SPEC = ROOT / "tests" / "specs" / "quant_ops.yaml"
GPT2 = ROOT / "specs" / "gpt2.yaml"
# Small GPT-2 (random init), everything Q4_1 (token table with the tied lm_head, attention
# projections, MLPs) against fp32: logits' relative RMS error measured 0.142 (max |diff| 0.19
# for max |logit| 1.31; 0.089 with only the MLPs quantized); each Q4_1 matrix alone has
# relative RMS error ~0.078. The bound is `--verify`'s for 4-bit blocks (lbdlc/quant_report.py).
REL_RMS_BOUND = 0.2
SMALL = ["n_layer=2", "d_model=128", "n_head=4", "vocab=256", "ctx=32"]


def _random_weight(rng, rows=8, cols=96):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: d = 0 must not produce NaN
    w[1, 32:64] = 3.5  # a constant block
    return w


@pytest.mark.parametrize("fmt,size", [("q8_0", 34), ("q4_0", 18), ("q4_1", 20)])
def test_block_sizes(fmt, size):
    assert qf.get_format(fmt).block_bytes == size
    packed = qf.pack(np.zeros((3, 64), np.float32), fmt)
    assert packed.shape == (3, 2, size) and packed.dtype == np.uint8
    assert qf.packed_bytes(3, 64, fmt) == packed.nbytes


def test_q4_1_bytes_rederived():
    """Re-derive x̄ = d·q + m from the raw bytes of random blocks, independently of `unpack`."""
    rng = np.random.default_rng(0)
    w = _random_weight(rng)
    packed = qf.pack(w, "q4_1")
    deq = qf.unpack(packed, "q4_1")
    for _ in range(20):
        r, b = rng.integers(w.shape[0]), rng.integers(w.shape[1] // 32)
        raw = packed[r, b].tobytes()
        assert len(raw) == 20
        d, m = struct.unpack("<ee", raw[:4])
        q = [raw[4 + j] & 0xF for j in range(16)] + [raw[4 + j] >> 4 for j in range(16)]
        want = np.array([np.float32(d) * np.float32(qi) + np.float32(m) for qi in q], np.float32)
        np.testing.assert_array_equal(deq[r, 32 * b:32 * b + 32], want)
        block = w[r, 32 * b:32 * b + 32]
        # m is the block minimum (fp16), q spans 0..15 and the error is at most half a step (+ fp16 rounding)
        assert abs(m - block.min()) <= 1e-3 * max(1.0, abs(block.min()))
        if d > 0:
            assert min(q) == 0 and max(q) == 15
        assert np.abs(want - block).max() <= d / 2 + 2e-3 * np.abs(block).max() + 1e-6


def test_q4_0_and_q8_0_bytes_rederived():
    rng = np.random.default_rng(1)
    w = _random_weight(rng)
    p4, p8 = qf.pack(w, "q4_0"), qf.pack(w, "q8_0")
    d4, d8 = qf.unpack(p4, "q4_0"), qf.unpack(p8, "q8_0")
    for _ in range(20):
        r, b = rng.integers(w.shape[0]), rng.integers(w.shape[1] // 32)
        raw = p4[r, b].tobytes()
        (d,) = struct.unpack("<e", raw[:2])
        q = [raw[2 + j] & 0xF for j in range(16)] + [raw[2 + j] >> 4 for j in range(16)]
        np.testing.assert_array_equal(d4[r, 32 * b:32 * b + 32], np.float32(d) * (np.array(q, np.float32) - 8))
        raw = p8[r, b].tobytes()
        (d,) = struct.unpack("<e", raw[:2])
        q = struct.unpack("<32b", raw[2:])
        np.testing.assert_array_equal(d8[r, 32 * b:32 * b + 32], np.float32(d) * np.array(q, np.float32))


@pytest.mark.parametrize("fmt,bound", [("q8_0", 0.006), ("q4_0", 0.095), ("q4_1", 0.085)])
def test_roundtrip_error(fmt, bound):
    """Relative RMS error of the dequantized weights for Gaussian weights."""
    w = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    err = qf.unpack(qf.pack(w, fmt), fmt) - w
    rel = float(np.sqrt((err ** 2).mean() / (w ** 2).mean()))
    assert rel < bound, rel
    assert np.isfinite(qf.unpack(qf.pack(np.zeros((2, 32), np.float32), fmt), fmt)).all()


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the block size"):
        qf.pack(np.zeros((2, 40), np.float32), "q4_1")
    with pytest.raises(ValueError, match="unknown block format"):
        qf.pack(np.zeros((2, 32), np.float32), "q3_k")


def test_graph_layout_matches_llama_cpp_blocks():
    """The buffers linear_q reads dequantize to exactly the llama.cpp blocks' values."""
    w = np.random.default_rng(3).standard_normal((6, 96)).astype(np.float32)
    for fmt in qf.FORMATS:
        packed = qf.pack(w, fmt)
        np.testing.assert_array_equal(dequantize(to_graph_layout(packed, fmt), fmt), qf.unpack(packed, fmt))


# --- linear_q on its parity spec ---------------------------------------------------------

def _quant_weights(seed=0):
    graph = lower(load(SPEC))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in graph.params.items():
        if p.dtype == "uint8":
            out[name] = torch.randint(0, 256, p.shape, generator=gen, dtype=torch.int64).to(torch.uint8)
        elif p.dtype == "float16":
            out[name] = (torch.rand(p.shape, generator=gen) * 0.1 - (0.05 if name.endswith("min") else 0)).half()
        else:
            out[name] = torch.randn(p.shape, generator=gen) * 0.5
    return out


def _reference_linear_q(x, w, prefix, fmt):
    q = w[f"{prefix}.qweight"].long()
    if fmt != "q8_0":
        q = torch.stack([q % 16, q // 16], -1).flatten(-2)
    zero = {"q8_0": 128, "q4_0": 8, "q4_1": 0}[fmt]
    deq = (q.double() - zero) * w[f"{prefix}.scale"].double().unsqueeze(-1)
    if fmt == "q4_1":
        deq = deq + w[f"{prefix}.min"].double().unsqueeze(-1)
    bias = w.get(f"{prefix}.bias")
    return F.linear(torch.from_numpy(x).double(), deq.flatten(1), None if bias is None else bias.double()).numpy()


def _reference_embedding_q(ids, w, prefix, fmt):
    """F.embedding on the whole table dequantized the llama.cpp way (quant_formats' layout)."""
    q = w[f"{prefix}.qweight"].long()
    if fmt != "q8_0":
        q = torch.stack([q % 16, q // 16], -1).flatten(-2)
    zero = {"q8_0": 128, "q4_0": 8, "q4_1": 0}[fmt]
    table = (q.double() - zero) * w[f"{prefix}.scale"].double().unsqueeze(-1)
    if fmt == "q4_1":
        table = table + w[f"{prefix}.min"].double().unsqueeze(-1)
    return F.embedding(torch.from_numpy(ids), table.flatten(1)).numpy()


@pytest.fixture(scope="module")
def quant_build(tmp_path_factory):
    """The module's only TVM build of the op spec."""
    out = tmp_path_factory.mktemp("quant_ops")
    weights = _quant_weights()
    save_file(weights, str(out / "trained.safetensors"))
    build(SPEC, out / "build", BuildOptions(weights=out / "trained.safetensors"))
    return out / "build", weights


def test_linear_q_backends_agree_with_reference(quant_build):
    out, w = quant_build
    for sizes in ({"batch": 1, "seq": 3}, {"batch": 3, "seq": 2}):
        inputs = random_inputs(out, sizes, int_high=5)
        agreement = compare(out, inputs)
        print("linear_q spec", sizes, agreement.max_abs_diff)
        assert agreement.ok(TOLERANCE), agreement.max_abs_diff
        got = run_onnx(out, inputs)
        want = [_reference_linear_q(inputs["x"], w, "q8", "q8_0"), _reference_linear_q(inputs["x"], w, "q40", "q4_0"),
                _reference_linear_q(inputs["xs"], w, "q41", "q4_1"),
                _reference_embedding_q(inputs["ids"], w, "e41", "q4_1"), _reference_embedding_q(inputs["ids"], w, "e8", "q8_0")]
        assert len(got) == len(want)
        for g, r in zip(got, want):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, atol=TOLERANCE, rtol=0)


def test_linear_q_onnx_uses_matmul_nbits(quant_build):
    """Q8_0 and Q4_0 run as ONNX Runtime's MatMulNBits (com.microsoft); Q4_1 dequantizes in the graph."""
    import onnx

    out, _ = quant_build
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    nbits = {n.name.split("/")[0]: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert nbits == {"q8": {"K": 64, "N": 5, "bits": 8, "block_size": 32}, "q40": {"K": 64, "N": 7, "bits": 4, "block_size": 32}}
    assert {o.domain for o in model.opset_import} == {"", "com.microsoft"}
    assert any(n.op_type == "Floor" and n.name.startswith("q41/") for n in model.graph.node)


def test_linear_q_parameters():
    graph = lower(load(SPEC))
    shapes = {n: (tuple(p.shape), p.dtype, p.buffer) for n, p in graph.params.items()}
    assert shapes["q8.qweight"] == ((5, 2, 32), "uint8", True)
    assert shapes["q40.qweight"] == ((7, 2, 16), "uint8", True)
    assert shapes["q41.min"] == ((6, 3), "float16", True)
    assert "q40.bias" not in shapes
    # trainable values: the biases only
    assert sum(p.numel for p in graph.params.values() if not p.buffer) == 5 + 6


def test_linear_q_row_length_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.read_text().replace("shape: [batch, 64]", "shape: [batch, 40]"))
    with pytest.raises(SpecError) as err:
        lower(load(bad))
    text = str(err.value)
    assert "divisible by the block size 32" in text and "bad.yaml:" in text


def test_embedding_q_row_length_error_is_located(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.read_text().replace("embedding_dim: 64", "embedding_dim: 40"))
    code, _, err = cli("check", bad)
    line = next(k for k, t in enumerate(bad.read_text().splitlines(), 1) if "embedding_dim: 40" in t)
    assert code == 2 and "embedding_dim divisible by the block size 32, got 40" in located(err, bad, line, "40")


# --- the quantize pass on GPT-2 -------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_builds(tmp_path_factory):
    """Small GPT-2 quantized to Q4_1 (all three backends, one TVM build) and fp32 (ONNX only)."""
    tmp = tmp_path_factory.mktemp("gpt2_q")
    spec = tmp / "gpt2.yaml"
    spec.write_text(GPT2.read_text() + "compile: {pytorch: true}\n")  # model.py gets the pass too
    quant = build(spec, tmp / "q4_1", BuildOptions(overrides=tuple(SMALL), passes=("quantize",)))
    fp32 = build(spec, tmp / "fp32", BuildOptions(overrides=tuple(SMALL), backends=("onnx",)))
    return quant, fp32


def test_gpt2_q4_1_backends_agree(gpt2_builds):
    quant, fp32 = gpt2_builds
    ops_ = [n.op for n in quant.optimized.graph.nodes]
    # 2 blocks x (q, k, v, out + 2 MLP) projections, and lm_head on wte's quantized table
    assert ops_.count("linear_q") == 13 and ops_.count("embedding_q") == 1 and "attention" not in ops_
    inputs = random_inputs(quant.out_dir, {"batch": 2, "seq": 16}, int_high=256)
    agreement = compare(quant.out_dir, inputs)
    print("gpt2 small Q4_1 backends", agreement.max_abs_diff)
    assert agreement.ok(TOLERANCE), agreement.max_abs_diff
    # against fp32: the logits move, but by little (measured max |diff| ~ see report)
    q = run_onnx(quant.out_dir, inputs)[0]
    f = run_onnx(fp32.out_dir, inputs)[0]
    diff = float(np.abs(q - f).max())
    rel_rms = float(np.sqrt(((q - f) ** 2).mean() / (f ** 2).mean()))
    print(f"gpt2 small Q4_1 vs fp32 logits: max |diff| {diff:.4g} (max |logit| {np.abs(f).max():.4g}), relative RMS {rel_rms:.4g}")
    assert 0 < diff and rel_rms < REL_RMS_BOUND, (diff, rel_rms)
    # bytes: every quantized matrix is 20/128 of its fp32 size (Q4_1 = 5 bits a weight)
    files = {p.name: p.stat().st_size for p in quant.out_dir.iterdir()}
    assert files["model.onnx"] < (fp32.out_dir / "model.onnx").stat().st_size


def test_pass_report_and_bytes():
    graph = lower(load(GPT2, SMALL))
    weights = initialize(graph, 0)
    q = Quantize("q4_1", [Rule("h.0.mlp.c_fc", "q8_0"), Rule("h.1.*", None)])
    result = PassManager([q]).run(graph, weights)
    rows = {r["layer"]: r for r in q.report}
    attn = {f"h.0.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert set(rows) == {"wte", "h.0.mlp.c_fc", "h.0.mlp.c_proj"} | attn  # first match wins; h.1.* stays fp32
    assert rows["wte"]["tied"] == ["lm_head"] and rows["wte"]["bytes_after"] * 128 == rows["wte"]["bytes_before"] * 20
    assert rows["h.0.mlp.c_fc"]["format"] == "q8_0" and rows["h.0.mlp.c_fc"]["bytes_after"] * 128 == rows["h.0.mlp.c_fc"]["bytes_before"] * 34
    assert rows["h.0.mlp.c_proj"]["bytes_after"] * 128 == rows["h.0.mlp.c_proj"]["bytes_before"] * 20
    assert rows["h.0.mlp.c_fc"]["rel_rms_error"] < 0.006 and rows["h.0.mlp.c_proj"]["rel_rms_error"] < 0.085
    log = result.log[0]
    saved = sum(r["bytes_before"] - r["bytes_after"] for r in q.report)
    assert log.bytes_before - log.bytes_after == saved
    assert "h.0.mlp.c_fc.weight" not in result.weights and result.weights["h.0.mlp.c_fc.qweight"].dtype == torch.uint8
    assert "h.1.mlp.c_fc.weight" in result.weights and "h.1.attn.q_proj.weight" in result.weights
    assert "wte.weight" not in result.weights and result.weights["wte.qweight"].shape == (256, 4, 16)
    assert "h.0.mlp.c_fc.weight" in weights  # the manager never edits the weights it is given


def test_full_gpt2_bytes_from_graph():
    """Full-size GPT-2 (no weights, graph only): every matrix (the token table shared with the
    tied lm_head, the attention projections, the MLPs) shrinks to 20/128; the whole model's
    parameter bytes to 16.2% of fp32 (issue #7: at most 17%), wpe, norms and biases staying fp32."""
    graph = lower(load(GPT2))
    q = Quantize("q4_1")
    log = PassManager([q]).run(graph).log[0]
    assert len(q.report) == 1 + 12 * 6  # wte, and per block q/k/v/out and the two MLP matrices
    assert all(r["bytes_after"] * 128 == r["bytes_before"] * 20 for r in q.report)
    print(f"full GPT-2 Q4_1: {log.bytes_before:,} -> {log.bytes_after:,} bytes ({log.bytes_after / log.bytes_before:.4f})")
    assert log.bytes_after <= 0.17 * log.bytes_before  # measured 80,838,624 of 497,759,232 bytes: 0.1624


def test_tied_head_rule_keeps_the_table_fp32():
    """`lm_head: none` is a rule about the tied table too: both stay fp32 (and the rule counts as used)."""
    graph = lower(load(GPT2, SMALL))
    q = Quantize("q4_1", [Rule("lm_head", None)])
    result = PassManager([q]).run(graph, initialize(graph, 0))
    assert "wte" not in {r["layer"] for r in q.report} and "wte.weight" in result.weights
    assert {n.op for n in result.graph.nodes if n.name in ("wte", "lm_head")} == {"embedding", "linear"}


def test_bad_rules():
    graph = lower(load(GPT2, SMALL))
    with pytest.raises(SpecError, match="matches no linear layer"):
        PassManager([Quantize("q4_1", [Rule("*.attn.nothing", "q8_0")])]).run(graph)
    with pytest.raises(SpecError, match="unsupported quantization format 'q3_k'"):
        Quantize("q4_1", [Rule("h.*", "q3_k")])


# --- the spec's `quantize:` section and `lbdlc build -q` ----------------------------------------

MLP = """\
lbdlc: 1
inputs:
  x: {shape: [batch, 64]}
layers:
  - {name: fc1, op: linear, out_features: 32}
  - {name: act, op: relu}
  - {name: fc2, op: linear, out_features: 32}
  - {name: fc3, op: linear, out_features: 10}
"""
SECTION = """\
quantize:
  default: q4_1
  rules:
    - {match: "fc1", bits: 8}
    - {match: "fc3", bits: none}
"""


def test_spec_section_rules(cli, write_spec, tmp_path):
    path = write_spec(MLP + SECTION)
    code, out, err = cli("build", path, "-o", tmp_path / "out", "-b", "onnx", "-b", "pytorch", "--verify")
    assert code == 0, (out, err)
    import json
    report = {r["layer"]: r for r in json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]}
    assert {k: r["format"] for k, r in report.items()} == {"fc1": "q8_0", "fc2": "q4_1"}  # fc3 kept fp32
    assert report["fc1"]["bytes_before"] == 32 * 64 * 4 and report["fc1"]["bytes_after"] == 32 * 2 * 34
    assert report["fc2"]["bytes_after"] == 32 * 1 * 20
    code_text = (tmp_path / "out" / "model.py").read_text()  # model.py computes the same quantized function
    assert "LinearQ(64, 32, 'q8_0')" in code_text and "LinearQ(32, 32, 'q4_1')" in code_text and "nn.Linear(32, 10)" in code_text
    assert "max |diff|" in out


def test_cli_quantize_option(cli, write_spec, tmp_path):
    path = write_spec(MLP)
    code, out, err = cli("build", path, "-o", tmp_path / "out", "-b", "onnx", "-q", "q8_0")
    assert code == 0, (out, err)
    import json
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]
    assert [(r["layer"], r["format"]) for r in report] == [("fc1", "q8_0"), ("fc2", "q8_0"), ("fc3", "q8_0")]
    assert "fc1" in out and "q8_0" in out and "rel RMS error" in out  # the quantization report in the build output


def test_rule_matching_nothing_is_located(cli, write_spec, tmp_path):
    path = write_spec(MLP + SECTION.replace('"fc3"', '"fc9"'))
    code, _, err = cli("build", path, "-o", tmp_path / "out", "-b", "onnx")
    assert code != 0
    assert "quantization rule 'fc9' matches no linear layer" in located(err, path, 13, 'fc9')
    assert "fc1" in err  # the hint lists the linear layers


def test_unsupported_bits_is_located(cli, write_spec):
    path = write_spec(MLP + SECTION.replace("bits: 8", "bits: 6"))
    code, _, err = cli("check", path)
    assert code != 0
    assert "bits 6 is not supported" in located(err, path, 12, "6}")


def test_bad_cli_choice(cli, write_spec, tmp_path):
    code, _, err = cli("build", write_spec(MLP), "-o", tmp_path / "out", "-b", "onnx", "-q", "q3_k")
    assert code != 0 and "unknown quantization 'q3_k'" in err and "Traceback" not in err


def test_spec_choices_resolve():
    from lbdlc.passes.quantize import from_spec

    from lbdlc.quant_spec import QuantizeSpec

    spec = QuantizeSpec(default="int4", format="q4_0", rules=[{"match": "a", "bits": 8}, {"match": "b", "bits": 4},
                                                              {"match": "c", "format": "q4_1"}, {"match": "d", "bits": "none"}])
    q = from_spec(spec)
    assert q.default == "q4_0" and [r.format for r in q.rules] == ["q8_0", "q4_0", "q4_1", None]
    # int8 is ONNX Runtime's int8 (lbdlc/quant_int8.py; dynamic by default), except under method: weight_only (Q8_0)
    assert QuantizeSpec(default="int8").int8_method == "dynamic" and from_spec(QuantizeSpec(default="int8")).default is None
    assert from_spec(QuantizeSpec(default="int8", method="weight_only")).default == "q8_0"
    assert from_spec(QuantizeSpec(default="none")).default is None
    with pytest.raises(ValueError, match="either `bits`"):
        QuantizeSpec(rules=[{"match": "a"}])
