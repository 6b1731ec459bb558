"""The one next-token sampler of every runtime: greedy at temperature 0, else temperature + nucleus (top-p).

Every backend (transformers, llama.cpp) and every caller (the serve engines, eval's task set and
stability probe) picks tokens with :func:`sample_token`, so a seed and a set of parameters mean the
same everywhere. Every sequence owns a ``torch.Generator`` seeded from its ``seed`` (or from the OS
when none is given), so a seeded sequence draws the same tokens whether it runs alone or shares
decode steps with others: sampling never touches the global RNG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# Below ~1e-4 the scaled logits overflow fp32 and softmax turns to NaN; the limit is greedy anyway.
GREEDY_BELOW = 1e-4


@dataclass
class SamplingParams:
    """What one request asks for; the API layer has validated the ranges already."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-turn (benchmarks want fixed-length answers)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        self.stop = [s for s in self.stop if s]  # an empty stop string would end every answer at once

    @property
    def greedy(self) -> bool:
        """True when :func:`sample_token` takes the argmax (no random draw)."""
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence; sampling runs on CPU logits (one (V,) row per token)."""
    g = torch.Generator(device="cpu")
    # manual_seed takes a 64-bit value; wrap arbitrary JSON integers into that range.
    g.manual_seed((seed if seed is not None else int.from_bytes(os.urandom(8), "little")) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` of shape (V,) (fp32, CPU)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)  # (V,)
    if not torch.isfinite(probs).all():  # a model that emits inf/NaN logits: fall back to greedy
        return int(torch.argmax(torch.nan_to_num(logits, nan=-float("inf"))))
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (V,), (V,)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass *before* it
        # is still below top_p, so the most likely token always stays.
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        keep[0] = True  # also when top_p is below fp32's smallest number (it rounds to 0)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalises
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
