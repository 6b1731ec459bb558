"""`kdforge student` methods on tiny Llama and Qwen2 teachers: exactness, loading, importance."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill
from kdforge.stages.student import StudentConfig
from kdforge.stages.student import run as run_student

from .conftest import make_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(params=["llama", "qwen2"])
def teacher_dir(request, tmp_path, tokenizer):
    model = make_tiny(request.param, len(tokenizer), seed=5, layers=4)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def _logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


def build(teacher_dir, tmp_path, name, **kw):
    out = tmp_path / name
    metrics = run_student(StudentConfig(teacher=str(teacher_dir), out=str(out), calibration_samples=8, **kw))
    return out, metrics, json.loads((out / "meta.json").read_text())


def test_width_method_keeping_everything_is_the_teacher_exactly(teacher_dir, tmp_path):
    out, _, meta = build(teacher_dir, tmp_path, "w", method="width")
    ids = torch.randint(0, 1000, (2, 11))
    assert torch.equal(_logits(out, ids), _logits(teacher_dir, ids))
    assert len(meta["importance"]["block_influence"]) == 4


def test_width_pruned_student_loads_in_plain_transformers(teacher_dir, tmp_path):
    out, m, meta = build(teacher_dir, tmp_path, "w", method="width", hidden_size=48, intermediate_size=96,
                         num_attention_heads=2, num_key_value_heads=1, num_layers=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) \
        == (48, 96, 2, 1, 3)
    assert m["student_params"] < m["teacher_params"]
    logits = model(torch.randint(0, 1000, (1, 7))).logits
    assert logits.shape == (1, 7, model.config.vocab_size) and torch.isfinite(logits).all()
    # The kept layers are the three with the highest block influence.
    bi = meta["importance"]["block_influence"]
    assert meta["kept_teacher_layers"] == sorted(sorted(range(4), key=lambda i: -bi[i])[:3])


def test_depth_pruned_student_keeps_high_influence_layers(teacher_dir, tmp_path):
    out, m, meta = build(teacher_dir, tmp_path, "d", method="depth", num_layers=2)
    bi = meta["importance"]["block_influence"]
    assert all(x >= 0 for x in bi) and meta["layer_map"] == {"0": meta["kept_teacher_layers"][0],
                                                             "1": meta["kept_teacher_layers"][1]}
    assert min(bi[i] for i in meta["kept_teacher_layers"]) >= max(
        bi[i] for i in range(4) if i not in meta["kept_teacher_layers"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("init", ["slice", "random"])
def test_fresh_smaller_config(teacher_dir, tmp_path, init):
    # The published shape change 1280/24/20 -> 768/12/12, scaled down: 64/4/4 -> 32/2/2 (head size kept).
    out, m, _ = build(teacher_dir, tmp_path, "f", method="fresh", init=init, hidden_size=32, num_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (32, 2, 2)
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 5))).logits).all()
    if init == "slice":
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight,
                                   teacher.model.layers[3].mlp.up_proj.weight[:64, :32])


def test_bad_width_request_is_a_clear_error(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of KV heads"):
        build(teacher_dir, tmp_path, "x", method="width", num_attention_heads=3, num_key_value_heads=2)
    assert not (tmp_path / "x").exists()


def test_width_pruned_student_distils_with_hidden_projection(tokenizer, tmp_path, teacher_dir):
    out, _, _ = build(teacher_dir, tmp_path, "w", method="width", hidden_size=32, intermediate_size=64)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i}! " * (i + 1)}]}) + "\n"
                            for i in range(4)))
    m = run_distill(DistillConfig(teacher=str(teacher_dir), student=str(out), data=str(data), out=str(tmp_path / "o"),
                                  max_steps=3, batch_size=2, hidden_loss="cosine", attention_loss="kl", log_every=1))
    assert m["final"]["hidden"] > 0 and m["final"]["attention"] > 0
