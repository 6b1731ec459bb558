"""Distillation losses as pure functions over target positions only.

Every function takes logits already gathered at the N target positions, shape (N, V), and returns
a per-position value of shape (N,), computed in fp32. The trainer sums them and divides by the
number of target tokens of the whole accumulated batch, so every token weighs the same however the
batch is split. Temperature T divides both teacher and student logits; the soft term is then
multiplied by T^2 (Hinton et al.) so its gradient scale does not shrink as T grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the data's next token. (N, V), (N,) -> (N,)"""
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature T, per position. (N, V), (N, V) -> (N,)"""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    return (t.exp() * (t - s)).sum(-1)


def kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Summed (not averaged) terms of alpha*CE + (1-alpha)*T^2*KL over N positions.

    Returns ``{"loss", "ce", "kl"}`` as scalar sums; divide by the accumulated target count.
    """
    ce = hard_ce(student_logits, labels).sum()
    kl = forward_kl(student_logits, teacher_logits, temperature).sum()
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}
