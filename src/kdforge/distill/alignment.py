"""Hidden-state and attention-map alignment between mapped student and teacher layers.

Only the mapped layers' outputs are kept: forward hooks on those decoder layers (and, for
attention, their self-attention modules) store what the losses need, nothing else.

Positions: every real (non-padding) token, prompt included; the sums are divided by the number of
real tokens of the whole accumulated step.

Attention heads when counts differ: if the teacher's head count is a multiple of the student's,
each student head is compared with the mean of its group of consecutive teacher heads (the grouping
GQA uses); otherwise both sides are averaged over all heads first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def default_layer_map(num_student: int, num_teacher: int) -> dict[int, int]:
    """Student layer i -> teacher layer at the same relative depth (last maps to last)."""
    return {i: round((i + 1) * num_teacher / num_student) - 1 for i in range(num_student)}


def hidden_loss_sum(s: Tensor, t: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Sum over real tokens of a per-token hidden-state distance. (B, T, H), (B, T, H), (B, T) -> ()"""
    s, t = s.float()[mask], t.float()[mask]  # (N, H)
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)
    elif kind == "nmse":
        per = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)
    elif kind == "cosine":
        per = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    else:
        raise ValueError(f"unknown hidden loss {kind!r}")
    return per.sum()


def match_heads(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Bring (B, hs, T, T) and (B, ht, T, T) to the same head count (see the module docstring)."""
    hs, ht = s.shape[1], t.shape[1]
    if hs == ht:
        return s, t
    if ht % hs == 0:
        b, _, q, k = t.shape
        return s, t.reshape(b, hs, ht // hs, q, k).mean(2)
    return s.mean(1, keepdim=True), t.mean(1, keepdim=True)


def attention_loss_sum(s: Tensor, t: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Sum over real query tokens of the head-averaged distance between attention rows."""
    s, t = match_heads(s.float(), t.float())  # (B, h, T, T)
    if kind == "kl":
        per = (t * (torch.log(t.clamp_min(1e-12)) - torch.log(s.clamp_min(1e-12)))).sum(-1)  # (B, h, T)
    elif kind == "mse":
        per = (s - t).pow(2).sum(-1)
    else:
        raise ValueError(f"unknown attention loss {kind!r}")
    return per.mean(1)[mask].sum()
