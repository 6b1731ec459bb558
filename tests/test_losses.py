import torch

from kdforge.distill.losses import forward_kl, hard_ce, kd_terms


def test_identical_logits_give_zero_kl():
    x = torch.randn(5, 11)
    assert torch.allclose(forward_kl(x, x, 1.0), torch.zeros(5), atol=1e-6)
    assert torch.allclose(forward_kl(x, x, 4.0), torch.zeros(5), atol=1e-6)


def test_kl_matches_definition_and_is_positive():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p = torch.softmax(t / 2, -1)
    ref = (p * (torch.log(p) - torch.log_softmax(s / 2, -1))).sum(-1)
    torch.testing.assert_close(forward_kl(s, t, 2.0), ref)
    assert (forward_kl(s, t) > 0).all()


def test_kd_terms_mix_with_t_squared():
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    y = torch.randint(0, 9, (6,))
    out = kd_terms(s, t, y, alpha=0.3, temperature=3.0)
    expect = 0.3 * hard_ce(s, y).sum() + 0.7 * 9.0 * forward_kl(s, t, 3.0).sum()
    torch.testing.assert_close(out["loss"], expect)


def test_losses_are_fp32_for_half_inputs():
    s = torch.randn(3, 5).to(torch.bfloat16)
    assert forward_kl(s, s).dtype == torch.float32
