"""The real embedded teacher (SmolLM2-135M-Instruct): loads from the installed package, answers sensibly."""

import json

import pytest

from kdforge.stages.generate import GenerateConfig
from kdforge.stages.generate import run as run_generate

pytestmark = pytest.mark.slow


def test_teacher_answers_a_factual_question(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "fr", "prompt": "What is the capital of France? Answer in one sentence."})
                       + "\n" + json.dumps({"id": "add", "prompt": "What is 2 + 3?"}) + "\n")
    m = run_generate(GenerateConfig(model="embedded:smollm2-135m-instruct", prompts=str(prompts),
                                    out=str(tmp_path / "g"), max_new_tokens=32))
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "g" / "data.jsonl").read_text().splitlines())}
    assert "Paris" in recs["fr"]["messages"][-1]["content"]
    assert recs["fr"]["finish_reason"] == "stop" and m["records"] == 2
