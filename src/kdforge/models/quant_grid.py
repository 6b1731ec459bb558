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
    q = round_half_away(x).clamp_(lo, hi)  # (rows, G, 32) integers
    return (q * d.unsqueeze(-1)).reshape(rows, cols)


def output_grid(base: str) -> str:
    """The grid of the output projection, and of a tied embedding (which is the output projection), in a
    ``base`` file as llama.cpp's ``llama-quantize`` lays it out.

    llama-quantize keeps ``output.weight`` (``token_embd.weight`` when the model has no separate output
    tensor) at more bits than the rest in every 4- and 5-bit type: Q6_K when the row length is a multiple of
    256, else Q8_0. kdforge writes Q8_0 in both cases (the ``gguf`` package cannot write Q6_K): the same
    type llama.cpp picks for SmolLM2 (576) and Qwen2.5-0.5B (896), 1.2 bits per weight more than Q6_K
    elsewhere. ``--pure`` (as in llama-quantize) writes every tensor in the base type.
    """
    return "q8_0" if base in ("q4_0", "q4_1", "q5_0", "q5_1") else base


def decompose(weight: torch.Tensor, grid: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp16 scales ``d`` (rows, cols/32) and integers ``q`` (rows, cols) int8 within ``grid``'s range with
    ``d·q == weight`` exactly (float32), for any scale per block, or None when some block has none.

    A block written with any fp16 scale (llama.cpp's reference, GPTQ's, or one learned by
    quantisation-aware training) is found again: its value of largest magnitude ``m`` is ``d·q_m`` for one
    integer q_m of the range; each candidate q_m, largest magnitude first (the reference choice, -8 or
    ±127, comes first), gives ``d = m / q_m``, kept where it is an fp16 number and every other value is an
    integer multiple of it within the range. Any decomposition found reproduces the block exactly.
    """
    rows, cols = weight.shape
    if cols % BLOCK:
        return None
    lo, hi = RANGES[grid]
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (N, 32)
    idx = blocks.abs().argmax(-1, keepdim=True)
    m = blocks.gather(-1, idx).squeeze(-1)  # (N,) signed value of largest magnitude
    d = torch.zeros(blocks.shape[0], dtype=torch.float16)
    q = torch.zeros(blocks.shape, dtype=torch.int8)
    todo = torch.nonzero(m != 0).squeeze(1)  # all-zero blocks: d = 0, q = 0
    candidates = sorted({c for c in range(lo, hi + 1) if c != 0}, key=lambda c: (-abs(c), c))
    for c in candidates:
        if todo.numel() == 0:
            break
        d16 = (m[todo] / c).half()  # (n,)
        df = d16.float()
        x = blocks[todo] / torch.where(df == 0, torch.ones_like(df), df)[:, None]  # (n, 32)
        qi = torch.round(x)
        ok = (df != 0) & torch.isfinite(df) & (qi >= lo).all(-1) & (qi <= hi).all(-1)
        ok &= (qi * df[:, None] == blocks[todo]).all(-1)
        done = todo[ok]
        d[done], q[done] = d16[ok], qi[ok].to(torch.int8)
        todo = todo[~ok]
    if todo.numel():
        return None
    return d.reshape(rows, cols // BLOCK), q.reshape(rows, cols)


def on_grid(weight: torch.Tensor, grid: str) -> bool:
    """True when every block of ``weight`` (rows, cols) is one of ``grid``'s blocks: for the GGUF types with
    any fp16 scale (`decompose`: the file stores the scale), for ``int4`` with the reference scale (the ONNX
    model builder derives the scale from the weights itself)."""
    if grid == "int4":
        return bool(torch.equal(fake_quantize(weight, grid), weight.float()))
    return decompose(weight, grid) is not None


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (llama.cpp's ``roundf``), as `fake_quantize` rounds."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def fake_quantize_scaled(weight: torch.Tensor, d: torch.Tensor, grid: str) -> torch.Tensor:
    """``weight`` (rows, cols) rounded on ``grid`` with the given per-block scales ``d`` (rows, cols/32),
    differentiable in both as LSQ (Esser et al., 2020) makes it: the rounding passes gradients straight
    through inside the range; a value clamped at an end gets none, and its scale the gradient of ``d·q``.

    ``d`` is rounded to fp16 first (straight through as well): the forward computes with exactly the
    values the file will store. Blocks whose scale is 0 stay zero.
    """
    rows, cols = weight.shape
    lo, hi = RANGES[grid]
    d16 = d + (d.half().float() - d).detach()  # (rows, G): the stored fp16 scale, gradient straight through
    zero = d16 == 0  # an all-zero block (a padding row) keeps scale 0; 1/0 must not reach the backward (NaN)
    inv = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, d16)).unsqueeze(-1)  # (rows, G, 1), as fake_quantize
    x = (weight.reshape(rows, -1, BLOCK) * inv).clamp(lo, hi)  # (rows, G, 32)
    q = x + (round_half_away(x) - x).detach()
    return (q * d16.unsqueeze(-1)).reshape(rows, cols)
