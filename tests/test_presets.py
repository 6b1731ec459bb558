"""The Qwen2.5 presets (configs/qwen2.5-*.yaml): each validates as shipped, and runs end to end with 2 processes
(torchrun over gloo) on tiny random Qwen2 stand-ins: biases, grouped-query attention, and an embedding padded past
the tokenizer (as Qwen2.5's 151,936 rows for 151,665 tokens). Only paths and sizes are overridden; the recipe
(losses, schedules, strategy, precision, device map, checkpointing) runs as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.stages import plan_file

from .conftest import save_tiny, write_conversations
from .test_distributed_distill import torchrun

CONFIGS = Path(__file__).parent.parent / "configs"
PRESETS = ["qwen2.5-72b-to-7b", "qwen2.5-3b-to-1.5b", "qwen2.5-0.5b-to-150m"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_names_its_hardware(name):
    path = CONFIGS / f"{name}.yaml"
    plan = plan_file(str(path))
    stages = {s.name: c for s, c in plan}
    assert "label" in stages and "distill" in stages
    distill = stages["distill"]
    assert distill.labels == stages["label"].out  # labels cached first, training reads them
    assert distill.max_length == stages["label"].max_length
    text = path.read_text()
    assert "Hardware" in text and "kdforge plan" in text
    if name != "qwen2.5-0.5b-to-150m":
        assert distill.distributed.strategy == "fsdp" and distill.gradient_checkpointing
        assert distill.global_batch_size % distill.batch_size == 0


def test_72b_preset_is_the_seed_recipe():
    stages = {s.name: c for s, c in plan_file(str(CONFIGS / "qwen2.5-72b-to-7b.yaml"))}
    d = stages["distill"]
    assert (d.global_batch_size, d.lr, d.max_length, d.alpha.value) == (128, 5e-5, 4096, 0.3)
    assert (d.temperature.start, d.temperature.end) == (6.0, 1.0)
    assert d.lr_schedule == "cosine" and d.warmup_steps > 0


@pytest.fixture(scope="module")
def standins(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("presets")
    data = write_conversations(root / "data.jsonl", [
        (f"Give me fact number {i}.", f"Fact {i}: {i} squared is {i * i}." + " Really." * (i % 2)) for i in range(8)])
    # 14 layers: the 0.5B preset aligns student layer 6 with teacher layer 12.
    teacher = save_tiny(root / "teacher", "qwen2", tokenizer, layers=14, extra_rows=37)
    student = save_tiny(root / "student", "qwen2", tokenizer, seed=1, layers=2, extra_rows=37)
    return root, teacher, student, data


SHRINK = ["--set", "label.max_length=96", "--set", "distill.max_length=96", "--set", "distill.pack_length=96",
          "--set", "distill.max_steps=3", "--set", "distill.batch_size=1", "--set", "distill.global_batch_size=4",
          "--set", "distill.warmup_steps=1", "--set", "distill.save_every=2", "--set", "label.batch_size=2",
          "--set", "label.shard_size=2", "--set", "distill.log_every=1"]
STUDENT_SIZES = ["--set", "student.num_layers=8", "--set", "student.hidden_size=32",
                 "--set", "student.num_attention_heads=2", "--set", "student.num_key_value_heads=1",
                 "--set", "student.intermediate_size=64"]


@pytest.mark.integration
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_with_two_processes_on_standins(standins, name):
    root, teacher, student, data = standins
    out = root / name
    args = ["run", str(CONFIGS / f"{name}.yaml"), "--set", f"vars.teacher={teacher}",
            "--set", f"vars.student={student}", "--set", f"vars.data={data}", "--set", f"vars.out={out}", *SHRINK]
    if name == "qwen2.5-0.5b-to-150m":
        args += STUDENT_SIZES
    r = torchrun(args, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    meta = json.loads((out / "distill" / "meta.json").read_text())
    assert meta["metrics"]["world_size"] == 2 and meta["metrics"]["global_batch_size"] == 4
    log = [json.loads(x) for x in (out / "distill" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and all(row["loss"] == row["loss"] for row in log)  # no NaN
    if name == "qwen2.5-0.5b-to-150m":
        assert all(row["hidden"] > 0 for row in log)  # the layer 6 <-> 12 cosine is trained
    from kdforge.softlabels.reader import SoftLabelCache

    assert len(SoftLabelCache(str(out / "labels")).rows()) == 8  # every conversation labelled once
    assert (out / "distill" / "model.safetensors").is_file()
