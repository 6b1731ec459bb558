"""Distillation losses as pure functions over target positions only.

Every divergence takes logits already gathered at the N target positions, shape (N, V), and
returns a per-position value of shape (N,), computed in fp32. The trainer sums them and divides by
the number of target tokens of the whole accumulated batch, so every token weighs the same however
the batch is split.

Temperature T divides both teacher and student logits before the softmax. The soft term of the
objective is multiplied by T² (Hinton et al., 2015): the gradient of a softened divergence shrinks
like 1/T², and the factor keeps its scale comparable to the hard-label CE as T changes.

With p = softmax(teacher / T) and q = softmax(student / T):
    forward_kl       KL(p ‖ q) = Σ p (log p − log q)                  mode-covering (the classic KD loss)
    reverse_kl       KL(q ‖ p) = Σ q (log q − log p)                  mode-seeking (MiniLLM)
    jsd (β)          β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q  (the scale TRL's GKD and Liger use);
                     β = 0 and β = 1 are defined as forward and reverse KL (the limits of JSD/β and
                     JSD/(1−β)), as in GKD, since the unnormalised form vanishes at both ends
    skew_kl (α)      KL(p ‖ α·p + (1−α)·q)                            DistiLLM's skew KL
    skew_reverse_kl  KL(q ‖ (1−α)·p + α·q)                            DistiLLM's skew reverse KL
    tv               ½ Σ |p − q|                                      total variation
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The student's mass outside the teacher's top-k is floored where the cache floors the teacher's.
from kdforge.softlabels.format import LOG_TAIL_FLOOR

Tensor = torch.Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")


@dataclass
class SparseSignal:
    """The teacher's signal from the soft-label cache at N target positions (dense logits are a plain Tensor)."""

    ids: Tensor            # (N, k) token ids, most likely first
    logprobs: Tensor       # (N, k) log-probabilities at the capture temperature
    tail_logmass: Tensor   # (N,) log of the mass outside the top-k
    capture_temperature: float = 1.0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def top1(self) -> Tensor:
        """The most likely token the student has (ABSENT where none of the top-k is)."""
        present = self.ids >= 0
        if bool(present.all()):
            return self.ids[:, 0]
        return self.ids.gather(1, present.int().argmax(1, keepdim=True))[:, 0]

    def rows(self, sl: slice) -> SparseSignal:
        return SparseSignal(self.ids[sl], self.logprobs[sl], self.tail_logmass[sl], self.capture_temperature)


TeacherSignal = Tensor | SparseSignal

# A top-k slot whose token the student does not have (a trimmed vocabulary: kdforge.models.vocab_trim): its id
# is ABSENT and its log-prob ABSENT_LOGP (exp() is exactly 0), so it is no bin; the other bins renormalise.
ABSENT = -1
ABSENT_LOGP = -1e4


def _present(ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """(ids safe to gather with, (N, k) mask of present slots or None when every slot is present)."""
    present = ids >= 0
    if bool(present.all()):
        return ids, None
    return ids.clamp(min=0), present


def _in_bins(shape, ids: Tensor, present: Tensor, device) -> Tensor:
    """(N, V) True at the ids of present slots (a scatter of counts: several slots may share a clamped id)."""
    return torch.zeros(shape, device=device).scatter_add_(-1, ids, present.float()) > 0


def hard_ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with the data's next token. (N, V), (N,) -> (N,)"""
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


def _kl_logp(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) from log-probabilities, per row. (N, V) -> (N,). 0·log 0 counts as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b), computed stably in log space."""
    if w <= 0:
        return log_b
    if w >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log(1 - w))


def forward_kl_logp(s: Tensor, t: Tensor) -> Tensor:
    return _kl_logp(t, s)


def reverse_kl_logp(s: Tensor, t: Tensor) -> Tensor:
    return _kl_logp(s, t)


def jsd_logp(s: Tensor, t: Tensor, beta: float = 0.5) -> Tensor:
    if beta <= 0:
        return _kl_logp(t, s)
    if beta >= 1:
        return _kl_logp(s, t)
    m = _log_mix(t, s, beta)
    return beta * _kl_logp(t, m) + (1 - beta) * _kl_logp(s, m)


def skew_kl_logp(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
    return _kl_logp(t, _log_mix(t, s, skew))


def skew_reverse_kl_logp(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
    return _kl_logp(s, _log_mix(s, t, skew))


def tv_logp(s: Tensor, t: Tensor) -> Tensor:
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def divergence_fn(kind: str, beta: float = 0.5, skew: float = 0.1) -> Callable[[Tensor, Tensor], Tensor]:
    """The divergence ``kind`` as a function of (student log-probs, teacher log-probs) -> (N,)."""
    table: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "forward_kl": forward_kl_logp,
        "reverse_kl": reverse_kl_logp,
        "jsd": lambda s, t: jsd_logp(s, t, beta),
        "skew_kl": lambda s, t: skew_kl_logp(s, t, skew),
        "skew_reverse_kl": lambda s, t: skew_reverse_kl_logp(s, t, skew),
        "tv": tv_logp,
    }
    if kind not in table:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    return table[kind]


class _ForwardKLFromLogits(torch.autograd.Function):
    """KL(softmax(t/T) ‖ softmax(s/T)) per row with a hand-written backward: d/ds = (softmax(s/T) − p)/T.

    Autograd through log_softmax, the subtraction, the product and the mask keeps ~5 (N, V) buffers
    and makes as many passes over them; this keeps two (the student's log-probs and the teacher's
    probabilities) and computes the gradient in place. (N, V), (N, V) -> (N,)
    """

    @staticmethod
    def forward(ctx, s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
        s, t = s_logits.float(), t_logits.float()
        if temperature != 1:  # a division is a full (N, V) pass each
            s, t = s / temperature, t / temperature
        s_logp = F.log_softmax(s, dim=-1)  # (N, V)
        t_logp = F.log_softmax(t, dim=-1)  # (N, V)
        p = t_logp.exp()
        kl = torch.where(p > 0, p * (t_logp - s_logp), torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
        ctx.save_for_backward(s_logp, p)
        ctx.temperature, ctx.dtype = temperature, s_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s_logp, p = ctx.saved_tensors
        grad = s_logp.exp().sub_(p).mul_(grad_out[:, None] / ctx.temperature)  # (N, V)
        return grad.to(ctx.dtype), None, None


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-position divergence between teacher and student at temperature T. (N, V), (N, V) -> (N,)

    ``chunk_size`` bounds memory: the vocabulary-wide log-softmax of both models is computed for
    that many positions at a time (each position's softmax exactly once), never for all N at once.
    """
    fn = divergence_fn(kind, beta, skew)
    n = student_logits.shape[0]
    step = max(1, n if not chunk_size or chunk_size >= n else chunk_size)
    # The classic KD loss, and the one most runs use: the fused version (same values, fewer passes).
    fused = kind == "forward_kl" and not teacher_logits.requires_grad
    out = []
    for i in range(0, n, step):
        if fused:
            out.append(_ForwardKLFromLogits.apply(student_logits[i:i + step], teacher_logits[i:i + step], temperature))
            continue
        s = F.log_softmax(student_logits[i:i + step].float() / temperature, dim=-1)  # (C, V)
        t = F.log_softmax(teacher_logits[i:i + step].float() / temperature, dim=-1)  # (C, V)
        out.append(fn(s, t))
    return torch.cat(out) if out else student_logits.new_zeros(0, dtype=torch.float32)


def sparse_teacher_logp(logprobs: Tensor, tail_logmass: Tensor, capture_temperature: float, temperature: float,
                        vocab_size: int) -> Tensor:
    """Cached top-k teacher log-probs -> (N, k+1) log-probs at temperature T: the k tokens, then the tail.

    At the capture temperature this is exact (up to the cache's quantisation). At another T, the
    top-k are re-tempered exactly (log p_T ∝ (T_c / T) · log p_Tc), and the tail, whose shape was
    not kept, is assumed spread evenly over the V − k other tokens. Rows are renormalised so the
    k+1 bins sum to one.
    """
    lp, tail = logprobs.float(), tail_logmass.float()
    if temperature != capture_temperature:
        r = capture_temperature / temperature
        absent = lp <= ABSENT_LOGP / 2  # (N, k) slots that are no bin (a trimmed student's): not counted
        if bool(absent.any()):
            log_n = torch.log((vocab_size - (~absent).sum(-1)).clamp(min=1).float())  # (N,)
        else:
            log_n = math.log(max(vocab_size - lp.shape[-1], 1))
        lp = torch.where(absent, ABSENT_LOGP, r * lp)
        tail = log_n + r * (tail - log_n)
    bins = torch.cat([lp, tail[:, None]], dim=-1)  # (N, k+1)
    return bins - torch.logsumexp(bins, dim=-1, keepdim=True)


def sparse_student_logp(student_logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """Student log-probs at T gathered at the teacher's top-k ids, plus the mass elsewhere. (N, V) -> (N, k+1)"""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    ids, present = _present(ids)
    top = s.gather(-1, ids)  # (N, k)
    # (N,) log of the mass outside the top-k, floored like the cache's tail (an empty tail is ~1e-13, not 0)
    if present is None:
        rest = s.scatter(-1, ids, float("-inf")).logsumexp(-1).clamp(min=LOG_TAIL_FLOOR)
    else:
        rest = s.masked_fill(_in_bins(s.shape, ids, present, s.device), float("-inf")).logsumexp(-1)
        rest = rest.clamp(min=LOG_TAIL_FLOOR)
        top = torch.where(present, top, ABSENT_LOGP)
    return torch.cat([top, rest[:, None]], dim=-1)


class _SparseForwardKL(torch.autograd.Function):
    """KL over k+1 bins (teacher's top-k, then the rest) with a hand-written backward.

    The bins' student log-probs are log q_j at the top-k ids and log q_rest = log Σ_{j∉top-k} q_j,
    floored at LOG_TAIL_FLOOR like the cache's tail. With c = Σ p_top + p_rest·[rest not floored], the
    gradient with respect to the student's logits z is
        top-k token j:   (c·q_j − p_j) / T
        other token j:   q_j · (c − [not floored]·p_rest / q_rest) / T
    (autograd through log_softmax, gather, scatter and logsumexp gives the same; a test checks it).
    Autograd keeps ~4 (N, V) buffers and makes ~8 passes over them; this keeps one, the student's
    probabilities with the top-k zeroed, and turns it into the gradient in place.
    (N, V), (N, k), (N, k+1) teacher bin log-probs at T -> (N,)
    """

    @staticmethod
    def forward(ctx, s_logits: Tensor, ids: Tensor, t_bins: Tensor, temperature: float) -> Tensor:
        z = s_logits.float()
        q = F.log_softmax(z / temperature if temperature != 1 else z, dim=-1)  # (N, V) log q for now
        ids, present = _present(ids)
        top = q.gather(-1, ids)                                                 # (N, k) log q at the top-k
        if present is None:
            q.exp_().scatter_(-1, ids, 0.0)                                     # (N, V) q outside the top-k
        else:  # absent slots are no bin: their (clamped) id keeps its mass in the rest
            q.exp_().masked_fill_(_in_bins(q.shape, ids, present, q.device), 0.0)
            top = torch.where(present, top, ABSENT_LOGP)
        q_rest = q.sum(-1)                                                      # (N,) exact, no 1 − Σ cancellation
        log_rest = q_rest.log()
        free = log_rest > LOG_TAIL_FLOOR                                        # (N,) rest bin not floored
        s_bins = torch.cat([top, log_rest.clamp(min=LOG_TAIL_FLOOR)[:, None]], dim=-1)  # (N, k+1)
        ctx.save_for_backward(q, ids, top, t_bins, q_rest, free, present if present is not None else ids.new_ones(0))
        ctx.temperature, ctx.dtype = temperature, s_logits.dtype
        return _kl_logp(t_bins, s_bins)  # only k+1 columns: the plain definition is cheap here

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, ids, top, t_bins, q_rest, free, present = ctx.saved_tensors
        p = t_bins.exp()                                                                  # (N, k+1)
        p_top, p_rest = p[:, :-1], p[:, -1]
        c = p_top.sum(-1) + torch.where(free, p_rest, 0.0)                                 # (N,)
        rest_coef = c - torch.where(free, p_rest / q_rest.clamp(min=torch.finfo(q.dtype).tiny), 0.0)
        scale = grad_out / ctx.temperature                                                # (N,)
        grad = q.mul_((rest_coef * scale)[:, None])                                       # (N, V); top-k are 0
        top_grad = (c[:, None] * top.exp() - p_top) * scale[:, None]                     # (N, k)
        if present.numel():  # absent slots add nothing (a clamped id may be a present slot's too: add, not set)
            grad.scatter_add_(-1, ids, torch.where(present, top_grad, 0.0))
        else:
            grad.scatter_(-1, ids, top_grad)
        return grad.to(ctx.dtype), None, None, None


def sparse_divergence(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail_logmass: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """A divergence between the cached teacher and the student over k+1 bins (top-k tokens + the rest).

    Collapsing the tail into one bin gives a lower bound of the full-vocabulary divergence that is
    exact when the tail mass is zero; with a teacher's top-64 it is usually within a few percent.
    (N, V), (N, k), (N, k), (N,) -> (N,)
    """
    fn = divergence_fn(kind, beta, skew)
    vocab = student_logits.shape[-1]
    n = student_logits.shape[0]
    step = max(1, n if not chunk_size or chunk_size >= n else chunk_size)
    out = []
    for i in range(0, n, step):
        t_bins = sparse_teacher_logp(teacher_logprobs[i:i + step], tail_logmass[i:i + step], capture_temperature,
                                     temperature, vocab)  # (C, k+1)
        if kind == "forward_kl":
            # The default and the benchmarked loss: the fused version (same values, one (C, V) buffer).
            out.append(_SparseForwardKL.apply(student_logits[i:i + step], ids[i:i + step], t_bins, temperature))
        else:
            out.append(fn(sparse_student_logp(student_logits[i:i + step], ids[i:i + step], temperature), t_bins))
    return torch.cat(out) if out else student_logits.new_zeros(0, dtype=torch.float32)


def soft_divergence(student_logits: Tensor, teacher: TeacherSignal, kind: str, temperature: float,
                    beta: float = 0.5, skew: float = 0.1, chunk_size: int | None = None) -> Tensor:
    """Per-position divergence from either kind of teacher signal. (N, V), signal -> (N,)"""
    if isinstance(teacher, SparseSignal):
        return sparse_divergence(student_logits, teacher.ids, teacher.logprobs, teacher.tail_logmass, kind,
                                 temperature, teacher.capture_temperature, beta, skew, chunk_size)
    return divergence(student_logits, teacher, kind, temperature, beta, skew, chunk_size)


def kd_terms(
    student_logits: Tensor,
    teacher_logits: TeacherSignal | None,
    labels: Tensor,
    alpha: float,
    temperature: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Summed (not averaged) terms of alpha·CE + (1−alpha)·T²·D over N positions.

    Returns ``{"loss", "ce", "soft"}`` as scalar sums (``soft`` is D at temperature T, before T²);
    the caller divides by the accumulated target count.
    """
    ce = hard_ce(student_logits, labels).sum() if alpha > 0 else student_logits.new_zeros((), dtype=torch.float32)
    if alpha < 1 and teacher_logits is not None:
        soft = soft_divergence(student_logits, teacher_logits, kind, temperature, beta, skew, chunk_size).sum()
    else:
        soft = student_logits.new_zeros((), dtype=torch.float32)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * soft
    return {"loss": loss, "ce": ce, "soft": soft}
