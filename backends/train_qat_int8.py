"""train.py's quantization-aware training for ONNX Runtime's static int8 (`quantize: {default:
int8, method: static, qat: true}`; the block-format QAT is backends/train_qat.py).

`lbdlc build` hands the trained fp32 model to `onnxruntime.quantization.quantize_static` in
QDQ format (lbdlc/quant_int8.py). For every Conv, Gemm and MatMul it quantizes, ORT stores
- the weight as int8 (or uint8), symmetric, one scale per output channel (`per_channel`),
  in 7 bits (-64..64) with `reduce_range`;
- the bias of a Gemm or Conv as int32 with scale input_scale * weight_scale;
- the input activation and the output activation as uint8, asymmetric, from a range
  [rmin, rmax] that always contains 0 (`compute_scale_zp`: scale = (rmax - rmin) / 255,
  zero point = round(-rmin / scale)).
`patch(text, plan)` makes train.py train that model: QAT_INT8 lists the layers (those
lbdlc/quant_int8.py's plan quantizes: linear and convolution layers, less `rules:` with
`bits: none`) with the keys of their input and output activations, and
`simulate_int8_quantization(model)` replaces their forward by one that
- fake-quantizes the weight exactly as ORT stores it (`quantize_weight`: equal bit for bit to
  the dequantized int8 initializer; tests/test_qat_int8.py), and the bias to int32;
- fake-quantizes the input (unless it is another such layer's output, already quantized) and
  the output with a range observed in training mode: the batch's min/max, averaged with an
  exponential moving average (constant QAT_EMA, torch.ao's MovingAverageMinMaxObserver;
  min/max all-reduced across processes under torchrun); evaluation uses the frozen range.
  In training, activations are fake-quantized after the first QAT_DELAY (20%) of the steps
  (TensorFlow's quant_delay): trained from scratch, ranges that clip from the first step
  grow only as fast as their moving average and keep the logits small (digits MLP, 3 epochs:
  test loss 1.47 without the delay);
- passes gradients straight through (Bengio et al. 2013): unchanged for weights and bias,
  zero for activations outside the quantization range (clip-aware).

The ranges are not in the state dict (weights.safetensors and checkpoints keep the spec's
parameter names, so `lbdlc build --weights` and `--init` work as without QAT): train.py writes
them to qat_ranges.json beside weights.safetensors and in each checkpoint, and `--resume`
reads them back. `lbdlc build --weights run/weights.safetensors` finds run/qat_ranges.json and
gives its ranges to ORT's quantizer (TensorQuantOverrides rmin/rmax) instead of calibrating:
the deployed model quantizes activations with the scales training used.
"""
from __future__ import annotations

from lbdlc.quant_qat import QAT_RANGES

from .train_script import CHECKPOINT_LOADED, CHECKPOINT_SAVED, DEFINE_BEFORE, MODEL_READY, OPTIMIZER_MADE, WEIGHTS_SAVED, insert


def code(plan) -> str:
    q = plan.qat_int8
    line = q.get("line")
    where = f"{plan.spec_file}:{line}" if line else plan.spec_file
    weights = {"dtype": q["weights"], "per_channel": q["per_channel"], "reduce_range": q["reduce_range"]}
    table = "".join(f"    {name!r}: ({e['kind']!r}, {e['input']!r}, {e['output']!r}, {e['int32_bias']!r}),\n"
                    for name, e in q["layers"].items())
    return f'''\
# Quantization-aware training for ONNX Runtime's static int8 ({where}, `qat: true`):
# these layers train with the int8 weights, int32 biases and uint8 activations that
# `lbdlc build` deploys (onnxruntime.quantization.quantize_static, QDQ).
# layer: (kind, input activation, output activation, int32 bias)
QAT_INT8 = {{
{table}}}
QAT_WEIGHTS = {weights!r}  # as ORT quantizes them (the spec's `weights`, `per_channel`, `reduce_range`)
QAT_EMA = 0.01  # averaging constant of the activation ranges (as torch.ao's MovingAverageMinMaxObserver)
# Activations train in fp32 for this fraction of the steps while their ranges are observed,
# then fake-quantized (weights are from the first step): from scratch, a range that clips
# from the start grows only as fast as its moving average and holds the logits small.
QAT_DELAY = 0.2
QAT_RANGES = {QAT_RANGES!r}  # the learned ranges, beside weights.safetensors and in checkpoints


def quant_range(dtype: str, reduce_range: bool = False, symmetric: bool = False) -> tuple[int, int]:
    """onnxruntime.quantization's get_qmin_qmax_for_qType."""
    if reduce_range:
        return {{"int8": (-64, 64), "uint8": (0, 127)}}[dtype]
    if symmetric and dtype == "int8":
        return -127, 127
    return {{"int8": (-128, 127), "uint8": (0, 255)}}[dtype]


def scale_zero_point(rmin: torch.Tensor, rmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """onnxruntime.quantization's compute_scale_zp, elementwise: the range is widened to
    contain 0, the scale computed in float64 and stored as float32. (float32 scale, zero point)."""
    rmin = torch.minimum(rmin.float(), torch.zeros_like(rmin, dtype=torch.float32))
    rmax = torch.maximum(rmax.float(), torch.zeros_like(rmax, dtype=torch.float32))
    if symmetric:
        absmax = torch.maximum(rmin.abs(), rmax.abs())
        rmin, rmax = -absmax, absmax
    scale = (rmax.double() - rmin.double()) / float(qmax - qmin)
    tiny = scale < torch.finfo(torch.float32).tiny
    safe = torch.where(tiny, torch.ones_like(scale), scale)
    if symmetric:
        zero = torch.full_like(scale, float(round((qmin + qmax) / 2.0)))
    else:
        zero = torch.round(qmin - rmin.double() / safe)
    return safe.float(), torch.where(tiny, torch.zeros_like(zero), zero)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight ORT stores, dequantized; its scale per output channel): symmetric per
    channel (or per tensor), round half to even of w / scale, clipped to the type's range."""
    dtype, per_channel = QAT_WEIGHTS["dtype"], QAT_WEIGHTS["per_channel"]
    symmetric = per_channel or dtype == "int8"  # ORT: per-channel weights are always symmetric
    qmin, qmax = quant_range(dtype, QAT_WEIGHTS["reduce_range"], symmetric)
    x = w.detach().float()
    rows = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    scale, zero = scale_zero_point(rows.amin(1), rows.amax(1), qmin, qmax, symmetric)
    low, high = quant_range(dtype)
    q = torch.clamp(torch.round(rows / scale[:, None]) + zero[:, None].float(), low, high)
    out = ((q.double() - zero[:, None]) * scale[:, None].double()).float()
    return out.reshape(w.shape).to(w.dtype), (scale if per_channel else scale.expand(w.shape[0]))


def quantize_bias(b: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The bias ORT stores for a Gemm or Conv: int32 with scale input_scale * weight_scale."""
    scale = (input_scale.float() * weight_scale.float()).double()
    q = torch.clamp(torch.round(b.detach().double() / scale), -2**31, 2**31 - 1)
    return (q * scale).float().to(b.dtype)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear to uint8 (round half to even, saturate)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


class _Through(torch.autograd.Function):
    """Forward: the quantized value; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ClippedThrough(torch.autograd.Function):
    """Forward: x fake-quantized to uint8; backward: the gradient where x is inside the
    quantization range, zero where it saturated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale, zero)
        return quantize_activation(x, scale, zero)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, zero = ctx.saved_tensors
        inside = (x >= (0 - zero) * scale) & (x <= (255 - zero) * scale)
        return grad * inside, None, None


class RangeObserver:
    """The range [rmin, rmax] of one activation: batch min/max, averaged over training steps."""

    def __init__(self) -> None:
        self.rmin = self.rmax = None
        self.steps, self.delay = 0, 0  # training steps observed; fp32 activations until `delay` of them
        self._last = None  # the tensor seen last: a value feeding two layers is observed once

    def observe(self, x: torch.Tensor) -> None:
        if self._last is not None and self._last() is x:
            return
        self._last = weakref.ref(x)
        self.steps += 1
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        if dist.is_initialized():  # every process quantizes with the same range
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if self.rmin is None:
            self.rmin, self.rmax = lo, hi
        else:
            self.rmin = self.rmin + QAT_EMA * (lo - self.rmin)
            self.rmax = self.rmax + QAT_EMA * (hi - self.rmax)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = scale_zero_point(self.rmin, self.rmax, 0, 255, symmetric=False)
        return scale, zero.float()

    def fake_quantize(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            self.observe(x)
            if self.steps <= self.delay:
                return x
        if self.rmin is None:  # never trained (evaluation before the first step): not quantized
            return x
        scale, zero = self.qparams()
        return _ClippedThrough.apply(x, scale.to(x.device), zero.to(x.device))


def _int8_forward(m: nn.Module, kind: str, inp: RangeObserver, out: RangeObserver, quantize_input: bool,
                  int32_bias: bool, x: torch.Tensor) -> torch.Tensor:
    if quantize_input:
        x = inp.fake_quantize(x, m.training)
    quantized, weight_scale = quantize_weight(m.weight)
    w = _Through.apply(m.weight, quantized)
    b = m.bias
    if b is not None and int32_bias and inp.rmin is not None:
        b = _Through.apply(b, quantize_bias(b, inp.qparams()[0].to(b.device), weight_scale.to(b.device)))
    if kind == "linear":
        y = F.linear(x, w, b if int32_bias else None)
    else:
        y = m._conv_forward(x, w, b)
    y = out.fake_quantize(y, m.training)
    if b is not None and not int32_bias:  # MatMul + Add: ORT quantizes the MatMul's output, the bias stays fp32
        y = y + b
    return y


def simulate_int8_quantization(model: nn.Module) -> None:
    """QAT_INT8's forward as ONNX Runtime's static int8 computes it (their parameters stay fp32;
    the observers are model.qat_int8_observers, outside the state dict)."""
    observers: dict[str, RangeObserver] = {{}}
    produced = {{entry[2] for entry in QAT_INT8.values()}}
    for name, (kind, inp, out, int32_bias) in QAT_INT8.items():
        layer = model.get_submodule(name)
        expected = nn.Linear if kind == "linear" else (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        if not isinstance(layer, expected):
            sys.exit(f"error: int8 QAT for {{name}} ({{type(layer).__name__}}) is not supported; rebuild without qat")
        i, o = observers.setdefault(inp, RangeObserver()), observers.setdefault(out, RangeObserver())
        layer.forward = functools.partial(_int8_forward, layer, kind, i, o, inp not in produced, int32_bias)
    model.qat_int8_observers = observers


def delay_int8_activations(model: nn.Module, total_steps: int) -> None:
    """Fake-quantize activations in training after the first QAT_DELAY of the steps."""
    for obs in model.qat_int8_observers.values():
        obs.delay = int(QAT_DELAY * total_steps)


def save_qat_ranges(model: nn.Module, path: Path) -> None:
    """The learned activation ranges (and the scale and zero point ORT derives from them),
    for `lbdlc build --weights`: {{"tensors": {{key: {{rmin, rmax, scale, zero_point}}}}, "layers": ...}}."""
    if dist.is_initialized() and dist.get_rank() > 0:  # one writer
        return
    tensors = {{}}
    for key, obs in model.qat_int8_observers.items():
        if obs.rmin is not None:
            scale, zero = obs.qparams()
            tensors[key] = {{"rmin": float(obs.rmin), "rmax": float(obs.rmax), "scale": float(scale), "zero_point": int(zero),
                            "steps": obs.steps}}
    layers = {{name: {{"kind": k, "input": i, "output": o, "int32_bias": b}} for name, (k, i, o, b) in QAT_INT8.items()}}
    data = {{"format": "lbdlc qat int8 ranges 1", "activations": "uint8, asymmetric", "weights": QAT_WEIGHTS,
            "ema": QAT_EMA, "layers": layers, "tensors": tensors}}
    path.write_text(json.dumps(data, indent=2) + "\\n")


def load_qat_ranges(model: nn.Module, path: Path) -> None:
    """Restore the ranges save_qat_ranges wrote (--resume); without the file they start afresh."""
    if not path.exists():
        print(f"note: {{path}} is missing: int8 QAT activation ranges start afresh")
        return
    saved = json.loads(path.read_text())["tensors"]
    device = next(model.parameters()).device
    for key, obs in model.qat_int8_observers.items():
        if key in saved:
            obs.rmin = torch.tensor(saved[key]["rmin"], dtype=torch.float32, device=device)
            obs.rmax = torch.tensor(saved[key]["rmax"], dtype=torch.float32, device=device)
            obs.steps = int(saved[key].get("steps", 0))
'''


def patch(text: str, plan) -> str:
    if not getattr(plan, "qat_int8", None):
        return text
    if "\nimport functools\n" not in text:  # the standard modules QAT's code needs, in order
        text = text.replace("\nimport json\n", "\nimport functools\nimport json\n", 1)
    if "\nimport weakref\n" not in text:
        text = text.replace("\nimport time\n", "\nimport time\nimport weakref\n", 1)
    return insert(text, "train_qat_int8", [
        (DEFINE_BEFORE, "before", code(plan) + "\n\n"),
        (MODEL_READY, "after", "    simulate_int8_quantization(raw_model)  # QAT: train the int8 model ORT deploys\n"),
        (OPTIMIZER_MADE, "before", "    delay_int8_activations(raw_model, total_steps)\n"),
        (CHECKPOINT_SAVED, "after", "    save_qat_ranges(model, tmp / QAT_RANGES)\n"),
        (CHECKPOINT_LOADED, "after", "    load_qat_ranges(model, path / QAT_RANGES)\n"),
        (WEIGHTS_SAVED, "after", "        save_qat_ranges(raw_model, out / QAT_RANGES)\n"),
    ])
