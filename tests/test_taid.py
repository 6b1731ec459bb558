"""TAID (kdforge.distill.taid): the interpolated target at its ends, its gradient, and the schedule of t."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdforge.distill.losses import (
    ABSENT_LOGP,
    SparseSignal,
    forward_kl_logp,
    soft_divergence,
    sparse_student_logp,
    sparse_teacher_logp,
)
from kdforge.distill.taid import (
    TaidCoefficient,
    interpolate_dense,
    interpolate_sparse,
    interpolated_signal,
    target_entropy,
)

N, V, K = 11, 53, 8


def _logits(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3


def _sparse(teacher: torch.Tensor, k: int = K, capture_temperature: float = 1.0) -> SparseSignal:
    """The cache's view of a dense teacher: exact top-k log-probs and the log of the mass outside them."""
    logp = torch.log_softmax(teacher / capture_temperature, -1)
    top, ids = logp.topk(k, -1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return SparseSignal(ids, top, tail, capture_temperature)


# --- the ends: t = 1 is plain distillation, t = 0 the student itself --------------------------------------------------

@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_t1_is_the_teacher_bit_for_bit(kind, temperature):
    s, u = _logits()
    assert torch.equal(interpolate_dense(s, u, 1.0), u)
    target = interpolated_signal(s, u, 1.0, temperature)
    assert torch.equal(soft_divergence(s, target, kind, temperature), soft_divergence(s, u, kind, temperature))

    sig = _sparse(u, capture_temperature=1.5)  # re-tempered to T: the target must be the plain path's bins
    t_bins = sparse_teacher_logp(sig.logprobs, sig.tail_logmass, 1.5, temperature, V)
    s_bins = sparse_student_logp(s, sig.ids, temperature)
    assert torch.equal(interpolate_sparse(s_bins, t_bins, 1.0), t_bins)
    kl = forward_kl_logp(s_bins, interpolate_sparse(s_bins, t_bins, 1.0))
    assert torch.equal(kl, forward_kl_logp(s_bins, t_bins))
    target = interpolated_signal(s, sig, 1.0, temperature)
    assert torch.equal(soft_divergence(s, target, kind, temperature), soft_divergence(s, sig, kind, temperature))


def test_log_softmax_is_not_bitwise_idempotent():
    # Why t = 1 returns the teacher's bins instead of renormalising them: this would move them.
    bins = torch.log_softmax(torch.randn(1000, K + 1, generator=torch.Generator().manual_seed(1)) * 3, -1)
    assert not torch.equal(torch.log_softmax(bins, -1), bins)


def test_masked_logits_do_not_poison_the_ends():
    s, u = _logits()
    s[:, 0] = float("-inf")  # 0·(−inf) is NaN: the ends are returned, not computed
    assert torch.equal(interpolate_dense(s, u, 1.0), u)
    assert torch.isfinite(interpolate_dense(u, s, 0.0)).all()


def test_t0_is_the_student_loss_and_gradient_zero():
    s, u = _logits()
    s.requires_grad_()
    target = interpolate_dense(s, u, 0.0)
    assert torch.equal(target, s.detach()) and not target.requires_grad
    loss = soft_divergence(s, target, "forward_kl", 1.0)
    loss.sum().backward()
    assert loss.abs().max().item() < 1e-6 and s.grad.abs().max().item() < 1e-6

    s.grad = None
    sig = _sparse(u)
    target = interpolated_signal(s, sig, 0.0)
    s_bins = sparse_student_logp(s.detach(), sig.ids, 1.0)
    assert torch.equal(torch.cat([target.logprobs, target.tail_logmass[:, None]], -1), s_bins)
    loss = soft_divergence(s, target, "forward_kl", 1.0)
    loss.sum().backward()
    assert loss.abs().max().item() < 1e-6 and s.grad.abs().max().item() < 1e-6


def test_t_outside_unit_interval_is_refused():
    s, u = _logits()
    with pytest.raises(ValueError):
        interpolate_dense(s, u, 1.5)
    with pytest.raises(ValueError):
        interpolate_sparse(s[:, :K], u[:, :K], -0.1)


# --- between the ends -------------------------------------------------------------------------------------------------

def test_dense_target_is_the_geometric_mixture():
    s, u = _logits()
    t = 0.3
    z = interpolate_dense(s, u, t)
    assert z.dtype == torch.float32
    p_t = torch.softmax(z.double(), -1)
    q, p = torch.softmax(s.double(), -1), torch.softmax(u.double(), -1)
    mix = q ** (1 - t) * p ** t
    torch.testing.assert_close(p_t, mix / mix.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    # and not the arithmetic mixture of the probabilities
    assert (p_t - ((1 - t) * q + t * p)).abs().max() > 1e-2


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_sparse_target_matches_dense_on_the_top_k(t):
    s, u = _logits(2)
    sig = _sparse(u)
    target = interpolated_signal(s, sig, t)
    dense = torch.log_softmax(interpolate_dense(s, u, t), -1)  # (N, V)
    top = dense.gather(-1, sig.ids)
    # the same distribution over the top-k up to normalisation: equal log-ratios to the first slot
    torch.testing.assert_close(target.logprobs - target.logprobs[:, :1], top - top[:, :1], atol=2e-5, rtol=0)
    # the tail bin q_rest^(1−t)·p_rest^t bounds the dense tail mass from above (Hölder), so it gets more share
    dense_tail = dense.scatter(-1, sig.ids, float("-inf")).logsumexp(-1)
    assert (target.tail_logmass >= dense_tail - 1e-5).all() and (target.tail_logmass > dense_tail + 1e-3).any()


def test_sparse_keeps_absent_slots_absent():
    s, u = _logits()
    sig = _sparse(u)
    ids = sig.ids.clone()
    ids[:, 3] = -1  # ABSENT: a token a trimmed student lacks
    lp = sig.logprobs.clone()
    lp[:, 3] = ABSENT_LOGP
    t_bins = sparse_teacher_logp(lp, sig.tail_logmass, 1.0, 1.0, V)
    s_bins = sparse_student_logp(s, ids, 1.0)
    out = interpolate_sparse(s_bins, t_bins, 0.5)
    assert (out[:, 3] == ABSENT_LOGP).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(N))


@pytest.mark.parametrize("t", [0.25, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_flows_only_through_the_student_term(t, temperature):
    s, u = _logits(3)
    s.requires_grad_()
    soft_divergence(s, interpolated_signal(s, u, t, temperature), "forward_kl", temperature).sum().backward()
    # the definition: KL(sg(p_t) ‖ q) with p_t built independently
    x = s.detach().clone().requires_grad_()
    p_t = torch.softmax(((1 - t) * s.detach() + t * u) / temperature, -1)
    log_q = torch.log_softmax(x / temperature, -1)
    (p_t * (p_t.log() - log_q)).sum().backward()
    torch.testing.assert_close(s.grad, x.grad, atol=1e-6, rtol=1e-5)
    # without the stop-gradient the gradient would differ (so the check above can fail)
    y = s.detach().clone().requires_grad_()
    p_y = torch.softmax(((1 - t) * y + t * u) / temperature, -1)
    (p_y * (p_y.log() - torch.log_softmax(y / temperature, -1))).sum().backward()
    assert (y.grad - x.grad).abs().max() > 1e-2

    # sparse: KL over the bins against the detached interpolated bins
    sig = _sparse(u)
    s.grad = None
    soft_divergence(s, interpolated_signal(s, sig, t, temperature), "forward_kl", temperature).sum().backward()
    z = s.detach().clone().requires_grad_()
    t_bins = sparse_teacher_logp(sig.logprobs, sig.tail_logmass, 1.0, temperature, V)
    target = interpolate_sparse(sparse_student_logp(z, sig.ids, temperature), t_bins, t)
    assert not target.requires_grad
    forward_kl_logp(sparse_student_logp(z, sig.ids, temperature), target).sum().backward()
    torch.testing.assert_close(s.grad, z.grad, atol=1e-6, rtol=1e-5)


def test_target_entropy_turns_kl_into_the_reference_cross_entropy():
    s, u = _logits(4)
    target = interpolated_signal(s, u, 0.5)
    p_t = torch.softmax(target, -1)
    ce = -(p_t * torch.log_softmax(s, -1)).sum(-1)  # the reference's loss per position
    torch.testing.assert_close(soft_divergence(s, target, "forward_kl", 1.0) + target_entropy(target), ce)
    sig = interpolated_signal(s, _sparse(u), 0.5)
    bins = torch.cat([sig.logprobs, sig.tail_logmass[:, None]], -1)
    ce = -(bins.exp() * sparse_student_logp(s, sig.ids, 1.0)).sum(-1)
    torch.testing.assert_close(soft_divergence(s, sig, "forward_kl", 1.0) + target_entropy(sig), ce)


# --- the coefficient t ------------------------------------------------------------------------------------------------

def test_linear_schedule():
    c = TaidCoefficient(t_start=0.1, t_end=0.7, schedule="linear")
    assert c.value(0.0) == 0.1 and c.value(1.0) == 0.7
    assert c.value(0.5) == pytest.approx(0.4) and c.value(-1) == 0.1 and c.value(2) == 0.7
    for step, loss in enumerate([5.0, 1.0, 9.0, 0.1]):  # the loss does not matter
        assert c.update(loss, step / 4) == c.value(step / 4)
    d = TaidCoefficient(t_start=0.1, t_end=0.7, disable_adaptive=True)  # the reference's name for the same thing
    assert [d.update(x, i / 4) for i, x in enumerate([5.0, 1.0, 9.0, 0.1])] == [c.value(i / 4) for i in range(4)]


def test_defaults_are_the_papers():
    c = TaidCoefficient()
    assert (c.t_start, c.t_end, c.alpha, c.beta, c.adaptive, c.t) == (0.4, 1.0, 5e-4, 0.99, True, 0.4)


def test_adaptive_rule_by_hand():
    c = TaidCoefficient(t_start=0.4, t_end=1.0, alpha=0.01, beta=0.9)
    assert c.update(2.0, 0.0) == 0.4  # the first loss only sets the reference
    m = 0.1 * (2.0 - 1.5) / 2.0
    t = 0.4 + 0.01 * (1 / (1 + math.exp(-m))) * 0.6
    assert c.update(1.5, 0.0) == pytest.approx(t, rel=1e-12)
    m = 0.9 * m + 0.1 * (1.5 - 1.8) / 1.5  # the loss rose: the momentum falls but t still does not
    t = t + 0.01 * (1 / (1 + math.exp(-m))) * (1 - t)
    assert c.update(1.8, 0.0) == pytest.approx(t, rel=1e-12)
    assert c.update(1.7, 0.9) == pytest.approx(0.4 + 0.6 * 0.9)  # the linear floor overtakes


def _run(c: TaidCoefficient, losses, total: int | None = None) -> list[float]:
    return [c.update(x, 0.0 if total is None else i / total) for i, x in enumerate(losses)]


def test_adaptive_is_monotone_bounded_and_above_the_floor():
    g = torch.Generator().manual_seed(0)
    losses = (3.0 * torch.exp(-torch.arange(400) / 100.0) + 0.3 * torch.rand(400, generator=g)).tolist()  # noisy
    c = TaidCoefficient(t_start=0.2, t_end=0.9, alpha=0.05)
    ts = _run(c, losses, total=300)  # runs past the end of its schedule
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert max(ts) == 0.9 and all(t <= 0.9 for t in ts)
    assert all(t >= c.value(i / 300) for i, t in enumerate(ts))
    assert ts[150] > c.value(150 / 300)  # the adaptive part is really ahead of the floor mid-run


def test_adaptive_moves_faster_when_the_loss_falls_faster():
    fast = [10 * 0.97 ** n for n in range(300)]
    slow = [10 * 0.999 ** n for n in range(300)]
    rising = [1 + 0.01 * n for n in range(300)]
    for alpha in (5e-4, 0.01):
        t_fast = _run(TaidCoefficient(alpha=alpha), fast)[-1]
        t_slow = _run(TaidCoefficient(alpha=alpha), slow)[-1]
        t_rise = _run(TaidCoefficient(alpha=alpha), rising)[-1]
        assert t_fast > t_slow > t_rise > 0.4


def test_state_dict_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(1)
    losses = (2 + torch.rand(120, generator=g)).tolist()
    a = TaidCoefficient(alpha=0.02)
    _run(a, losses[:60], total=1000)  # progress stays low: the adaptive part, not the floor, sets t
    state = json.loads(json.dumps(a.state_dict()))  # it survives a JSON checkpoint exactly
    b = TaidCoefficient(alpha=0.02)
    b.load_state_dict(state)
    rest = [(x, (60 + i) / 1000) for i, x in enumerate(losses[60:])]
    resumed, uninterrupted = [b.update(x, p) for x, p in rest], [a.update(x, p) for x, p in rest]
    assert resumed == uninterrupted
    fresh = TaidCoefficient(alpha=0.02)  # without the state the run would not continue the same way
    assert [fresh.update(x, p) for x, p in rest] != uninterrupted


def test_non_finite_loss_is_skipped_and_bad_arguments_refused():
    c = TaidCoefficient(alpha=0.1)
    _run(c, [3.0, 2.0])
    state = c.state_dict()
    assert c.update(float("nan"), 0.0) == state["t"] and c.state_dict() == state
    for kwargs in ({"t_start": 1.0}, {"t_end": 0.0}, {"t_start": 0.5, "t_end": 0.4}, {"alpha": 2.0},
                   {"schedule": "cosine"}):
        with pytest.raises(ValueError):
            TaidCoefficient(**kwargs)
