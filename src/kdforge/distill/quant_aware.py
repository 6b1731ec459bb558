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

Implemented with torch.nn.utils.parametrize: the module's ``weight`` becomes a computed attribute, so
HF's forward, the trainer's chunked output projection and hooks see the grid values without knowing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from kdforge.models.quant_grid import BLOCK, GRIDS, fake_quantize

CONFIG_KEY = "kdforge_quant_aware"  # in the HF config.json: {"grid", "tensors", "kept"}


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


@dataclass
class QuantAware:
    """The student's weights put on a grid for training; `materialise` makes it permanent."""

    grid: str
    tensors: list[str]                  # state-dict names of the weights on the grid (a tied one once)
    modules: list[torch.nn.Module]      # every parametrized module (a tied weight's embedding and head)
    kept: list[str] = field(default_factory=list)  # 2-D weights left in full precision (asked, or not divisible)

    def materialise(self) -> None:
        """Remove the parametrizations and write each weight's grid values into it, in place (a tied
        weight stays one tensor shared by embedding and head)."""
        latent: dict[int, torch.nn.Parameter] = {}
        for module in self.modules:
            p = module.parametrizations["weight"].original
            latent[id(p)] = p
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            for p in latent.values():
                p.copy_(fake_quantize(p, self.grid).to(p.dtype))
        self.modules = []

    def record(self) -> dict:
        """What the HF config keeps (``kdforge_quant_aware``), read by the export."""
        return {"grid": self.grid, "tensors": self.tensors, "kept": self.kept}


def quant_aware(model, grid: str, keep: Sequence[str] = ()) -> QuantAware:
    """Put ``model``'s 2-D weights on ``grid`` for training (parametrized in place); returns the handle.

    ``keep``: regexes of weight names (state-dict names, e.g. ``embed_tokens``) left in full precision;
    weights whose rows are not a multiple of 32 are kept too (the export writes them f16). Call after the
    trainable parameters are chosen (parametrize renames parameters; requires_grad stays with them).
    """
    if grid not in GRIDS:
        raise ValueError(f"quant_aware: no grid {grid!r}; grids: {', '.join(GRIDS)}")
    patterns = [re.compile(p) for p in keep]
    # Modules that share one weight (a tied embedding and head) form one group, named by its first module.
    groups: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.dim() == 2:
            groups.setdefault(id(module.weight), []).append((f"{name}.weight", module))
    tensors, modules, kept = [], [], []
    for group in groups.values():
        first, w = group[0][0], group[0][1].weight
        if any(p.search(n) for n, _ in group for p in patterns) or w.shape[1] % BLOCK:
            kept.append(first)
            continue
        tensors.append(first)
        for _, module in group:
            parametrize.register_parametrization(module, "weight", FakeQuantize(grid), unsafe=True)
            modules.append(module)
    if not tensors:
        raise ValueError("quant_aware: no weight is left to quantise (every 2-D weight is kept or has rows that "
                         f"are not a multiple of {BLOCK})")
    return QuantAware(grid, tensors, modules, kept)
