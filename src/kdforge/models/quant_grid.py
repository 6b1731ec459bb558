"""The block grids of 4- and 8-bit weight formats: which values a quantised weight can take.

A grid is blocks of 32 consecutive weights along a row (a Linear weight's input dimension) sharing
one fp16 scale ``d``; a weight is ``d·q`` with q a small integer:

- ``q8_0`` (GGUF Q8_0): q in [-127, 127], ``d = amax / 127``;
- ``q4_0`` (GGUF Q4_0): q in [-8, 7], ``d`` = the block's signed value of largest magnitude / -8, so that
  value lands on -8 exactly (the one end of the range that always fits);
- ``int4``: symmetric 4-bit groups of 32 for the ONNX and compressed-tensors exports, on the same
  grid as Q4_0 (q in [-8, 7], zero point 8, the same scale rule).

The scales are llama.cpp's reference choice. Both the export's calibrated rounding
(`kdforge.export.gptq`) and quantisation-aware training (`kdforge.distill.quant_aware`) use them, so a
weight trained on the grid is written back exactly: re-quantising ``fake_quantize(w)`` gives the same
scale (the largest-magnitude value is ``-8·d`` or ``±127·d`` exactly) and the same integers.
"""

from __future__ import annotations

import torch

BLOCK = 32  # weights per scale
GRIDS = ("q4_0", "q8_0", "int4")
RANGES = {"q8_0": (-127, 127), "q4_0": (-8, 7), "int4": (-8, 7)}


def reference_scales(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """(rows, cols/32) fp16 scales as llama.cpp's reference quantiser picks them for ``weight`` (rows, cols)."""
    blocks = weight.float().reshape(weight.shape[0], -1, BLOCK)  # (rows, G, 32)
    if qtype == "q8_0":
        d = blocks.abs().amax(-1) / 127
    elif qtype in ("q4_0", "int4"):
        # The signed value of largest magnitude maps to -8, the one end of [-8, 7] that always fits.
        idx = blocks.abs().argmax(-1, keepdim=True)
        d = blocks.gather(-1, idx).squeeze(-1) / -8
    else:
        raise ValueError(f"no block grid {qtype!r}; grids: {', '.join(GRIDS)}")
    return d.half()


def fake_quantize(weight: torch.Tensor, grid: str) -> torch.Tensor:
    """``weight`` (rows, cols) rounded to nearest on ``grid``: float32 values ``d·q`` (rows, cols).

    Exactly what a reader of the file computes with (the fp16 scale times the integer, in float32):
    ``d·q`` is a product of an 11-bit mantissa and an integer below 2^8, so float32 holds it exactly.
    Ties round half away from zero, as llama.cpp's ``roundf`` does for Q8_0; Q4_0's reference adds 8.5
    and truncates (half up) — the two differ only on exact ties, which re-quantising a value that is
    already on the grid never meets.
    """
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"rows of {cols} values are not a multiple of the block size {BLOCK}")
    lo, hi = RANGES[grid]
    d = reference_scales(weight, grid).float()  # (rows, G)
    blocks = weight.float().reshape(rows, -1, BLOCK)  # (rows, G, 32)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d)).unsqueeze(-1)  # an all-zero block stays zero
    x = blocks * inv
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp_(lo, hi)  # (rows, G, 32) integers
    return (q * d.unsqueeze(-1)).reshape(rows, cols)


def on_grid(weight: torch.Tensor, grid: str) -> bool:
    """True when every block of ``weight`` (rows, cols) is already one of ``grid``'s blocks."""
    return bool(torch.equal(fake_quantize(weight, grid), weight.float()))
