"""Self-distillation (`kdforge distill --self`) and consistency under perturbed inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kdforge.data.batching import collate
from kdforge.data.formats import Conversation
from kdforge.distill.consistency import perturb, perturbation_generator, perturbed_inputs
from kdforge.distill.losses import hard_ce, soft_divergence
from kdforge.distill.schedules import Progress
from kdforge.distill.teacher_source import LiveTeacher
from kdforge.distill.trainer import Distiller, encode_dataset
from kdforge.models.forward import target_logits
from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill

from .conftest import make_tiny
from .test_distill import CONVS, _pair, data_file  # noqa: F401  (the module-scoped data fixture)

pytestmark = pytest.mark.integration


def test_perturbations():
    h = torch.randn(2, 50, 16)
    gen = lambda: perturbation_generator(0, 3, 1)  # noqa: E731
    assert torch.equal(perturb(h, "token_dropout", 0.0, 0.0, gen()), h)
    assert torch.equal(perturb(h, "hidden_noise", 0.0, 0.0, gen()), h)
    dropped = perturb(h, "token_dropout", 0.5, 0.0, gen())
    zero = (dropped == 0).all(-1)  # (B, T) whole token vectors
    assert 20 < int(zero.sum()) < 80 and torch.equal(dropped[~zero], h[~zero])
    assert torch.equal(dropped, perturb(h, "token_dropout", 0.5, 0.0, gen()))  # reproducible
    assert not torch.equal(dropped, perturb(h, "token_dropout", 0.5, 0.0, perturbation_generator(0, 4, 1)))
    noisy = perturb(h, "hidden_noise", 0.0, 0.1, gen())
    rel = ((noisy - h).pow(2).mean(-1).sqrt() / h.pow(2).mean(-1).sqrt())  # (B, T): about sigma
    assert 0.07 < float(rel.mean()) < 0.13
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(h, "shuffle", 0.1, 0.1, gen())


@pytest.mark.parametrize("kind", ["token_dropout", "hidden_noise"])
def test_consistency_gradient_equals_the_formula(tokenizer, kind):
    """alpha 1 (CE) + w * KL(q(x) detached ‖ q(perturbed x)) per target token: the trainer's gradients equal
    autograd on the formula, with the same perturbation drawn."""
    student = make_tiny("llama", len(tokenizer), seed=2)
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS[:4])], 64)
    batch = collate(data, tokenizer.pad_token_id)
    cfg = DistillConfig(teacher="t", student="s", data="d", alpha=1.0, pack=False, seed=5,
                        consistency={"weight": 0.7, "perturb": kind, "p": 0.3, "sigma": 0.5})
    d = Distiller(cfg.trainer_objective(), LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {}, None)
    student.zero_grad()
    r = d.step([batch], Progress(2, 10, 5))
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], len(tokenizer))
    logits, targets = target_logits(student, *args)
    with torch.no_grad():
        clean = logits.detach()
    with perturbed_inputs(student, kind, 0.3, 0.5, perturbation_generator(5, 2, 0)):
        noisy, _ = target_logits(student, *args)
    n = targets.numel()
    cons = soft_divergence(noisy, clean, "forward_kl", 1.0).sum()
    (hard_ce(logits, targets).sum() / n + 0.7 * cons / n).backward()
    for g, p in zip(got, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert r["consistency"] == pytest.approx(float(cons) / n, rel=1e-4) and r["consistency"] > 0
    assert r["consistency_weight"] == 0.7


def test_self_distillation_starts_at_zero_divergence_and_keeps_frozen_layers(tokenizer, tmp_path, data_file):  # noqa: F811
    _, s_dir = _pair(tmp_path, tokenizer)
    out = tmp_path / "self"
    cfg = DistillConfig(self_distill=True, student=s_dir, data=str(data_file), out=str(out), max_steps=3,
                        batch_size=2, lr=1e-3, warmup_steps=0, log_every=1, freeze=[r"layers\.0\.", "embed_tokens"],
                        consistency={"weight": 1.0, "perturb": "token_dropout", "p": 0.2})
    assert cfg.teacher == s_dir
    run_distill(cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["soft"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the starting student
    assert log[0]["consistency"] > 0 and log[-1]["soft"] > 0  # perturbation and training move it away
    before, after = load_file(f"{s_dir}/model.safetensors"), load_file(str(out / "model.safetensors"))
    frozen = [k for k in before if "layers.0." in k or "embed_tokens" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if "layers.1." in k)


def test_self_distillation_of_a_cut_student_aligns_each_layer_with_itself(tokenizer, tmp_path, data_file):  # noqa: F811
    """A student cut from a deeper teacher records the teacher layers it came from (meta.json layer_map, here
    student layer 1 = teacher layer 2); its self-distillation teacher is its own copy, so layer i aligns with
    layer i (the recorded map would point past the copy's last layer)."""
    from kdforge.artifacts import write_meta

    _, s_dir = _pair(tmp_path, tokenizer)
    write_meta(s_dir, "student", {"teacher": "t"}, extra={"layer_map": {"0": 0, "1": 2}})
    out = tmp_path / "self"
    run_distill(DistillConfig(self_distill=True, student=s_dir, data=str(data_file), out=str(out), max_steps=1,
                              batch_size=2, hidden_loss="mse", hidden_weight=1.0, log_every=1))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["hidden"] == pytest.approx(0.0, abs=1e-6)  # every layer against its own frozen copy
    assert json.loads((out / "meta.json").read_text())["layer_map"] == {"0": 0, "1": 1}


def test_self_distillation_refuses_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="self_distill"):
        DistillConfig(self_distill=True, teacher="t", student="s", data="d")
    with pytest.raises(ValueError, match="consistency.weight"):
        DistillConfig(teacher="t", student="s", data="d", consistency={"weight": "nope"})
