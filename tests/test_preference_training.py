"""`kdforge distill --objective dpo|kto|distillm2`: the step's gradients equal autograd on the loss formulas over
whole-sequence log-probs; the reference is the starting student (first DPO loss = log 2), cached for resumes."""

import json
import math

import pytest
import torch

from kdforge.data.batching import collate
from kdforge.data.chat import IGNORE_INDEX
from kdforge.distill.losses import kd_terms
from kdforge.distill.parallel import TargetHidden
from kdforge.distill.preference import dpo_loss, kto_loss, kto_reference_point
from kdforge.distill.preference_data import PreferencePair, PreferenceSingle
from kdforge.distill.preference_step import (
    PreferenceDistiller,
    PreferenceObjective,
    batch_for,
    encode_pairs,
    encode_singles,
    reference_logps,
)
from kdforge.distill.schedules import Progress
from kdforge.distill.teacher_source import LiveTeacher
from kdforge.distill.trainer import Distiller
from kdforge.models.forward import target_logits
from kdforge.stages.distill import REFERENCE_NAME, DistillConfig
from kdforge.stages.distill import run as run_distill

from .conftest import make_tiny
from .test_distill import _pair

pytestmark = pytest.mark.integration

PROMPTS = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(6)]


def _pairs():
    return [PreferencePair(f"p{i}", "validation" if i >= 4 else "train", "math", m, f"{i} plus {i} is {2 * i}.",
                           f"I do not know what {i} plus {i} is, sorry.", 1.0, 0.0) for i, m in enumerate(PROMPTS)]


def _seq_logps(model, batch, vocab):
    """(B,) Σ log p(answer token): the direct computation, rows summed from the padded batch's targets."""
    logits, targets = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"], vocab)
    lp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]
    rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    return torch.zeros(batch["labels"].shape[0]).index_add(0, rows, lp)


@pytest.mark.parametrize("loss_type,sft", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_dpo_step_gradients_equal_the_formula(tokenizer, loss_type, sft):
    policy = make_tiny("llama", len(tokenizer), seed=2)
    reference = make_tiny("llama", len(tokenizer), seed=7)  # another model: refs differ from the policy's
    v = len(tokenizer)
    items = encode_pairs(tokenizer, _pairs()[:3], 128)
    flat = [e for pair in items for e in pair]
    ref = reference_logps(TargetHidden(reference), reference, flat, tokenizer.pad_token_id, v, 7, None)
    refs = [[ref[2 * i], ref[2 * i + 1]] for i in range(3)]
    batch = batch_for("dpo", items, refs, tokenizer.pad_token_id)
    obj = PreferenceObjective("dpo", beta=0.3, loss_type=loss_type, sft_weight=sft, chunk_size=7)
    d = PreferenceDistiller(obj, policy, TargetHidden(policy), v, None)
    policy.zero_grad()
    r = d.step([batch], Progress(0, 10, 5))
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    seq = _seq_logps(policy, batch, v)
    want = dpo_loss(seq[:3], seq[3:], batch["ref"][:, 0], batch["ref"][:, 1], beta=0.3, loss_type=loss_type)
    total = want["loss"].mean()
    if sft:
        n_tok = int(batch["sft_tokens"])
        total = total - sft * seq[:3].sum() / n_tok
    total.backward()
    for g, p in zip(got, policy.parameters()):  # chunked sums vs one: float summation order
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4)
    assert r["soft"] == pytest.approx(float(want["loss"].mean()), rel=1e-5)
    assert r["extra"]["margin"] == pytest.approx(float(want["margin"].mean()), rel=1e-4, abs=1e-6)
    # The reference sums equal the direct computation (packing off, chunked projection).
    torch.testing.assert_close(torch.tensor(ref), _seq_logps(reference, collate(flat, tokenizer.pad_token_id), v)
                               .detach(), rtol=1e-5, atol=1e-4)


def test_kto_step_gradients_equal_the_formula(tokenizer):
    policy = make_tiny("llama", len(tokenizer), seed=2)
    reference = make_tiny("llama", len(tokenizer), seed=7)
    v = len(tokenizer)
    singles = [PreferenceSingle(f"s{i}", "train", "math", m, f"{i} plus {i} is {2 * i}.", i % 2 == 0)
               for i, m in enumerate(PROMPTS[:4])]
    own, shifted = encode_singles(tokenizer, singles, 128)
    ref_own = reference_logps(TargetHidden(reference), reference, own, tokenizer.pad_token_id, v, 256, None)
    ref_kl = reference_logps(TargetHidden(reference), reference, shifted, tokenizer.pad_token_id, v, 256, None)
    batch = batch_for("kto", list(zip(own, shifted)), [list(x) for x in zip(ref_own, ref_kl)], tokenizer.pad_token_id,
                      [s.desirable for s in singles])
    d = PreferenceDistiller(PreferenceObjective("kto", beta=0.5, undesirable_weight=1.5), policy,
                            TargetHidden(policy), v, None)
    policy.zero_grad()
    r = d.step([batch], Progress(0, 10, 5))
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    seq = _seq_logps(policy, batch, v)
    z0 = kto_reference_point(seq[4:].detach(), batch["ref"][:, 1])
    want = kto_loss(seq[:4], batch["ref"][:, 0], batch["desirable"], z0, beta=0.5, undesirable_weight=1.5)
    want["loss"].mean().backward()
    for g, p in zip(got, policy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert r["soft"] == pytest.approx(float(want["loss"].mean()), rel=1e-5)
    assert r["extra"]["kl"] == pytest.approx(float(z0), abs=1e-6)


def test_distillm2_scores_chosen_with_skew_kl_and_rejected_with_skew_reverse_kl(tokenizer):
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    student = make_tiny("llama", len(tokenizer), seed=2)
    v = len(tokenizer)
    items = encode_pairs(tokenizer, _pairs()[:2], 128)
    chosen = collate([a for a, _ in items], tokenizer.pad_token_id)
    rejected = collate([b for _, b in items], tokenizer.pad_token_id)
    cfg = DistillConfig(objective="distillm2", teacher="t", student="s", data="d", temperature=1.0, pack=False)
    d = Distiller(cfg.trainer_objective(), LiveTeacher(teacher, v), student, v, {}, None)
    r = d.step([chosen, rejected], Progress(0, 10, 5), divergence_only=True, kinds=["skew_kl", "skew_reverse_kl"])
    soft = 0.0
    n = 0
    with torch.no_grad():
        for b, kind in ((chosen, "skew_kl"), (rejected, "skew_reverse_kl")):
            s_logits, targets = target_logits(student, b["input_ids"], b["attention_mask"], b["labels"], v)
            t_logits, _ = target_logits(teacher, b["input_ids"], b["attention_mask"], b["labels"], v)
            soft += float(kd_terms(s_logits, t_logits, targets, 0.0, 1.0, kind, skew=0.1)["soft"])
            n += targets.numel()
    assert r["soft"] == pytest.approx(soft / n, rel=1e-4) and r["alpha"] == 0.0


def _write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"id": p.id, "split": p.split, "category": p.category, "messages": p.messages,
                                        "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs))
    return path


def test_dpo_run_starts_at_log2_learns_the_preference_and_resumes(tokenizer, tmp_path):
    _, s_dir = _pair(tmp_path, tokenizer)
    data = _write_pairs(tmp_path / "pairs.jsonl", _pairs())
    out = tmp_path / "dpo"
    cfg = DistillConfig(objective="dpo", student=s_dir, data=str(data), out=str(out), max_steps=6, batch_size=2,
                        lr=3e-3, warmup_steps=0, log_every=1, eval_every=3, save_every=3,
                        preference={"beta": 0.5})
    run_distill(cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference: every margin is 0
    assert log[0]["margin"] == pytest.approx(0.0, abs=1e-5)  # reference batches pack otherwise: float noise
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["margin"] > 0
    assert log[-1]["val_accuracy"] == 1.0 and log[-1]["val_margin"] > 0  # held-out pairs ordered as preferred
    refs = json.loads((out / REFERENCE_NAME).read_text())
    assert len(refs["train"]) == 4 and len(refs["validation"]) == 2
    # Resumed from step 3, the run reads the same reference and repeats the last steps.
    (out / REFERENCE_NAME).write_text(json.dumps(refs | {"marker": 1}))
    run_distill(cfg, resume=True)
    again = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert json.loads((out / REFERENCE_NAME).read_text())["marker"] == 1
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in log], rel=1e-6)


def test_kto_and_distillm2_runs(tokenizer, tmp_path):
    t_dir, s_dir = _pair(tmp_path, tokenizer)
    singles = tmp_path / "singles.jsonl"
    singles.write_text("".join(json.dumps({"id": f"s{i}", "messages": m, "completion": f"{i} plus {i} is {2 * i}.",
                                           "desirable": i % 2 == 0}) + "\n" for i, m in enumerate(PROMPTS)))
    out = tmp_path / "kto"
    run_distill(DistillConfig(objective="kto", student=s_dir, data=str(singles), out=str(out), max_steps=2,
                              batch_size=3, lr=1e-3, warmup_steps=0, log_every=1))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # r = z0 = 0: 1 - sigmoid(0) for every single
    out2 = tmp_path / "dm2"
    run_distill(DistillConfig(objective="distillm2", teacher=t_dir, student=s_dir,
                              data=str(_write_pairs(tmp_path / "pairs.jsonl", _pairs())), out=str(out2), max_steps=2,
                              batch_size=2, lr=1e-3, warmup_steps=0, log_every=1, eval_every=2))
    log2 = [json.loads(x) for x in (out2 / "train_log.jsonl").read_text().splitlines()]
    assert log2[0]["soft"] > 0 and log2[0]["alpha"] == 0.0 and "val_kl" in log2[-1]
    assert (out2 / "model.safetensors").is_file()


def test_preference_objectives_refuse_what_they_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="leave teacher"):
        DistillConfig(objective="dpo", teacher="t", student="s", data="d")
    with pytest.raises(ValueError, match="takes none"):
        DistillConfig(objective="kto", student="s", data="d", on_policy=0.5)
    with pytest.raises(ValueError, match="distillm2"):
        DistillConfig(objective="distillm2", labels="l", student="s", data="d")
    DistillConfig(objective="dpo", student="s", data="d")  # no teacher needed


def test_the_kd_then_dpo_preset_runs_after_a_kd_run(tokenizer, tmp_path):
    """configs/kd-then-dpo.yaml as shipped (prefs before distill, DPO on the KD student, eval of both), on tiny
    stand-ins: only paths and sizes are overridden."""
    from pathlib import Path

    from kdforge.cli import main
    from kdforge.stages import plan_file

    from .conftest import save_tiny, write_conversations

    preset = Path(__file__).parent.parent / "configs" / "kd-then-dpo.yaml"
    stages = {s.name: c for s, c in plan_file(str(preset))}
    assert list(stages) == ["prefs", "distill", "eval"]
    assert stages["distill"].objective == "dpo" and stages["distill"].data == stages["prefs"].out
    assert stages["distill"].student == stages["prefs"].sampler
    out = tmp_path / "run"
    data = write_conversations(tmp_path / "data.jsonl", [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.")
                                                         for i in range(6)])
    teacher = save_tiny(tmp_path / "teacher", "llama", tokenizer, seed=3)
    save_tiny(out / "distill", "llama", tokenizer, seed=4)
    sets = {"vars.out": out, "vars.teacher": teacher, "prefs.data": data, "eval.data": data, "eval.split": "all",
            "prefs.max_new_tokens": 8, "prefs.num_samples": 2, "distill.max_steps": 2, "distill.eval_every": 2,
            "distill.batch_size": 2, "eval.limit": 2, "eval.task_limit": 1, "eval.speed": False,
            "eval.stability_prompts": 0, "eval.plots": False}
    assert main(["run", str(preset), *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]) == 0
    assert (out / "dpo" / "reference_logps.json").is_file() and (out / "dpo" / "model.safetensors").is_file()
    names = [r["name"] for r in json.loads((out / "eval-dpo" / "report.json").read_text())["models"]]
    assert "student (KD + DPO)" in names
