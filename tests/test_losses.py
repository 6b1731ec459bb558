import pytest
import torch

from kdforge.distill.losses import DIVERGENCES, divergence, hard_ce, kd_terms, soft_divergence


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(13, 37, generator=g) * 3, torch.randn(13, 37, generator=g) * 3


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_identical_logits_give_zero(kind, temperature, logits):
    x = logits[0]
    assert torch.allclose(divergence(x, x, kind, temperature), torch.zeros(13), atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_are_positive_and_finite(kind, logits):
    d = divergence(*logits, kind)
    assert torch.isfinite(d).all() and (d > 0).all()


def test_forward_kl_matches_definition(logits):
    # soft_divergence is what the trainer calls (through kd_terms and the Distiller) for dense teachers.
    s, t = logits
    p = torch.softmax(t / 2, -1)
    ref = (p * (torch.log(p) - torch.log_softmax(s / 2, -1))).sum(-1)
    torch.testing.assert_close(soft_divergence(s, t, "forward_kl", 2.0), ref)


def test_jsd_endpoints_are_the_two_kls(logits):
    s, t = logits
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), divergence(s, t, "forward_kl"))
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), divergence(s, t, "reverse_kl"))
    # ... and the documented limits of the unnormalised form: JSD/β -> forward KL, JSD/(1-β) -> reverse KL.
    s, t, b = s / 3, t / 3, 1e-4  # milder logits: the O(beta) remainder grows with the probability ratios
    torch.testing.assert_close(divergence(s, t, "jsd", beta=b) / b, divergence(s, t, "forward_kl"), rtol=2e-3,
                               atol=1e-4)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1 - b) / b, divergence(s, t, "reverse_kl"), rtol=2e-3,
                               atol=1e-4)


def test_jsd_half_is_symmetric_and_bounded(logits):
    s, t = logits
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.5), divergence(t, s, "jsd", beta=0.5))
    assert (divergence(s, t, "jsd", beta=0.5) <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_skew_kl_limits(logits):
    s, t = logits
    torch.testing.assert_close(divergence(s, t, "skew_kl", skew=0.0), divergence(s, t, "forward_kl"))
    torch.testing.assert_close(divergence(s, t, "skew_reverse_kl", skew=0.0), divergence(s, t, "reverse_kl"))
    assert torch.allclose(divergence(s, t, "skew_kl", skew=1.0), torch.zeros(13), atol=1e-6)
    # Skewing towards the teacher bounds the loss: KL(p || a p + (1-a) q) <= -log(a).
    assert (divergence(s, t, "skew_kl", skew=0.1) <= -torch.log(torch.tensor(0.1)) + 1e-5).all()


def test_total_variation_bounds(logits):
    tv = divergence(*logits, "tv")
    assert ((tv > 0) & (tv <= 1)).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_unchunked(kind, logits):
    s, t = logits
    torch.testing.assert_close(divergence(s, t, kind, 2.0, chunk_size=4), divergence(s, t, kind, 2.0))


def test_all_masked_gives_zero_not_nan():
    empty = torch.zeros(0, 37)
    out = kd_terms(empty, empty, torch.zeros(0, dtype=torch.long), alpha=0.5, temperature=2.0)
    assert all(float(v) == 0.0 for v in out.values())


def test_kd_terms_mix_with_t_squared(logits):
    s, t = logits
    y = torch.randint(0, 37, (13,))
    out = kd_terms(s, t, y, alpha=0.3, temperature=3.0, kind="reverse_kl")
    expect = 0.3 * hard_ce(s, y).sum() + 0.7 * 9.0 * divergence(s, t, "reverse_kl", 3.0).sum()
    torch.testing.assert_close(out["loss"], expect)


def test_losses_are_fp32_for_half_inputs():
    s = torch.randn(3, 5).to(torch.bfloat16)
    assert soft_divergence(s, s, "forward_kl", 1.0).dtype == torch.float32


def test_unknown_divergence_is_named():
    with pytest.raises(ValueError, match="unknown divergence 'kl2'"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "kl2")


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_fused_forward_kl_gradient_equals_autograd(logits, temperature):
    """The hand-written backward of the dense forward KL equals autograd through its definition."""
    from kdforge.distill.losses import forward_kl_logp

    s, t = logits
    weights = torch.rand(13)
    a = s.clone().requires_grad_(True)
    (divergence(a, t, "forward_kl", temperature) * weights).sum().backward()
    b = s.clone().requires_grad_(True)
    ref = forward_kl_logp(torch.log_softmax(b / temperature, -1), torch.log_softmax(t / temperature, -1))
    (ref * weights).sum().backward()
    assert a.grad.abs().max() > 0
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
