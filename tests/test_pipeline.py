"""Each stage end to end through the CLI on tiny random Llama and Qwen2 models."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from kdforge.cli import main

from .conftest import make_tiny

pytestmark = pytest.mark.integration


def test_stages_end_to_end(tiny_model_dir, prompts_file, tmp_path, capsys):
    t, g, s, d, e = (str(tiny_model_dir), tmp_path / "gen", tmp_path / "stu", tmp_path / "dis", tmp_path / "ev")
    assert main(["generate", t, "--prompts", str(prompts_file), "--out", str(g), "--max-new-tokens", "12",
                 "--batch-size", "4"]) == 0
    assert main(["student", t, "--out", str(s), "--num-layers", "1"]) == 0
    smeta = json.loads((s / "meta.json").read_text())
    assert smeta["layer_map"] == {"0": 0} and smeta["metrics"]["student_layers"] == 1
    assert main(["distill", "--teacher", t, "--student", str(s), "--data", str(g), "--out", str(d),
                 "--steps", "6", "--batch-size", "2", "--set", "log_every=2", "--set", "lr=1e-3"]) == 0
    log = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["soft"] >= 0 and r["target_tokens_per_s"] > 0 for r in log)
    dmeta = json.loads((d / "meta.json").read_text())
    assert dmeta["layer_map"] == {"0": 0} and dmeta["parents"]["data"]["meta_sha256"]
    # The distilled student is a plain HF folder that transformers loads and runs.
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 49152
    assert main(["eval", "--teacher", t, "--students", str(s), str(d), "--names", "raw", "kd", "--data", str(g),
                 "--out", str(e), "--set", "decode_tokens=4", "--task-limit", "2", "--set", "stability_prompts=2",
                 "--set", "code_max_new_tokens=8", "--set", "task_max_new_tokens=8",
                 "--set", "stability_max_new_tokens=8"]) == 0
    report = json.loads((e / "report.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"teacher", "raw", "kd"} and report["split"] == "validation"
    assert rows["teacher"]["kl"] == pytest.approx(0, abs=1e-6) and rows["teacher"]["top1"] == 1.0
    assert rows["raw"]["kl"] > 0 and rows["raw"]["decode_tokens_per_s"] > 0
    md = (e / "report.md").read_text()
    assert f"{rows['kd']['kl']:.4f}" in md and "| teacher |" in md
    assert "| kd |" in capsys.readouterr().out


def test_distillation_lowers_kl_on_tiny_teacher(tokenizer, prompts_file, tmp_path):
    """Training signal is real: a 1-layer student gets closer to a confident 2-layer teacher."""
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)  # a random model is near-uniform; make its predictions peaked
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    t, g, s, d, e = (str(tmp_path / "teacher"), tmp_path / "gen", tmp_path / "stu", tmp_path / "dis", tmp_path / "ev")
    assert main(["generate", t, "--prompts", str(prompts_file), "--out", str(g), "--max-new-tokens", "16"]) == 0
    assert main(["student", t, "--out", str(s), "--layers", "1"]) == 0
    assert main(["distill", "--teacher", t, "--student", str(s), "--data", str(g), "--out", str(d),
                 "--steps", "30", "--batch-size", "3", "--lr", "3e-3", "--set", "split=all", "--set", "alpha=0"]) == 0
    assert main(["eval", "--teacher", t, "--students", str(s), str(d), "--data", str(g), "--out", str(e),
                 "--set", "decode_tokens=2", "--set", "tasks=false", "--set", "stability_prompts=0",
                 "--set", "speed=false", "--set", "plots=false"]) == 0
    raw, kd = json.loads((e / "report.json").read_text())["models"][1:]
    assert kd["kl"] < 0.5 * raw["kl"]


def test_run_chains_stages_from_one_yaml(tiny_llama_dir, prompts_file, tmp_path):
    cfg = {
        "generate": {"model": str(tiny_llama_dir), "prompts": str(prompts_file), "out": str(tmp_path / "g"),
                     "max_new_tokens": 6},
        "student": {"teacher": str(tiny_llama_dir), "out": str(tmp_path / "s"), "num_layers": 1},
        "distill": {"teacher": str(tiny_llama_dir), "student": str(tmp_path / "s"), "data": str(tmp_path / "g"),
                    "out": str(tmp_path / "d"), "max_steps": 2},
        # listed before export on purpose: eval runs last, on the file export writes
        "eval": {"teacher": str(tiny_llama_dir), "students": [str(tmp_path / "d"),
                                                              str(tmp_path / "x" / "model-f16.gguf")],
                 "data": str(tmp_path / "g"), "out": str(tmp_path / "e"), "decode_tokens": 2, "tasks": False,
                 "stability_prompts": 0, "speed": False},
        "export": {"model": str(tmp_path / "d"), "quant": ["f16"], "out": str(tmp_path / "x")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--set", "distill.batch_size=2"]) == 0
    assert (tmp_path / "e" / "report.md").is_file()
    rows = {r["name"]: r for r in json.loads((tmp_path / "e" / "report.json").read_text())["models"]}
    assert rows["model-f16"]["kl"] == pytest.approx(rows["d"]["kl"], abs=1e-2)  # the f16 file is the student
    assert yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["batch_size"] == 2


def test_bad_input_is_reported_before_work(tmp_path, capsys, tiny_llama_dir):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"generate": {"model": str(tiny_llama_dir), "out": str(tmp_path / "g")},
                                    "eval": {"teacher": "x", "data": "y", "studnets": []}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "eval.studnets: unknown field" in err
    assert not (tmp_path / "g").exists(), "a stage ran although a later stage's config was invalid"
    assert main(["distill", "--teacher", str(tiny_llama_dir), "--student", str(tiny_llama_dir),
                 "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_incomplete_generate_artifact_is_refused(tiny_llama_dir, prompts_file, tmp_path, capsys):
    g = tmp_path / "g"
    assert main(["generate", str(tiny_llama_dir), "--prompts", str(prompts_file), "--out", str(g),
                 "--max-new-tokens", "2"]) == 0
    (g / "meta.json").unlink()
    assert main(["distill", "--teacher", str(tiny_llama_dir), "--student", str(tiny_llama_dir), "--data", str(g),
                 "--out", str(tmp_path / "d")]) == 2
    assert "incomplete" in capsys.readouterr().err
