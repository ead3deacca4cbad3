"""Weight-only block quantization formats (BOOK.md §4): llama.cpp's Q8_0, Q4_0 and Q4_1.

A weight matrix [rows, cols] is cut along each row into blocks of 32 weights (cols must be a
multiple of 32). Each block is stored as raw little-endian bytes, exactly as llama.cpp lays
it out, so `pack` returns uint8 [rows, cols // 32, bytes_per_block]:

- Q8_0 (34 bytes): fp16 scale d, then 32 int8 codes q; x̄ = d·q.
- Q4_0 (18 bytes): fp16 scale d, then 16 bytes of 4-bit codes q ∈ {0..15}; x̄ = d·(q − 8).
- Q4_1 (20 bytes): fp16 scale d, fp16 minimum m, then 16 bytes of codes; x̄ = d·q + m.

In the 4-bit formats byte j of the codes holds weight j in its low nibble and weight j + 16
in its high nibble (llama.cpp's order). Codes are computed from the fp32 scale and the
stored fp16 scale is what dequantization uses, as in llama.cpp (`quantize_row_q4_1_ref`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    block_bytes: int
    has_min: bool  # Q4_1 stores a minimum m per block

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK


FORMATS = {
    "q8_0": Format("q8_0", 8, 2 + BLOCK, False),
    "q4_0": Format("q4_0", 4, 2 + BLOCK // 2, False),
    "q4_1": Format("q4_1", 4, 4 + BLOCK // 2, True),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown block format '{name}' (known: {', '.join(FORMATS)})") from None


def _blocks(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"block quantization takes a 2-D weight, got shape {list(w.shape)}")
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"the row length {cols} is not a multiple of the block size {BLOCK}")
    return w.reshape(rows, cols // BLOCK, BLOCK)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[..., ] float -> [..., 2] uint8, little-endian fp16."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(x.shape + (2,))


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes 0..15 -> [..., 16] bytes: low nibble weight j, high nibble weight j + 16."""
    q = q.astype(np.uint8)
    return q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)


def pack(w: np.ndarray, fmt: str) -> np.ndarray:
    """Quantize a [rows, cols] fp32 matrix to uint8 [rows, cols // 32, block_bytes]."""
    f = get_format(fmt)
    x = _blocks(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        if f.name == "q8_0":
            amax = np.abs(x).max(-1)
            d = amax / 127.0
            inv = np.where(d > 0, 1.0 / d, 0.0)
            q = np.rint(x * inv[..., None]).clip(-128, 127).astype(np.int8)
            body = q.view(np.uint8)
            head = _f16_bytes(d)
        elif f.name == "q4_0":
            # d = max / -8 where max is the signed value of largest magnitude (llama.cpp)
            idx = np.abs(x).argmax(-1)
            mx = np.take_along_axis(x, idx[..., None], -1)[..., 0]
            d = mx / -8.0
            inv = np.where(d != 0, 1.0 / d, 0.0)
            q = np.minimum(15, np.trunc(x * inv[..., None] + 8.5)).astype(np.int64)
            body = _nibbles(q)
            head = _f16_bytes(d)
        else:  # q4_1
            lo, hi = x.min(-1), x.max(-1)
            d = (hi - lo) / 15.0
            inv = np.where(d > 0, 1.0 / d, 0.0)
            q = np.minimum(15, np.trunc((x - lo[..., None]) * inv[..., None] + 0.5)).astype(np.int64)
            body = _nibbles(q)
            head = np.concatenate([_f16_bytes(d), _f16_bytes(lo)], -1)
    out = np.concatenate([head, body], -1)
    assert out.shape[-1] == f.block_bytes
    return np.ascontiguousarray(out, dtype=np.uint8)


def codes(packed: np.ndarray, fmt: str) -> np.ndarray:
    """The integer codes q of each block: int8 [-128, 127] for Q8_0, 0..15 for the 4-bit formats."""
    f = get_format(fmt)
    body = packed[..., 4 if f.has_min else 2:]
    if f.bits == 8:
        return np.ascontiguousarray(body).view(np.int8).astype(np.int64)
    return np.concatenate([body & 0x0F, body >> 4], -1).astype(np.int64)


def scales(packed: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(d, m) per block as fp16 arrays [rows, n_blocks]; m is None for formats without a minimum."""
    f = get_format(fmt)
    d = np.ascontiguousarray(packed[..., 0:2]).view("<f2")[..., 0]
    m = np.ascontiguousarray(packed[..., 2:4]).view("<f2")[..., 0] if f.has_min else None
    return d, m


def unpack(packed: np.ndarray, fmt: str) -> np.ndarray:
    """Dequantize uint8 [rows, n_blocks, block_bytes] back to fp32 [rows, n_blocks * 32]."""
    f = get_format(fmt)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 3 or packed.shape[-1] != f.block_bytes:
        raise ValueError(f"{fmt} expects packed blocks [rows, n_blocks, {f.block_bytes}], got {list(packed.shape)}")
    q = codes(packed, fmt).astype(np.float32)
    d, m = scales(packed, fmt)
    d = d.astype(np.float32)[..., None]
    if f.name == "q4_0":
        x = d * (q - 8.0)
    elif f.has_min:
        x = d * q + m.astype(np.float32)[..., None]
    else:
        x = d * q
    return x.reshape(packed.shape[0], -1)


def packed_bytes(rows: int, cols: int, fmt: str) -> int:
    """Bytes of a [rows, cols] matrix stored in `fmt`."""
    return rows * (cols // BLOCK) * get_format(fmt).block_bytes
