"""Calibrated rounding into GGUF's Q8_0 and Q4_0 blocks (GPTQ), instead of rounding each weight to nearest.

Round-to-nearest makes every weight's error as small as it can be on its own; what matters is the
error of the layer's *output*, ``X (W - Q)^T`` on real inputs ``X``. GPTQ (Frantar et al., 2022)
quantises a Linear weight one input column at a time and, after each column, spreads that column's
rounding error over the columns not yet quantised, weighted by the inverse of the input's second
moment ``H = Σ x xᵀ`` (collected on calibration text). Columns are taken in order of decreasing
``H_ii`` ("act order"): the inputs with the largest activations are settled first while the most
columns remain to absorb their error.

The file format is untouched: a Q8_0 block is still 32 weights sharing one fp16 scale ``d`` with
values ``d·q``, q an int8 in [-127, 127] (Q4_0: q in [-8, 7]); llama.cpp and transformers read it as
any other. The scales are fixed up front from the original weights, as llama.cpp's reference
quantiser chooses them (Q8_0: amax/127; Q4_0: the signed value of largest magnitude / -8), so that
act order can visit the columns of a block in any order; only the integers change. One exception,
for Q8_0: a block whose values already lie on a coarser grid (a source model that was itself
quantised) gets the scale that fits that grid (`fit_source_grid`), for rounding to nearest and GPTQ alike.

Measured on the embedded teacher (66 validation prompts' answers, fake quantisation of the Linear
weights): Q8_0 KL to the source 0.00143 -> 0.00055 nats/token, Q4_0 0.309 -> 0.127 (docs/export-and-quantize.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdforge.models.quant_grid import BLOCK, RANGES, reference_scales

CALIBRATED_TYPES = ("q8_0", "q4_0")
_RANGE = {t: RANGES[t] for t in CALIBRATED_TYPES}


@dataclass
class Rounded:
    """A weight in block form: ``q`` (rows, cols) small integers, ``d`` (rows, cols/32) fp16 scales; the
    weight the file holds is ``q * d`` repeated over each block."""

    q: torch.Tensor  # (rows, cols) int8
    d: torch.Tensor  # (rows, cols // 32) float16

    def dequantize(self) -> torch.Tensor:
        """(rows, cols) float32: what a reader of the file computes with."""
        scales = self.d.float().repeat_interleave(BLOCK, dim=1)  # (rows, cols)
        return self.q.float() * scales

    def permute_rows(self, order: np.ndarray) -> Rounded:
        return Rounded(self.q[torch.from_numpy(order)], self.d[torch.from_numpy(order)])


def block_scales(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """(rows, cols/32) fp16 scales for ``weight`` (rows, cols): llama.cpp's reference choice, except that
    a Q8_0 block whose values lie on a coarser grid gets the scale that fits that grid (`fit_source_grid`)."""
    reference = reference_scales(weight, qtype)
    if qtype != "q8_0":
        return reference
    return fit_source_grid(weight, reference, *_RANGE[qtype])


def fit_source_grid(weight: torch.Tensor, reference: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per block, the fp16 scale with the least squared rounding error among ``reference`` (rows, G) and
    the divisors ``g/k`` of the block's smallest gap ``g`` between distinct values that keep every
    integer within [lo, hi]; returns (rows, G) fp16.

    Why: a model that was itself distributed quantised (a Q4_1/Q4_K GGUF, a GPTQ/AWQ checkpoint) has
    at most 16 distinct values per block, evenly spaced ``m + g·j``. ``amax/127`` ignores that grid, and
    every weight moves by up to half a step; a step of ``g/k`` lands all of them on integers but for
    one shared offset, which the search makes small. On the embedded teacher (a Q4_1 GGUF) this cuts
    Q8_0's squared weight error to 0.17x and lifts top-1 agreement from 97.97% to 99.13% on its 66
    validation answers (docs/export-and-quantize.md). Trained weights have 32 distinct values close
    together: almost no block has a candidate, and a candidate is only taken where it rounds better.
    """
    n = _chunk_rows(weight)  # ~16 M weights at a time (big embeddings)
    return torch.cat([_fit_rows(weight[i:i + n], reference[i:i + n], lo, hi) for i in range(0, weight.shape[0], n)])


def _fit_rows(weight: torch.Tensor, reference: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    best = reference.clone().reshape(-1)  # (rows·G,) fp16
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (N, 32), N = rows·G
    amax = blocks.abs().amax(-1)  # (N,)
    ordered = torch.sort(blocks, dim=-1).values
    gaps = ordered[:, 1:] - ordered[:, :-1]  # (N, 31)
    gap = torch.where(gaps > 0, gaps, torch.full_like(gaps, float("inf"))).amin(-1)  # (N,)
    # The finest step g/k that still keeps amax within the range: k <= g·hi/amax (gap <= 2·amax, so k <= 2·hi).
    k_max = torch.floor(gap * hi / amax.clamp_min(1e-30))
    k_max = torch.where(torch.isfinite(gap) & (amax > 0), k_max, torch.zeros_like(k_max))
    idx = torch.nonzero(k_max >= 1).squeeze(1)  # the only blocks with a candidate (~0.5% of trained weights)
    if idx.numel() == 0:
        return best.reshape(reference.shape)
    # Blocks by decreasing k_max: the blocks still trying step g/k are a prefix that shrinks as k grows
    # (one two-valued block may reach k = 254; the rest of a Q4_1 source stops near 16).
    idx = idx[torch.argsort(k_max[idx], descending=True)]
    blocks, gap, k_max = blocks[idx], gap[idx], k_max[idx]
    best_d = best[idx].float()
    best_err = _block_error(blocks, best_d, lo, hi)
    for k in range(1, int(k_max[0].item()) + 1):
        n = int((k_max >= k).sum())
        candidate = (gap[:n] / k).half().float()
        err = _block_error(blocks[:n], torch.where(candidate > 0, candidate, best_d[:n]), lo, hi)
        # Ties go to the finer step: on an exact fit it leaves GPTQ the most room to spread errors.
        better = (candidate > 0) & ((err < best_err[:n]) | ((err == best_err[:n]) & (candidate < best_d[:n])))
        best_err[:n] = torch.where(better, err, best_err[:n])
        best_d[:n] = torch.where(better, candidate, best_d[:n])
    best[idx] = best_d.half()
    return best.reshape(reference.shape)


def _block_error(blocks: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(N,) squared error of rounding ``blocks`` (N, 32) to nearest with scales ``d`` (N,)."""
    q = _round(blocks, d[..., None], lo, hi)
    return ((blocks - q * d[..., None]) ** 2).sum(-1)


def _round(w: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Nearest integer multiple of ``d`` (0 where the block is all zeros), clamped to the type's range."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(w), torch.round(w / safe)).clamp(lo, hi)


def round_to_nearest(weight: torch.Tensor, qtype: str) -> Rounded:
    """The uncalibrated baseline, with the same scales as `gptq_round`."""
    d = block_scales(weight, qtype)
    q = torch.empty(weight.shape, dtype=torch.int8)
    # Rows in chunks of ~16 M weights: a float64 copy of a whole 150k-row embedding would need gigabytes.
    n = _chunk_rows(weight)
    for i in range(0, weight.shape[0], n):
        rows = slice(i, i + n)
        w = weight[rows].double().reshape(-1, d.shape[1], BLOCK)  # (chunk, G, 32)
        q[rows] = _round(w, d[rows].double()[..., None], *_RANGE[qtype]).to(torch.int8).reshape(-1, weight.shape[1])
    return Rounded(q, d)


def _chunk_rows(weight: torch.Tensor) -> int:
    return max(1, (1 << 24) // weight.shape[1])


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, qtype: str, damp: float = 0.01,
               block_cols: int = 128) -> Rounded:
    """GPTQ with act order and fixed block scales: ``weight`` (rows, cols), ``hessian`` (cols, cols) = Σ x xᵀ.

    ``damp`` adds that fraction of the mean diagonal to H (keeps the Cholesky factorisation stable
    when some inputs are nearly collinear); ``block_cols`` columns are updated lazily together (speed
    only, the result is the same).
    """
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"rows of {cols} values do not divide into blocks of {BLOCK}")
    lo, hi = _RANGE[qtype]
    d = block_scales(weight, qtype)  # (rows, G) fixed before any error is spread
    W = weight.detach().to(torch.float64).clone()  # (rows, cols), float64: the error feedback accumulates
    H = hessian.detach().to(torch.float64).clone()
    # Inputs that were always zero in the calibration text: rounded to nearest (no correlations to spread
    # their error over). Not zeroed, as GPTQ's reference does: other text may use them.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    order = torch.argsort(torch.diag(H), descending=True)  # act order
    inverse = torch.argsort(order)
    W, H = W[:, order], H[order][:, order]
    scales = d.double().repeat_interleave(BLOCK, dim=1)[:, order]  # (rows, cols) the scale of each column
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    # Upper Cholesky factor of H^-1: row i holds how column i's error is spread over columns > i.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for start in range(0, cols, block_cols):
        end = min(start + block_cols, cols)
        Wb = W[:, start:end]  # a view: updates land in W
        err = torch.zeros_like(Wb)  # (rows, end - start) scaled errors, for the lazy update of the rest
        Ub = U[start:end, start:end]
        for i in range(end - start):
            col = Wb[:, i]
            q = _round(col, scales[:, start + i], lo, hi)
            Q[:, start + i] = q
            e = (col - q * scales[:, start + i]) / Ub[i, i]
            Wb[:, i:] -= e[:, None] * Ub[i, i:][None, :]
            err[:, i] = e
        W[:, end:] -= err @ U[start:end, end:]
    return Rounded(Q[:, inverse].to(torch.int8), d)


def pack(rounded: Rounded, qtype: str) -> np.ndarray:
    """GGUF bytes, (rows, blocks_per_row * block_bytes) uint8, as `gguf.quants.quantize` lays them out."""
    rows, cols = rounded.q.shape
    q = rounded.q.numpy().reshape(rows, cols // BLOCK, BLOCK)  # (rows, G, 32)
    d = rounded.d.numpy().reshape(rows, cols // BLOCK, 1).view(np.uint8)  # (rows, G, 2) little-endian fp16
    if qtype == "q8_0":
        body = q.view(np.uint8)  # (rows, G, 32)
    elif qtype == "q4_0":
        u = (q + 8).astype(np.uint8)  # [0, 15]
        body = u[..., :16] | (u[..., 16:] << np.uint8(4))  # (rows, G, 16): value j low nibble, j + 16 high
    else:
        raise ValueError(f"cannot pack {qtype}")
    return np.concatenate([d, body], axis=-1).reshape(rows, -1)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the modules of interest have seen their inputs."""


def collect_hessians(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str],
                     max_bytes: int = 2 << 30) -> dict[str, torch.Tensor]:
    """``H = Σ x xᵀ`` over the real (unpadded) tokens of ``batches`` for each Linear in ``names``.

    ``batches`` yields (input_ids (B, T), attention_mask (B, T)); it is iterated once per pass. Linears
    that read the very same input tensor (q/k/v, gate/up) share one matrix. When all matrices would
    exceed ``max_bytes``, the modules are split into groups, one forward pass each, and a pass ends as
    soon as all of its modules have seen their input.
    """
    modules = dict(model.named_modules())
    sizes = {n: modules[n].in_features ** 2 * 4 for n in names}
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        if groups[-1] and used + sizes[n] > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += sizes[n]
    batches = list(batches)
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        out |= _collect_group(model, batches, group, modules)
    return out


@torch.inference_mode()
def _collect_group(model, batches, group: list[str], modules) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # module -> module whose matrix it shares
    mask_now: list[torch.Tensor] = []
    last: list = [None, None]  # (input tensor, reader) of the previous hooked call, kept alive for `is`
    pending: set[str] = set()  # modules of the group that have not run yet in this forward

    def hook(name):
        def f(_module, args):
            pending.discard(name)
            x = args[0]  # (B, T, in)
            if x is last[0]:  # q/k/v (gate/up) are called one after another on the same tensor
                alias[name] = last[1]
            else:
                last[:] = [x, name]
                rows = x[mask_now[0]].float()  # (N, in) real tokens only
                if name not in sums:
                    sums[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
                sums[name].addmm_(rows.T, rows)  # (in, in)
            if not pending:
                raise _Stop  # every module has its input: the rest of the forward is not needed
        return f

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in group]
    device = next(model.parameters()).device
    try:
        for ids, attn in batches:
            last[:] = [None, None]
            pending.update(group)
            mask_now[:] = [attn.bool().to(device)]
            try:
                model(input_ids=ids.to(device), attention_mask=attn.to(device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        last[:] = [None, None]
    return {n: sums[alias.get(n, n)] for n in group if alias.get(n, n) in sums}
