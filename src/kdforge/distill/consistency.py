"""Consistency under perturbed inputs: the student's predictions on an input and on a perturbed copy of it should
agree (the self-distillation seeds' second half; R-Drop / UDA-style consistency training).

The term is D(q(x) ‖ q(x̃)) at the target positions, per target token, with the clean prediction q(x) detached (it
is the target; the gradient moves the perturbed prediction towards it). Perturbations act on the hidden states
entering the first decoder layer, i.e. the input embedding's output (B, T, H):
    token_dropout  each token's vector is zeroed with probability p (the model must predict without it)
    hidden_noise   Gaussian noise of standard deviation sigma x that token's RMS is added (sigma is relative,
                   so one value means the same on models whose embeddings have different scales)
Every perturbation draws from its own generator seeded from (seed, step, micro-batch): reruns and resumed runs
perturb identically, and the global RNG (dropout, data order) is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

PERTURBATIONS = ("token_dropout", "hidden_noise")


def perturbation_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator for one micro-batch's perturbation."""
    digest = hashlib.blake2b(f"consistency/{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


def perturb(h: torch.Tensor, kind: str, p: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The perturbed copy of embedding outputs ``h`` (B, T, H); noise is drawn on CPU (reproducible everywhere)."""
    if kind == "token_dropout":
        keep = (torch.rand(h.shape[:-1], generator=generator) >= p).to(device=h.device, dtype=h.dtype)  # (B, T)
        return h * keep[..., None]
    if kind == "hidden_noise":
        noise = torch.randn(h.shape, generator=generator).to(device=h.device, dtype=h.dtype)  # (B, T, H)
        rms = h.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(h.dtype)  # (B, T, 1)
        return h + sigma * rms * noise
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}")


@contextlib.contextmanager
def perturbed_inputs(model, kind: str, p: float, sigma: float, generator: torch.Generator) -> Iterator[None]:
    """Within the block, ``model``'s input embedding returns perturbed vectors (a forward hook, removed after)."""
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _inputs, out: perturb(out, kind, p, sigma, generator))
    try:
        yield
    finally:
        handle.remove()
