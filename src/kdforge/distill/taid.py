"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv:2501.16937, Sakana AI).

The student does not chase the teacher directly but an intermediate target that starts near itself
and moves towards the teacher as training goes on. With z_s, z_t the student's and teacher's logits
at a position and sg the stop-gradient:
    p_t = softmax((1 − t)·sg(z_s) + t·z_t)           (N, V), i.e. p_t ∝ q^(1−t) · p^t (a geometric mixture)
    J   = KL(p_t ‖ q_θ),  q_θ = softmax(z_s)          per position, gradient through q_θ only
t = 0 is the student itself (J = 0), t = 1 plain forward-KL distillation. With a temperature T both
sides are divided by T first (p_t ∝ q_T^(1−t) · p_T^t), as ``divergence`` does.

t rises from t_start to t_end, linearly or by the adaptive rule (``TaidCoefficient``), per update n
with loss J_n (the mean over the step's target tokens) and progress s_n = step / total steps:
    δ_n     = (J_{n−1} − J_n) / (J_{n−1} + ε)               relative loss change, ε = 1e-15
    m_n     = β·m_{n−1} + (1 − β)·δ_n                       momentum, m_0 = 0
    Δt_n    = α·sigmoid(m_n)·(1 − t_n)
    t_{n+1} = min(t_end, max(t_lin(s_n), t_n + Δt_n))      t_lin(s) = t_start + (t_end − t_start)·s, the floor
so t never falls, never passes t_end, never lags the linear schedule, and moves faster while the loss
falls fast (m > 0). Defaults t_start = 0.4, t_end = 1.0, α = 5e-4, β = 0.99 and the name
``disable_adaptive`` (t = t_lin(s) only) are the official code's.

Where this comes from: the official implementation, github.com/SakanaAI/TAID (commit a062892),
``src/distil_losses/taid.py`` (``TAID.update_t`` and ``TAID.compute_loss``) and ``src/arguments.py``
(the defaults); written anew here, not copied. Differences, all deliberate:
- The reference's loss is the cross-entropy −Σ p_t log q_θ, which is J + H(p_t): the same gradient
  (p_t is detached) but not the same value. Here the loss is the KL (0 at t = 0, equal to kdforge's
  ``forward_kl`` at t = 1). Its adaptive rule sees the cross-entropy: pass J + ``target_entropy`` to
  ``TaidCoefficient.update`` for its exact dynamics. The KL alone goes to 0 where t does (t_start = 0),
  and a relative change measured from 0 saturates the momentum.
- The interpolation is done in fp32 (the reference mixes bf16 logits in bf16).
- The linear floor applies from the first update (the reference skips it on its first call, which is
  the same thing when that call is at progress 0); a non-finite loss leaves the state unchanged.
- The reference also updates t on validation batches; a caller here updates it once per training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdforge.distill.losses import (
    ABSENT_LOGP,
    SparseSignal,
    TeacherSignal,
    sparse_student_logp,
    sparse_teacher_logp,
)

Tensor = torch.Tensor

SCHEDULES = ("linear", "adaptive")


def _check_t(t: float) -> None:
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"TAID's t must be in [0, 1], got {t}")


def interpolate_dense(student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:
    """The intermediate target's logits (1 − t)·sg(z_s) + t·z_t, detached, fp32. (N, V), (N, V) -> (N, V)

    t = 1 returns the teacher's logits themselves (as fp32) and t = 0 the detached student's, bit
    for bit: both ends are returned, not computed, since 0·z is NaN where z is ±inf (a masked logit).
    """
    _check_t(t)
    if t >= 1:
        return teacher_logits.detach().float()
    if t <= 0:
        return student_logits.detach().float()
    out = student_logits.detach().float() * (1 - t)            # (N, V) a new buffer, mixed in place
    return out.add_(teacher_logits.detach().float(), alpha=t)


def interpolate_sparse(student_bin_logp: Tensor, teacher_bin_logp: Tensor, t: float) -> Tensor:
    """The intermediate target over the cache's k+1 bins, as log-probs. (N, k+1), (N, k+1) -> (N, k+1)

    log p_t = log_softmax((1 − t)·sg(log q_bins) + t·log p_bins), with the bins of
    ``sparse_student_logp`` and ``sparse_teacher_logp`` at the same temperature (top-k, then the
    rest). On the top-k bins this is exactly the dense p_t ∝ q^(1−t)·p^t, up to normalisation; the
    rest bin gets q_rest^(1−t)·p_rest^t, which by Hölder's inequality is at least the dense
    Σ_{j∉top-k} q_j^(1−t)·p_j^t (equal when the teacher's tail is shaped like the student's — the
    cache kept only its mass), so the sparse target leaves the tail slightly more mass.
    Absent slots (a trimmed student's, ``ABSENT_LOGP``) stay ``ABSENT_LOGP``: no bin.

    t = 1 returns the teacher's bins unchanged (as fp32) and t = 0 the detached student's: not
    renormalised, because log_softmax of already normalised log-probs is not the identity bit for
    bit (it moves them by up to ~1e-6), and t = 1 must be plain distillation exactly.
    """
    _check_t(t)
    if t >= 1:
        return teacher_bin_logp.detach().float()
    if t <= 0:
        return student_bin_logp.detach().float()
    teacher = teacher_bin_logp.detach().float()
    mixed = student_bin_logp.detach().float() * (1 - t)        # (N, k+1)
    out = F.log_softmax(mixed.add_(teacher, alpha=t), dim=-1)
    return torch.where(teacher <= ABSENT_LOGP / 2, ABSENT_LOGP, out)


@torch.no_grad()
def interpolated_signal(student_logits: Tensor, teacher: TeacherSignal, t: float,
                        temperature: float = 1.0) -> TeacherSignal:
    """TAID's target in the form of the teacher's signal, for ``soft_divergence(student, target, kind, T)``.

    Dense logits (N, V) -> the interpolated logits (N, V). A sparse signal -> a sparse signal over the
    same ids whose bins are ``interpolate_sparse`` of the student's and teacher's bins at T, stored
    at capture temperature T (so it must be used at that T: it is not re-tempered). At t = 1 the
    teacher's signal itself is returned, so the loss is the plain divergence bit for bit.
    """
    _check_t(t)
    if not isinstance(teacher, SparseSignal):
        return interpolate_dense(student_logits, teacher, t)
    if t >= 1:
        return teacher
    t_bins = sparse_teacher_logp(teacher.logprobs, teacher.tail_logmass, teacher.capture_temperature, temperature,
                                 student_logits.shape[-1])                      # (N, k+1)
    s_bins = sparse_student_logp(student_logits.detach(), teacher.ids, temperature)  # (N, k+1)
    bins = interpolate_sparse(s_bins, t_bins, t)
    return SparseSignal(teacher.ids, bins[:, :-1], bins[:, -1], capture_temperature=temperature)


@torch.no_grad()
def target_entropy(target: TeacherSignal, temperature: float = 1.0) -> Tensor:
    """H(p_t) per position of a target from ``interpolated_signal``. -> (N,)

    KL(p_t ‖ q) + H(p_t) is the cross-entropy the reference implementation reports as its loss and
    feeds to its adaptive rule. Dense logits: over the vocabulary at ``temperature``; a sparse target:
    over its k+1 bins at the temperature it was built at (``temperature`` is not used).
    """
    if isinstance(target, SparseSignal):
        bins = torch.cat([target.logprobs.float(), target.tail_logmass.float()[:, None]], dim=-1)  # (N, k+1)
        logp = F.log_softmax(bins, dim=-1)
    else:
        logp = F.log_softmax(target.float() / temperature, dim=-1)  # (N, V)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # no overflow for very negative momenta
    return e / (1.0 + e)


class TaidCoefficient:
    """TAID's interpolation coefficient t: a linear schedule, or the adaptive rule with the linear floor.

    Use ``t`` for the loss of a step, then ``update(loss, progress)`` with that step's loss and
    progress = (optimizer steps done before it) / (total steps), as the reference passes
    global_step / estimated_stepping_batches; it returns t for the next step. ``value(progress)``
    is the linear schedule t_lin = (1 − s)·t_start + s·t_end (s clamped to [0, 1]; written so both
    ends are exact), the whole schedule when ``schedule="linear"`` or ``disable_adaptive=True``
    (which mean the same), the floor otherwise. The state is Python floats (double precision; the
    reference keeps fp32 tensors) and ``state_dict`` holds all of it, so a resumed run continues
    exactly; the hyper-parameters are the config's and are not in it.
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, schedule: str = "adaptive", alpha: float = 5e-4,
                 beta: float = 0.99, disable_adaptive: bool = False, eps: float = 1e-15) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown TAID schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {t_start}")
        if not 0.0 < t_end <= 1.0 or t_end < t_start:
            raise ValueError(f"t_end must be in (0, 1] and at least t_start={t_start}, got {t_end}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.t_start, self.t_end, self.alpha, self.beta, self.eps = t_start, t_end, alpha, beta, eps
        self.adaptive = schedule == "adaptive" and not disable_adaptive
        self.t = t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None  # None until the first update (the reference's +inf)
        self.delta_t = 0.0                   # the last adaptive step α·sigmoid(m)·(1 − t), for logging

    def value(self, progress: float) -> float:
        """The linear schedule at ``progress`` in [0, 1] (clamped): t_start at 0, t_end at 1."""
        s = min(max(float(progress), 0.0), 1.0)
        return (1.0 - s) * self.t_start + s * self.t_end

    def update(self, loss: float, progress: float) -> float:
        """One step of the rule (module docstring) after a step with mean loss ``loss``; returns the new t."""
        loss = float(loss)
        if not math.isfinite(loss):
            return self.t
        floor = self.value(progress)
        if self.prev_loss is None:  # no relative change yet: only the floor moves t
            self.prev_loss = loss
            self.t = floor if not self.adaptive else min(self.t_end, max(floor, self.t))
            return self.t
        relative = (self.prev_loss - loss) / (self.prev_loss + self.eps)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative
        self.delta_t = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        self.t = min(self.t_end, max(floor, self.t + self.delta_t)) if self.adaptive else floor
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict[str, float | None]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss, "delta_t": self.delta_t}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.delta_t = float(state.get("delta_t", 0.0))
