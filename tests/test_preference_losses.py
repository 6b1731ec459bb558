"""Preference losses (kdforge.distill.preference): hand-computed points, gradient directions, and TRL 1.16 parity."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from kdforge.distill.preference import dpo_loss, kto_loss, kto_reference_point


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- hand-computed points ---------------------------------------------------------------------------------------------

# π_c = −3, r_c = −4, π_r = −6, r_r = −5: chosen ratio 1, rejected ratio −1, h = 2.
PAIR = (_t(-3.0), _t(-6.0), _t(-4.0), _t(-5.0))


def test_dpo_sigmoid_point():
    out = dpo_loss(*PAIR, beta=0.1)
    assert out["loss"].item() == pytest.approx(-_log_sigmoid(0.2), rel=1e-6)
    assert out["chosen_reward"].item() == pytest.approx(0.1)
    assert out["rejected_reward"].item() == pytest.approx(-0.1)
    assert out["margin"].item() == pytest.approx(0.2)


def test_cdpo_label_smoothing_point():
    eps = 0.2
    out = dpo_loss(*PAIR, beta=0.1, label_smoothing=eps)
    want = -(1 - eps) * _log_sigmoid(0.2) - eps * _log_sigmoid(-0.2)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["loss"].item() > dpo_loss(*PAIR, beta=0.1)["loss"].item()  # smoothing pays for a confident margin


def test_ipo_point():
    out = dpo_loss(*PAIR, beta=0.1, loss_type="ipo")
    assert out["loss"].item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2, rel=1e-6)  # (2 − 5)² = 9


def test_hinge_points():
    assert dpo_loss(*PAIR, beta=0.1, loss_type="hinge")["loss"].item() == pytest.approx(1 - 0.2, rel=1e-6)
    # β·h = 1.5 > 1: the hinge is satisfied, loss and gradient 0
    pc = _t(-3.0).requires_grad_()
    out = dpo_loss(pc, _t(-6.0), _t(-4.0), _t(-5.0), beta=0.5, loss_type="hinge")
    out["loss"].sum().backward()
    assert out["loss"].item() == 0.0 and pc.grad.item() == 0.0


def test_kto_points():
    # ρ = 1.5 and −0.5, z0 = 0.3
    pol, ref, want = _t(-1.0, -2.5), _t(-2.5, -2.0), torch.tensor([True, False])
    out = kto_loss(pol, ref, want, torch.tensor(0.3), beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    d = 1.5 * (1 - _sigmoid(0.2 * (1.5 - 0.3)))
    u = 0.7 * (1 - _sigmoid(0.2 * (0.3 - (-0.5))))
    assert out["loss"].tolist() == pytest.approx([d, u], rel=1e-6)
    assert out["reward"].tolist() == pytest.approx([0.3, -0.1], rel=1e-6)
    # a negative KL estimate is clamped at 0
    neg = kto_loss(pol, ref, want, torch.tensor(-2.0), beta=0.2)
    assert neg["loss"].tolist() == pytest.approx([1 - _sigmoid(0.2 * 1.5), 1 - _sigmoid(0.2 * 0.5)], rel=1e-6)
    assert neg["kl"].item() == 0.0


def test_kto_reference_point():
    pol, ref = _t(-1.0, -2.0, -4.0), _t(-2.0, -2.5, -3.0)  # differences 1, 0.5, −1: mean 1/6
    assert kto_reference_point(pol, ref).item() == pytest.approx(1 / 6, rel=1e-6)
    assert kto_reference_point(ref, pol).item() == 0.0  # mean −1/6, clamped
    assert kto_reference_point(ref, pol, clamp=False).item() == pytest.approx(-1 / 6, rel=1e-6)
    pol.requires_grad_()
    assert not kto_reference_point(pol, ref).requires_grad


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*PAIR, loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, label_smoothing=0.5)


# --- gradient directions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradient_raises_chosen_lowers_rejected(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = [(torch.randn(6, generator=g) * 0.5 - 20).requires_grad_() for _ in range(4)]
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)  # |h| < 5: hinge active, IPO below its target
    out["loss"].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises π_c and lowers π_r
    assert rc.grad is None and rr.grad is None          # the reference is detached
    assert not out["margin"].requires_grad


def test_dpo_step_lowers_the_loss():
    pc, pr, rc, rr = _t(-5.0, -7.0), _t(-4.0, -6.0), _t(-5.0, -7.0), _t(-4.0, -6.0)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        x = pc.clone().requires_grad_()
        before = dpo_loss(x, pr, rc, rr, loss_type=loss_type)["loss"].sum()
        before.backward()
        after = dpo_loss(x.detach() - 0.1 * x.grad, pr, rc, rr, loss_type=loss_type)["loss"].sum()
        assert after < before


def test_kto_gradient_directions():
    pol = _t(-3.0, -3.0).requires_grad_()
    out = kto_loss(pol, _t(-3.5, -2.0), torch.tensor([True, False]), torch.tensor(0.1))
    out["loss"].sum().backward()
    assert pol.grad[0] < 0 < pol.grad[1]  # raise the desirable completion, lower the undesirable one


# --- TRL 1.16 parity --------------------------------------------------------------------------------------------------
# TRL computes these losses inside DPOTrainer._compute_loss / KTOTrainer._compute_loss. They are called on a bare
# trainer (object.__new__, no __init__) carrying the attributes they read, with a stand-in model whose "log_probs"
# output per position are the given summed log-probs (one completion token per sequence) and precomputed reference
# log-probs, so the only thing left is TRL's loss arithmetic.

class _FakeModel:
    """Returns per-token log-probs chosen by the test; ``logps_for(input_ids)`` maps a batch to its (B, L−1) values."""

    training = True

    def __init__(self, logps_for):
        self.logps_for = logps_for

    def __call__(self, input_ids, **kwargs):
        lp = self.logps_for(input_ids)
        z = torch.zeros(lp.shape)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _bare(cls, **attrs):
    obj = object.__new__(cls)
    common = dict(accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
                  _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    for k, v in {**common, **attrs}.items():
        setattr(obj, k, v)
    return obj


def _trl_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0):
    """TRL 1.16's DPO loss (the batch mean) and the policy log-probs it was computed from (for gradients)."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    policy = torch.cat([pc, pr]).detach().requires_grad_()  # (2B,): TRL's batch is [chosen; rejected]
    model = _FakeModel(lambda ids: policy[:, None])  # (2B, 1): one completion token per sequence
    trainer = _bare(trl_dpo.DPOTrainer, model=model, ld_alpha=None, f_divergence_type="reverse_kl",
                    loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                    use_weighting=False)
    n = 2 * pc.shape[0]
    inputs = {"input_ids": torch.ones(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * n),  # one completion token: IPO's length division is by 1
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return trainer._compute_loss(model, inputs, return_outputs=False), policy


def _inputs(seed: int, b: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=g, dtype=torch.float32) * 4 - 30 for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(loss_type, beta):
    pc, pr, rc, rr = _inputs(1)
    trl_loss, policy = _trl_dpo(pc, pr, rc, rr, beta, loss_type)
    trl_loss.backward()
    x = torch.cat([pc, pr]).requires_grad_()
    ours = dpo_loss(x[:8], x[8:], rc, rr, beta=beta, loss_type=loss_type)["loss"]
    ours.mean().backward()
    assert abs(ours.mean().item() - trl_loss.item()) < 1e-6
    assert (x.grad - policy.grad).abs().max().item() < 1e-6  # per-example derivative (B× the per-pair one)
    for i in range(8):  # each pair on its own: per-pair values, not just the mean
        one, _ = _trl_dpo(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta, loss_type)
        assert abs(ours[i].item() - one.item()) < 1e-6


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_equals_trl(eps):
    # TRL 1.16's sigmoid ignores label_smoothing; its "aot" loss at batch size 1 (where sorting is the identity) is
    # −(1−ε)·log σ(β·h) − ε·log σ(−β·h), the cDPO form. Cross-check with TRL's plain sigmoid too:
    # cDPO = (1−ε)·sigmoid(h) + ε·sigmoid(−h), and sigmoid(−h) is TRL's sigmoid with chosen and rejected swapped.
    pc, pr, rc, rr = _inputs(2)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)["loss"]
    for i in range(8):
        s = slice(i, i + 1)
        aot, _ = _trl_dpo(pc[s], pr[s], rc[s], rr[s], 0.1, "aot", label_smoothing=eps)
        assert abs(ours[i].item() - aot.item()) < 1e-6
    fwd, _ = _trl_dpo(pc, pr, rc, rr, 0.1, "sigmoid")
    back, _ = _trl_dpo(pr, pc, rr, rc, 0.1, "sigmoid")  # the batch means mix linearly too
    assert abs(ours.mean().item() - ((1 - eps) * fwd.item() + eps * back.item())) < 1e-6


def _trl_kto(pol, ref, desirable, pol_kl, ref_kl, beta, w_d, w_u):
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    policy = pol.detach().clone().requires_grad_()
    b = pol.shape[0]

    def logps_for(ids):  # the completions are 2 wide (1 completion token), the mismatched KL pairs 3 wide
        return policy[:, None] if ids.shape[1] == 2 else torch.stack([pol_kl, torch.zeros(b)], 1)

    model = _FakeModel(logps_for)
    trainer = _bare(trl_kto.KTOTrainer, model=model, calculate_KL=True, loss_type="kto", beta=beta,
                    desirable_weight=w_d, undesirable_weight=w_u)
    ones = torch.ones(b, 2, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": torch.tensor([[0, 1]] * b),
              "KL_input_ids": torch.ones(b, 3, dtype=torch.long),
              "KL_attention_mask": torch.ones(b, 3, dtype=torch.long),
              "KL_completion_mask": torch.tensor([[0, 1, 1]] * b), "label": desirable,
              "ref_logps": ref, "ref_KL_logps": ref_kl}
    return trainer._compute_loss(model, inputs, return_outputs=False), policy, trainer._metrics["train"]["kl"][-1]


@pytest.mark.parametrize("seed,beta,w_d,w_u,kl_shift", [(3, 0.1, 1.0, 1.0, 2.0), (4, 0.5, 1.33, 0.7, 0.5),
                                                       (5, 0.1, 1.0, 1.0, -3.0)])  # the last: z0 clamped to 0
def test_kto_equals_trl(seed, beta, w_d, w_u, kl_shift):
    pol, ref, pol_kl, ref_kl = _inputs(seed)
    pol_kl = ref_kl + kl_shift + torch.randn(8, generator=torch.Generator().manual_seed(seed))  # mean ≈ kl_shift
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    trl_loss, policy, trl_kl = _trl_kto(pol, ref, desirable, pol_kl, ref_kl, beta, w_d, w_u)
    trl_loss.backward()
    z0 = kto_reference_point(pol_kl, ref_kl)
    assert abs(z0.item() - trl_kl) < 1e-6
    assert (z0.item() == 0.0) == (kl_shift < 0)
    x = pol.clone().requires_grad_()
    ours = kto_loss(x, ref, desirable, z0, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)["loss"]
    ours.mean().backward()
    assert abs(ours.mean().item() - trl_loss.item()) < 1e-6
    assert (x.grad - policy.grad).abs().max().item() < 1e-6  # per-example derivatives, in input order
