"""TAID inside the trainer: t = 1 is the plain objective exactly; t rises over a run and resumes from checkpoints."""

import json

import pytest
import torch

from kdforge.data.batching import collate
from kdforge.data.formats import Conversation
from kdforge.distill.schedules import Progress
from kdforge.distill.taid import TaidCoefficient
from kdforge.distill.teacher_source import LiveTeacher
from kdforge.distill.trainer import Distiller, encode_dataset
from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill

from .conftest import make_tiny
from .test_distill import CONVS, _pair, data_file  # noqa: F401  (the module-scoped data fixture)

pytestmark = pytest.mark.integration


def _grads(tokenizer, taid, loss="forward_kl", temperature=2.0):
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    student = make_tiny("llama", len(tokenizer), seed=2)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS[:4])], 64)
    cfg = DistillConfig(teacher="t", student="s", data="d", alpha=0.3, temperature=temperature, loss=loss)
    d = Distiller(cfg.trainer_objective(),
                  LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {}, None, taid=taid)
    r = d.step([collate(data, tokenizer.pad_token_id)], Progress(0, 10, 5))
    return r, torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_taid_at_one_is_the_plain_objective_exactly(tokenizer, loss):
    plain_r, plain_g = _grads(tokenizer, None, loss)
    coef = TaidCoefficient(t_start=0.4, schedule="linear")
    coef.t = 1.0
    taid_r, taid_g = _grads(tokenizer, coef, loss)
    assert taid_r["loss"] == plain_r["loss"] and torch.equal(taid_g, plain_g)
    low = TaidCoefficient(t_start=0.4, schedule="linear")
    low_r, low_g = _grads(tokenizer, low, loss)
    # At t = 0.4 the target sits between the student and the teacher: a smaller divergence, other gradients.
    assert low_r["soft"] < plain_r["soft"] and not torch.equal(low_g, plain_g)


def test_taid_t_rises_over_a_run_and_resumes(tokenizer, tmp_path, data_file):  # noqa: F811
    t_dir, s_dir = _pair(tmp_path, tokenizer)
    out = tmp_path / "taid"
    cfg = DistillConfig(teacher=t_dir, student=s_dir, data=str(data_file), out=str(out), max_steps=4, batch_size=2,
                        lr=1e-3, warmup_steps=0, log_every=1, save_every=2, temperature=1.0,
                        taid={"schedule": "adaptive", "t_start": 0.2, "alpha": 0.5})
    run_distill(cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    ts = [r["taid_t"] for r in log]
    assert ts[0] == 0.2 and all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] > 0.2
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["taid"]["t"] == ts[2]  # the t the third step used is the one saved after two steps
    # Resumed from step 2, the run repeats steps 3 and 4 with the same t and losses.
    run_distill(cfg, resume=True)
    again = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["taid_t"] for r in again] == ts and [r["loss"] for r in again] == [r["loss"] for r in log]
    with pytest.raises(ValueError, match="schedule"):
        DistillConfig(teacher="t", student="s", data="d", taid={"schedule": "cosine"})
