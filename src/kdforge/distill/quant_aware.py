"""Quantisation-aware distillation: train the student with its weights on the grid the file will hold.

`kdforge distill --quant-aware q4_0|q8_0|int4` makes every 2-D weight the export will quantise (each
decoder Linear, the input embedding and an untied output head, rows a multiple of 32) compute with
``fake_quantize(w)`` (kdforge.models.quant_grid) instead of ``w``. The optimizer still holds the
full-precision ("latent") weights; the gradient passes the rounding as if it were the identity (the
straight-through estimator of Bengio et al., 2013, as in QAT for LLMs: LLM-QAT, EfficientQAT), so small
updates accumulate in ``w`` until a weight crosses to the next grid value.

At the end the latent weights are replaced by their grid values (`QuantAware.materialise`): the HF
folder written is the quantised model, and its config records which tensors are on which grid
(``kdforge_quant_aware``), so `kdforge export --quant q4_0` writes exactly those values (it re-checks
them bit for bit). A tied embedding is quantised once and serves as input table and output head, as
the GGUF file's ``token_embd`` does.

Which grid each weight trains on follows the file the export writes: in a Q4_0 file llama.cpp's layout
keeps the output projection (a tied embedding is it) at Q8_0 (`kdforge.models.quant_grid.output_grid`), so
QAT trains that weight on the Q8_0 grid; ``pure`` puts every weight on the base grid (``--pure``).

Scales: ``reference`` recomputes each block's scale from the latent weights as llama.cpp's reference
quantiser would (the largest magnitude lands on -8 / ±127). ``learned`` makes every block's fp16 scale a
parameter of its own (LSQ, Esser et al., 2020; the per-block scale tuning of PEQA), initialised to the
start's own scales (the reference choice for full-precision weights, the stored ones for a quantised file
read back): a GGUF block stores its scale, so any scale is written exactly,
and unlike the integers a scale moves continuously, so small steps change the model smoothly instead of
flipping weights across rounding boundaries. The scale is ``d0·exp(s)``: ``s`` (0 at the start) moves each
scale by a relative amount, whatever its size. Not for ``int4`` (the ONNX model builder derives its
scales from the weights again).

Implemented with torch.nn.utils.parametrize: the module's ``weight`` becomes a computed attribute, so
HF's forward, the trainer's chunked output projection and hooks see the grid values without knowing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from kdforge.models.quant_grid import (
    BLOCK,
    GRIDS,
    decompose,
    fake_quantize,
    fake_quantize_scaled,
    output_grid,
    reference_scales,
)

CONFIG_KEY = "kdforge_quant_aware"  # in the HF config.json: {"grid", "tensors", "kept", "grids", "scales"}
SCALES = ("reference", "learned")


class _StraightThrough(torch.autograd.Function):
    """Forward: the grid values of ``w``. Backward: the gradient unchanged (straight through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, grid: str) -> torch.Tensor:  # noqa: D102
        return fake_quantize(w.detach(), grid).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


class FakeQuantize(torch.nn.Module):
    """A parametrization: ``weight`` (out, in) -> its grid values, gradients straight through."""

    def __init__(self, grid: str):
        super().__init__()
        self.grid = grid

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.grid)


class LearnedScaleQuantize(torch.nn.Module):
    """A parametrization with a trainable scale per block: ``weight`` (out, in) -> ``d·q`` with
    ``d = d0·exp(log_scale)`` (fp16 in the forward) and ``q`` the latent weight rounded on that scale.
    A start on the grid is reproduced exactly (its values are ``d0·q`` with ``|q|`` in range)."""

    def __init__(self, grid: str, start: torch.Tensor):
        super().__init__()
        self.grid = grid
        # The start's own scales when it is on the grid already (a GGUF file read back: GPTQ's scales are not
        # always the reference choice of the rounded values), else the reference choice: training starts
        # from exactly the start model.
        found = decompose(start.detach().cpu(), grid)
        d0 = found[0] if found is not None else reference_scales(start.detach(), grid)
        self.register_buffer("d0", d0.float().to(start.device))  # (out, in/32)
        self.log_scale = torch.nn.Parameter(torch.zeros_like(self.d0))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = self.d0 * torch.exp(self.log_scale)  # (out, in/32)
        return fake_quantize_scaled(w, d, self.grid).to(w.dtype)


@dataclass
class QuantAware:
    """The student's weights put on a grid for training; `materialise` makes it permanent."""

    grid: str
    tensors: list[str]                  # state-dict names of the weights on the grid (a tied one once)
    modules: list[torch.nn.Module]      # every parametrized module (a tied weight's embedding and head)
    kept: list[str] = field(default_factory=list)  # 2-D weights left in full precision (asked, or not divisible)
    grids: dict[str, str] = field(default_factory=dict)  # tensor -> its grid where not ``grid`` (the output)
    scales: str = "reference"

    def scale_parameters(self) -> list[torch.nn.Parameter]:
        """The learned block scales (``scales="learned"``; a tied weight's once), for their own optimizer group."""
        seen: dict[int, torch.nn.Parameter] = {}
        for module in self.modules:
            for p in module.parametrizations["weight"].parameters():
                if p is not module.parametrizations["weight"].original:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def materialise(self) -> None:
        """Remove the parametrizations and write each weight's grid values into it, in place (a tied
        weight stays one tensor shared by embedding and head)."""
        latent: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        with torch.no_grad():
            for module in self.modules:
                p = module.parametrizations["weight"].original
                if id(p) not in latent:
                    latent[id(p)] = (p, module.weight.detach().clone())  # the grid values the forward used
        for module in self.modules:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            for p, values in latent.values():
                p.copy_(values)
        self.modules = []

    def record(self) -> dict:
        """What the HF config keeps (``kdforge_quant_aware``), read by the export."""
        return {"grid": self.grid, "tensors": self.tensors, "kept": self.kept, "grids": self.grids,
                "scales": self.scales}


def quant_aware(model, grid: str, keep: Sequence[str] = (), pure: bool = False,
                scales: str = "reference") -> QuantAware:
    """Put ``model``'s 2-D weights on ``grid`` for training (parametrized in place); returns the handle.

    ``keep``: regexes of weight names (state-dict names, e.g. ``embed_tokens``) left in full precision;
    weights whose rows are not a multiple of 32 are kept too (the export writes them f16). The output
    projection (or the tied embedding) trains on `output_grid` unless ``pure``. ``scales``: ``reference``
    or ``learned`` (module docstring). Call after the trainable parameters are chosen (parametrize renames
    parameters; requires_grad stays with them); the learned scales are `QuantAware.scale_parameters`.
    """
    if grid not in GRIDS:
        raise ValueError(f"quant_aware: no grid {grid!r}; grids: {', '.join(GRIDS)}")
    if scales not in SCALES:
        raise ValueError(f"quant_aware: no scales {scales!r}; one of {', '.join(SCALES)}")
    if scales == "learned" and grid == "int4":
        raise ValueError("quant_aware: learned scales are for the GGUF grids (q4_0, q8_0), whose files store each "
                         "scale; the ONNX int4 builder derives its scales from the weights again: use reference")
    head = model.get_output_embeddings()
    patterns = [re.compile(p) for p in keep]
    # Modules that share one weight (a tied embedding and head) form one group, named by its first module.
    groups: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.dim() == 2:
            groups.setdefault(id(module.weight), []).append((f"{name}.weight", module))
    tensors, modules, kept, grids = [], [], [], {}
    for group in groups.values():
        first, w = group[0][0], group[0][1].weight
        if any(p.search(n) for n, _ in group for p in patterns) or w.shape[1] % BLOCK:
            kept.append(first)
            continue
        tensors.append(first)
        own = grid if pure or not any(m is head for _, m in group) else output_grid(grid)
        if own != grid:
            grids[first] = own
        # One parametrization object per weight: a tied embedding and head share its learned scales.
        param = FakeQuantize(own) if scales == "reference" else LearnedScaleQuantize(own, w)
        for _, module in group:
            parametrize.register_parametrization(module, "weight", param, unsafe=True)
            modules.append(module)
    if not tensors:
        raise ValueError("quant_aware: no weight is left to quantise (every 2-D weight is kept or has rows that "
                         f"are not a multiple of {BLOCK})")
    return QuantAware(grid, tensors, modules, kept, grids, scales)
