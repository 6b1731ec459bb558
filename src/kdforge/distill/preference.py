"""Preference objectives (DPO and its variants, KTO) as pure functions of per-sequence log-probabilities.

Every input is a sequence's log-probability summed over its completion tokens, shape (B,), from the
policy being trained (with gradients) or the frozen reference (detached here whatever the caller
passes). Everything is computed in fp32 and returned per pair / per example, shape (B,); the caller
averages (or sums and divides by the accumulated count) so that accumulation and ranks weigh every
pair the same. No model code: the trainer gathers the log-probs and calls these.

Paired (DPO family), with h = (πc − rc) − (πr − rr) the policy's log-ratio margin over the reference
(πc, πr: the policy's log-probs of the chosen and rejected completions; rc, rr: the reference's):
    sigmoid   −(1−ε)·log σ(β·h) − ε·log σ(−β·h)       DPO (Rafailov et al., 2023); ε > 0 is the
                                                      conservative DPO (cDPO) label smoothing
    ipo       (h − 1/(2β))²                            IPO (Azar et al., 2023), β is their τ
    hinge     relu(1 − β·h)                            SLiC-style hinge (Zhao et al., 2023)
Unpaired (KTO, Ethayarajh et al., 2024), with ρ = π − r (policy minus reference log-prob of one
completion) and z0 = max(KL estimate, 0):
    desirable     w_d·(1 − σ(β·(ρ − z0)))
    undesirable   w_u·(1 − σ(β·(z0 − ρ)))

Checked against TRL 1.16.0 (``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``) on random
inputs: tests/test_preference_losses.py. Two differences from TRL worth knowing:
- TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (its label-smoothed sigmoid is the ``aot`` loss at
  batch size 1 and the differently-normalised ``robust`` loss); here ``sigmoid`` with ε is cDPO.
- TRL's ``ipo`` divides each completion's log-ratio by its number of tokens before taking h (the form
  the IPO authors used); pass per-token average log-probs here to get that form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> dict[str, Tensor]:
    """Per-pair DPO-family loss from summed completion log-probs. Four (B,) tensors -> dict of (B,) tensors.

    With h = (πc − rc) − (πr − rr):
        sigmoid  −(1−ε)·log σ(β·h) − ε·log σ(−β·h)   (ε = ``label_smoothing``, cDPO; ε = 0 is DPO)
        ipo      (h − 1/(2β))²
        hinge    relu(1 − β·h)

    Returns ``{"loss", "chosen_reward", "rejected_reward", "margin"}``: the loss per pair (with
    gradients through the policy log-probs only), the implicit rewards β·(π − r) of each side and
    their difference β·h, all three detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    chosen_ratio = policy_chosen.float() - ref_chosen.detach().float()        # (B,) πc − rc
    rejected_ratio = policy_rejected.float() - ref_rejected.detach().float()  # (B,) πr − rr
    h = chosen_ratio - rejected_ratio                                         # (B,)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        loss = torch.relu(1 - beta * h)
    chosen_reward = beta * chosen_ratio.detach()
    rejected_reward = beta * rejected_ratio.detach()
    return {"loss": loss, "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "margin": chosen_reward - rejected_reward}


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor, clamp: bool = True) -> Tensor:
    """KTO's reference point z0: the batch mean of π − r over mismatched (prompt, completion) pairs. (M,), (M,) -> ()

    As TRL 1.16 builds it: each prompt x_i is paired with another example's completion (TRL rotates
    the completions by one within a batch: (x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1})), both models
    score those pairs, and z0 = max(mean(π(y'|x) − r(y'|x)), 0), detached (no gradient flows through
    the reference point). Across ranks TRL averages the per-rank means *before* the clamp: pass
    ``clamp=False``, all-reduce the mean, and let ``kto_loss`` clamp it.
    """
    z0 = (policy_kl_logps.detach().float() - ref_kl_logps.detach().float()).mean()
    return z0.clamp(min=0) if clamp else z0


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Per-example KTO loss (Ethayarajh et al., 2024, Eq. 7). (B,), (B,), (B,) bool, () -> dict of (B,) tensors.

    With ρ = π − r and z0 = max(kl, 0) (``kl`` from ``kto_reference_point``, detached here):
        desirable     w_d·(1 − σ(β·(ρ − z0)))
        undesirable   w_u·(1 − σ(β·(z0 − ρ)))

    Returns ``{"loss", "reward", "kl"}``: the loss per example (in input order), the implicit reward
    β·ρ (detached) and z0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ratio = policy_logps.float() - ref_logps.detach().float()  # (B,) ρ
    z0 = kl.detach().float().clamp(min=0)                       # ()
    want = desirable.to(device=ratio.device, dtype=torch.bool)  # (B,)
    loss = torch.where(want, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    return {"loss": loss, "reward": beta * ratio.detach(), "kl": z0}
