"""Model cards: every HF folder kdforge writes carries a README.md with Hub metadata, the teacher, the data and
recipe from the lineage, the latest eval's figures; the chat template in both places; every end-of-turn id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.models.model_card import (
    Card,
    base_models,
    hub_id,
    model_license,
    read_front_matter,
    render_card,
)

from .conftest import make_tiny

pytestmark = pytest.mark.integration

TEACHER_README = "---\nlicense: mit\nbase_model: someorg/tiny-teacher\ntags: [test]\n---\n\n# a tiny teacher\n"


def _front(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def _check_folder(folder: Path, tokenizer_ids: list[int]) -> None:
    """The chat template in both files, equal; generation_config lists every end-of-turn id."""
    jinja = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert jinja and tc["chat_template"] == jinja
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert isinstance(gen["eos_token_id"], list) and set(tokenizer_ids) <= set(gen["eos_token_id"])


def _end_ids(folder: Path) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.models.loading import end_of_turn_ids

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == (folder / "chat_template.jinja").read_text(encoding="utf-8")  # it loads back
    return end_of_turn_ids(tok, AutoModelForCausalLM.from_pretrained(folder))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer):
    """A tiny teacher with a Hub-style README (license, base_model), its answers, a trimmed 1-layer student,
    a short distill run and an eval of the distilled folder."""
    root = tmp_path_factory.mktemp("cardpipe")
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "teacher" / "README.md").write_text(TEACHER_README)
    rows = [{"id": f"t{i}", "prompt": f"Name a colour number {i}.", "split": "train", "category": "demo"}
            for i in range(4)]
    rows += [{"id": f"v{i}", "prompt": f"What is {i} plus {i}?", "split": "validation", "category": "math"}
             for i in range(2)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = str(root / "teacher")
    assert main(["generate", t, "--prompts", str(root / "prompts.jsonl"), "--out", str(root / "gen"),
                 "--max-new-tokens", "6", "--batch-size", "8"]) == 0
    assert main(["student", t, "--out", str(root / "stu"), "--layers", "1", "--trim-vocab", str(root / "gen")]) == 0
    assert main(["distill", "--teacher", t, "--student", str(root / "stu"), "--data", str(root / "gen"),
                 "--out", str(root / "dis"), "--steps", "2", "--batch-size", "2", "--lr", "3e-3",
                 "--set", "log_every=1", "--set", "eval_every=2", "--set", "split=all", "--set", "alpha=0.3",
                 "--set", "temperature=1.5", "--set", "loss=jsd"]) == 0
    return root


def test_student_folder_has_a_card(pipeline):
    stu = pipeline / "stu"
    front = _front(stu)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert front["license"] == "mit"  # the teacher's
    assert front["base_model"] == "someorg/tiny-teacher"  # the teacher's card's base (its path is local)
    assert front["base_model_relation"] == "finetune"
    assert {"distillation", "kdforge", "trimmed-vocabulary", "pruned"} <= set(front["tags"])
    text = (stu / "README.md").read_text()
    assert str(pipeline / "teacher") in text and "method `layers`" in text
    records = len((pipeline / "gen" / "conversations.jsonl").read_text().splitlines()) if (
        pipeline / "gen" / "conversations.jsonl").is_file() else None
    if records is not None:
        assert f"| {records} |" in text
    _check_folder(stu, _end_ids(stu))


def test_distill_folder_has_a_card_with_teacher_recipe_and_figures(pipeline):
    from kdforge.artifacts import file_sha256
    from kdforge.data.formats import data_file

    dis = pipeline / "dis"
    front = _front(dis)
    assert front["license"] == "mit" and front["base_model"] == "someorg/tiny-teacher"
    assert front["base_model_relation"] == "finetune"
    assert {"distillation", "kdforge", "trimmed-vocabulary"} <= set(front["tags"])
    text = (dis / "README.md").read_text()
    assert "## Teacher" in text and str(pipeline / "teacher") in text and str(pipeline / "stu") in text
    assert "the student: method `layers`" in text and "hidden_weight" not in text
    for row in ("| loss | jsd |", "| alpha | 0.3 |", "| temperature | 1.5 |", "| max_steps | 2 |", "| lr | 0.003 |",
                "| batch_size | 2 |"):
        assert row in text, row
    data = data_file(pipeline / "gen")
    n = sum(1 for line in data.read_text().splitlines() if line.strip())
    assert f"| {n} | {file_sha256(data)} |" in text  # the data's record count and hash
    log = [json.loads(x) for x in (dis / "train_log.jsonl").read_text().splitlines()]
    assert f"{log[-1]['loss']:.4g}" in text and "validation kl (step 2)" in text
    assert "No `kdforge eval` has evaluated this folder yet" in text
    assert "kdforge serve" in text and "kdforge export" in text
    _check_folder(dis, _end_ids(dis))


def test_eval_writes_its_figures_into_the_card(pipeline):
    dis, ev = pipeline / "dis", pipeline / "ev"
    meta_before = (dis / "meta.json").read_bytes()
    assert main(["eval", "--teacher", str(pipeline / "teacher"), "--students", str(dis), str(pipeline / "teacher"),
                 "--names", "kd", "again", "--data", str(pipeline / "gen"), "--out", str(ev), "--set", "tasks=false",
                 "--set", "stability_prompts=0", "--set", "speed=false", "--set", "plots=false"]) == 0
    report = json.loads((ev / "report.json").read_text())
    row = next(r for r in report["models"] if r["name"] == "kd")
    text = (dis / "README.md").read_text()
    assert "## Evaluation" in text and str((ev / "report.json").resolve()) in text
    assert f"| KL(teacher ‖ model), nats/token | {row['kl']:.4g} |" in text
    assert f"{row['top1']:.4g}" in text
    assert _front(dis)["license"] == "mit"  # the rest of the card is rebuilt as before
    assert "| loss | jsd |" in text
    assert (dis / "meta.json").read_bytes() == meta_before  # the artifact's identity is unchanged
    assert (pipeline / "teacher" / "README.md").read_text() == TEACHER_README  # not a kdforge folder: untouched


def test_quantize_folder_has_a_card(tokenizer, tmp_path):
    pytest.importorskip("torchao")
    src = tmp_path / "src"
    make_tiny("qwen2", len(tokenizer), seed=6).save_pretrained(src)
    tokenizer.save_pretrained(src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "int8", "--out", str(out), "--set", "check=false"]) == 0
    front = _front(out)
    assert front["license"] == "apache-2.0" and "quantized" in front["tags"] and "base_model" not in front
    gen = json.loads((out / "generation_config.json").read_text())
    assert isinstance(gen["eos_token_id"], list)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == (out / "chat_template.jinja").read_text()


def test_embedded_teachers_licenses_and_hub_ids(embedded_folder):
    assert hub_id("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_license("embedded:smollm2-135m-instruct")[0] == "apache-2.0"
    assert hub_id("embedded:gemma-3-270m") == "google/gemma-3-270m"
    assert model_license("embedded:gemma-3-270m")[0] == "gemma"
    # kdforge's converted folder names its GGUF, whose general.license is read
    assert model_license(str(embedded_folder))[0] == "apache-2.0"
    assert hub_id("/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/abc") \
        == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_models("/no/such/folder") == [] and model_license("/no/such/folder") == (None, None)


def test_unknown_license_is_other_with_a_sentence(tmp_path):
    text = render_card(Card("x", "distill", teacher={"spec": "/tmp/t", "hub_id": None}))
    (tmp_path / "README.md").write_text(text)
    front = read_front_matter(tmp_path)
    assert front["license"] == "other" and "base_model" not in front
    assert front["tags"] == ["distillation", "kdforge"]
    assert "**License:** unknown" in text
    two = render_card(Card("y", "distill", "apache-2.0", base_models=["a/b", "c/d"]))
    (tmp_path / "README.md").write_text(two)
    assert read_front_matter(tmp_path)["base_model"] == ["a/b", "c/d"]


def test_generation_config_lists_every_end_of_turn_id(tokenizer, tmp_path):
    """A tokenizer whose eos is not the chat's end-of-turn marker: both ids stop generation."""
    from kdforge.models.model_card import complete_model_folder

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.eos_token = "<|endoftext|>"
    model = make_tiny("llama", len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = complete_model_folder(tmp_path, tok, model)
    want = {tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>"), 2}
    assert set(ids) == want and len(want) == 2
    _check_folder(tmp_path, sorted(want))
