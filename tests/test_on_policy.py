"""On-policy distillation (GKD): lambda 0 is the off-policy run exactly; sampled answers are reproducible and the
teacher scores exactly the sampled tokens; on-policy steps train the divergence alone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kdforge.data.batching import collate
from kdforge.data.chat import IGNORE_INDEX, encode_prompt
from kdforge.data.formats import Conversation
from kdforge.distill.losses import kd_terms
from kdforge.distill.on_policy import Rollout, StudentSampler, is_on_policy, sample_seed
from kdforge.distill.schedules import Progress
from kdforge.distill.teacher_source import LiveTeacher, TeacherRequest
from kdforge.distill.trainer import Distiller
from kdforge.models.forward import target_logits
from kdforge.models.loading import end_of_turn_ids
from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill

from .conftest import make_tiny
from .test_distill import CONVS, _pair, data_file  # noqa: F401  (the module-scoped data fixture)

pytestmark = pytest.mark.integration


def _convs():
    return [Conversation(f"c{i}", m) for i, m in enumerate(CONVS)]


def test_the_on_policy_draw_depends_on_seed_and_step_only():
    draws = [is_on_policy(0, s, 0.5) for s in range(400)]
    assert draws == [is_on_policy(0, s, 0.5) for s in range(400)]
    assert 150 < sum(draws) < 250  # about half
    assert draws != [is_on_policy(1, s, 0.5) for s in range(400)]
    assert not any(is_on_policy(0, s, 0.0) for s in range(50)) and all(is_on_policy(0, s, 1.0) for s in range(50))
    state = torch.random.get_rng_state()
    is_on_policy(0, 3, 0.5)
    assert torch.equal(state, torch.random.get_rng_state())  # the training RNG is not touched
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) and sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


def test_samples_are_reproducible(tokenizer):
    student = make_tiny("llama", len(tokenizer), seed=5)
    convs = _convs()[:4]
    stops = end_of_turn_ids(tokenizer, student)

    def sample(batch_size, indices=(0, 1, 2, 3), step=7, seed=0):
        s = StudentSampler(student, tokenizer, Rollout(temperature=1.0, top_p=0.9, max_new_tokens=12,
                                                       batch_size=batch_size), 256, seed, stops)
        return s.sample(list(indices), [convs[i] for i in indices], step)

    a, b = sample(4), sample(4)
    assert [e.input_ids for e in a.encoded] == [e.input_ids for e in b.encoded]
    assert a.tokens == b.tokens > 0
    # Another step or seed samples something else (each answer's generator is seeded from seed, step, example).
    assert [e.input_ids for e in sample(4, step=8).encoded] != [e.input_ids for e in a.encoded]
    assert [e.input_ids for e in sample(4, seed=1).encoded] != [e.input_ids for e in a.encoded]
    for e, c in zip(a.encoded, convs):
        prompt = encode_prompt(tokenizer, c.prompt_messages)
        assert e.input_ids[:len(prompt)] == prompt
        answer = e.input_ids[len(prompt):]
        # Labels are exactly the sampled answer (its end of turn included when it stopped).
        assert e.labels == [IGNORE_INDEX] * len(prompt) + answer
        assert len(answer) == 12 or answer[-1] in stops
    student.train()  # the mode it was in is given back
    sample(2)
    assert student.training


def test_the_teacher_scores_exactly_the_sampled_tokens(tokenizer):
    """The on-policy batch's teacher signal is the teacher's logits at prompt + sampled answer, predicting each
    sampled token: the same numbers as a forward pass of the teacher over the sampled sequence."""
    teacher = make_tiny("llama", len(tokenizer), seed=3, layers=3)
    student = make_tiny("llama", len(tokenizer), seed=5)
    convs = _convs()[:3]
    got = StudentSampler(student, tokenizer, Rollout(max_new_tokens=10), 256, 0,
                         end_of_turn_ids(tokenizer, student)).sample([0, 1, 2], convs, 0)
    batch = collate(got.encoded, tokenizer.pad_token_id)
    signal = LiveTeacher(teacher, len(tokenizer))(batch, TeacherRequest(pack_length=256)).signal  # (N, V)
    rows = []
    with torch.no_grad():
        for e in got.encoded:
            logits = teacher(torch.tensor([e.input_ids])).logits[0]  # (T, V)
            for pos in range(1, len(e.input_ids)):
                if e.labels[pos] != IGNORE_INDEX:
                    rows.append(logits[pos - 1])
    torch.testing.assert_close(signal, torch.stack(rows), rtol=1e-4, atol=1e-4)
    assert signal.shape[0] == sum(e.num_targets for e in got.encoded) - 0


def test_an_on_policy_step_trains_the_divergence_alone(tokenizer):
    teacher = make_tiny("llama", len(tokenizer), seed=3)
    student = make_tiny("llama", len(tokenizer), seed=5)
    got = StudentSampler(student, tokenizer, Rollout(max_new_tokens=8), 256, 0,
                         end_of_turn_ids(tokenizer, student)).sample([0, 1], _convs()[:2], 0)
    batch = collate(got.encoded, tokenizer.pad_token_id)
    cfg = DistillConfig(teacher="t", student="s", data="d", alpha=0.5, temperature=1.0, pack=False)
    d = Distiller(cfg.trainer_objective(), LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {}, None)
    r = d.step([batch], Progress(0, 10, 5), divergence_only=True)
    assert r["alpha"] == 0.0
    with torch.no_grad():
        s_logits, _ = target_logits(student, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                    len(tokenizer))
        t_logits, targets = target_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          len(tokenizer))
    want = kd_terms(s_logits, t_logits, targets, 0.0, 1.0, "forward_kl")
    assert r["loss"] == pytest.approx(float(want["loss"]) / targets.numel(), rel=1e-4)


def _run(tmp_path, name, t_dir, s_dir, data, **kw):
    out = tmp_path / name
    cfg = DistillConfig(teacher=t_dir, student=s_dir, data=str(data), out=str(out), max_steps=4, batch_size=2,
                        lr=1e-3, warmup_steps=0, log_every=1, seed=0, **kw)
    run_distill(cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return log, load_file(str(out / "model.safetensors"))


def test_lambda_zero_is_the_off_policy_run_exactly(tokenizer, tmp_path, data_file):  # noqa: F811
    t_dir, s_dir = _pair(tmp_path, tokenizer)
    base_log, base_w = _run(tmp_path, "off", t_dir, s_dir, data_file)
    zero_log, zero_w = _run(tmp_path, "zero", t_dir, s_dir, data_file, on_policy=0.0,
                            rollout={"temperature": 0.7, "max_new_tokens": 5})
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("seconds", "target_tokens_per_s")} for r in log]  # noqa: E731
    assert strip(base_log) == strip(zero_log)
    assert base_w.keys() == zero_w.keys() and all(torch.equal(base_w[k], zero_w[k]) for k in base_w)


def test_on_policy_run_logs_generation_and_differs_from_off_policy(tokenizer, tmp_path, data_file):  # noqa: F811
    t_dir, s_dir = _pair(tmp_path, tokenizer)
    off_log, off_w = _run(tmp_path, "off", t_dir, s_dir, data_file)
    on_log, on_w = _run(tmp_path, "on", t_dir, s_dir, data_file, on_policy=1.0, rollout={"max_new_tokens": 6})
    assert all(r["on_policy_steps"] == 1 and 0 < r["gen_tokens"] <= 2 * 6 and r["gen_s"] > 0 for r in on_log)
    assert all(r["alpha"] == 0.0 for r in on_log) and all(r["alpha"] == 0.5 for r in off_log)
    assert any(not torch.equal(off_w[k], on_w[k]) for k in off_w)
    # Reproducible: the same seed samples and trains the same.
    again_log, again_w = _run(tmp_path, "again", t_dir, s_dir, data_file, on_policy=1.0, rollout={"max_new_tokens": 6})
    assert [r["loss"] for r in again_log] == [r["loss"] for r in on_log]
    assert all(torch.equal(again_w[k], on_w[k]) for k in on_w)
    half_log, _ = _run(tmp_path, "half", t_dir, s_dir, data_file, on_policy=0.5, rollout={"max_new_tokens": 6})
    assert [r["on_policy_steps"] for r in half_log] == [int(is_on_policy(0, s, 0.5)) for s in range(4)]


def test_on_policy_needs_a_teacher_not_a_cache(tmp_path):
    with pytest.raises(ValueError, match="needs the teacher"):
        DistillConfig(labels=str(tmp_path), student="s", data="d", on_policy=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DistillConfig(teacher="t", student="s", data="d", on_policy=1.5)
    with pytest.raises(ValueError, match="alignment"):
        DistillConfig(teacher="t", student="s", data="d", on_policy=0.5, hidden_loss="mse")
    assert not DistillConfig(teacher="t", student="s", data="d").on_policy_used
    assert DistillConfig(teacher="t", student="s", data="d",
                         on_policy={"kind": "linear", "start": 0.0, "end": 0.5}).on_policy_used


def test_on_policy_with_a_student_of_another_tokenizer(tmp_path):
    """The teacher reads the sampled answer's text in its own tokenisation; the spans line the two up."""
    from .test_cross_tokenizer import _distill, _tiny_pair
    from .tokenizer_kit import byte_level_bpe, sentencepiece_bpe

    paths = _tiny_pair(tmp_path, (byte_level_bpe(), sentencepiece_bpe()))
    rows = _distill(paths, tmp_path / "on", teacher=paths["teacher"], on_policy=1.0, rollout={"max_new_tokens": 8},
                    temperature=1.0)
    assert all(r["on_policy_steps"] == 1 and r["gen_tokens"] > 0 and r["alpha"] == 0.0 for r in rows)
    assert any(r["soft"] > 0 for r in rows)
