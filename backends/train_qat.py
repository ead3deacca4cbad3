"""train.py's quantization-aware training (QAT), for a spec whose `quantize:` says `qat: true`.

`patch(text, plan)` adds to a generated train.py (backends/train_script.py):
- QAT_LAYERS: layer -> block format, the layers `lbdlc build` will quantize (the choice of
  passes/quantize.py, spelled out);
- `fake_quantize(w, fmt)`: the format's quantize-then-dequantize in torch, equal bit for bit to
  lbdlc/quant_formats.py's pack + unpack (the fp16 scale and minimum included), with a
  straight-through gradient (Bengio et al. 2013): the forward sees the quantized weight, the
  gradient reaches the fp32 weight as if quantization were the identity;
- `simulate_quantization(model)`, called right after the model is built: those layers'
  forward uses the fake-quantized weight. Only their `forward` changes, so the state dict,
  the optimizer, checkpoints, `--resume` and DDP are as without QAT.
train.py saves the fp32 weights; `lbdlc build --weights` quantizes them with the same formats,
so the deployed model computes exactly what training saw.

QAT for ONNX Runtime's static int8 (int8 weights and learned uint8 activation ranges) is
backends/train_qat_int8.py; `patch` applies it too.
"""
from __future__ import annotations

from .train_script import DEFINE_BEFORE, MODEL_READY, insert


def code(plan) -> str:
    where = f"{plan.spec_file}:{plan.qat_line}" if getattr(plan, "qat_line", None) else plan.spec_file
    table = "".join(f"    {name!r}: {fmt!r},\n" for name, fmt in sorted(plan.qat.items()))
    return f'''\
# Quantization-aware training ({where}, `quantize: {{qat: true}}`): these layers train with
# the weights `lbdlc build` will deploy (blocks of 32 weights, llama.cpp's formats).
QAT_LAYERS = {{
{table}}}
BLOCK = 32


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fmt: str) -> torch.Tensor:
        return quantize_dequantize(w.detach(), fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def quantize_dequantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """What the deployed model holds for `w`: each row in blocks of 32, quantized to `fmt`
    and dequantized with the fp16 scale (and minimum) the packed format stores."""
    x = w.float().reshape(w.shape[0], -1, BLOCK)
    half = lambda t: t.half().float()  # noqa: E731  (the stored fp16 values)
    if fmt == "q8_0":
        d = x.abs().amax(-1) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(x * inv[..., None]).clamp(-128, 127)
        out = half(d)[..., None] * q
    elif fmt == "q4_0":  # d = (signed value of largest magnitude) / -8
        biggest = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))[..., 0]
        d = biggest / -8.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(x * inv[..., None] + 8.5), max=15)
        out = half(d)[..., None] * (q - 8.0)
    else:  # q4_1: scale and minimum
        lo, hi = x.amin(-1), x.amax(-1)
        d = (hi - lo) / 15.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc((x - lo[..., None]) * inv[..., None] + 0.5), max=15)
        out = half(d)[..., None] * q + half(lo)[..., None]
    return out.reshape(w.shape).to(w.dtype)


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    return _StraightThrough.apply(w, fmt)


def simulate_quantization(model: nn.Module) -> None:
    """QAT_LAYERS' forward with fake-quantized weights (their parameters stay fp32)."""
    for name, fmt in QAT_LAYERS.items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            layer.forward = lambda x, m=layer, f=fmt: F.linear(x, fake_quantize(m.weight, f), m.bias)
        elif isinstance(layer, nn.Embedding):
            layer.forward = lambda ids, m=layer, f=fmt: F.embedding(ids, fake_quantize(m.weight, f), m.padding_idx)
        else:
            sys.exit(f"error: QAT for {{name}} ({{type(layer).__name__}}) is not supported; rebuild without qat")
'''


def patch(text: str, plan) -> str:
    from . import train_qat_int8  # `quantize: {default: int8, method: static, qat: true}`

    text = train_qat_int8.patch(text, plan)
    if not getattr(plan, "qat", None):
        return text
    return insert(text, "train_qat", [
        (DEFINE_BEFORE, "before", code(plan) + "\n\n"),
        (MODEL_READY, "after", "    simulate_quantization(raw_model)  # QAT: train with the deployed weights\n"),
    ])
