"""Vision ops for dense prediction: adaptive average pooling to a fixed grid (PSPNet's
pyramid pooling module pools one feature map to 1x1, 2x2, 3x3 and 6x6 bins).

ONNX has no adaptive pooling besides the global one, so lbdlc defines adaptive pooling
only where it is an ordinary average pool: each input side a multiple of its output side,
kernel = stride = input / output. Then every backend computes the same windows as
PyTorch's F.adaptive_avg_pool2d; other sizes are refused at the spec line.
"""
from __future__ import annotations

from ..ir import TensorType, numel
from . import Op, OpAttrs, ShapeError, register
from .conv import Size2
from .rules import expect_rank, pair


def adaptive_window(a, x: TensorType) -> tuple[int, int]:
    """The (kernel = stride) window of an adaptive pool of `x`, checked to divide it exactly."""
    oh, ow = pair(a.output_size)
    h, w = x.shape[2], x.shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise ShapeError(
            f"adaptive_avg_pool2d needs a fixed height and width, got {x}",
            hint="give the input a fixed size (its windows become a fixed average pool in ONNX and TVM)",
        )
    bad = [(size, out) for size, out in ((h, oh), (w, ow)) if size % out]
    if bad:
        size, out = bad[0]
        fits = [d for d in range(1, size + 1) if size % d == 0]
        raise ShapeError(
            f"adaptive_avg_pool2d to {oh}x{ow} needs input sides that are multiples of it, "
            f"but {size} is not a multiple of {out} (input {x})",
            field="output_size",
            hint=f"ONNX has no adaptive pooling, so lbdlc lowers it to a fixed average pool: choose an "
                 f"output size that divides {size} ({', '.join(map(str, fits))}), or an input size that "
                 f"makes this feature map a multiple of {out}",
        )
    return h // oh, w // ow


@register
class AdaptiveAvgPool2d(Op):
    """Average-pool [N, C, H, W] to a fixed output_size grid (F.adaptive_avg_pool2d), where H and W are multiples of it.

    The windows are then kernel = stride = (H / out_h, W / out_w), which every backend
    computes as an ordinary average pool.
    """

    name = "adaptive_avg_pool2d"

    class Attrs(OpAttrs):
        output_size: Size2  # int for a square grid, or [h, w]

    def resolve(self, a, ins):
        expect_rank(ins[0], (4,), "adaptive_avg_pool2d")
        adaptive_window(a, ins[0])
        return a

    def infer(self, a, ins):
        n, c = ins[0].shape[:2]
        oh, ow = pair(a.output_size)
        return [TensorType((n, c, oh, ow), ins[0].dtype)]

    def flops(self, a, ins, outs):
        return numel(ins[0].shape)  # one addition per input element (and a scale per output)
