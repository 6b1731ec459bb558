"""`kdforge eval` with GGUF students run by llama.cpp: the adapter's logits at target positions, its
generation, the choice of backend, and (where llama-cpp-python is installed) a whole report."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from kdforge.config import ConfigError
from kdforge.data.chat import encode_conversation
from kdforge.eval.generation import Sampling, generate_texts
from kdforge.runtime import backend_for
from kdforge.runtime.llamacpp import LlamaCppRuntime
from kdforge.scoring import agreement

from .conftest import make_tiny


class _HFAsLlamaCpp:
    """What llama-cpp-python's ``Llama`` offers the runtime (reset, eval, scores, n_ctx, n_vocab),
    computed by an HF model on the whole sequence held."""

    def __init__(self, model, n_ctx: int = 512) -> None:
        self.model, self._n_ctx = model, n_ctx
        self.ids: list[int] = []

    @property
    def scores(self) -> np.ndarray:  # (T, V) at every position held
        with torch.no_grad():
            return self.model(torch.tensor([self.ids])).logits[0].numpy()

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self.model.config.vocab_size

    def reset(self) -> None:
        self.ids = []

    def eval(self, ids) -> None:
        self.ids += list(ids)

    def close(self) -> None:
        pass


class _FakeLM(LlamaCppRuntime):
    """The llama.cpp runtime with llama.cpp replaced by an HF model: every line of kdforge's own code runs."""

    def __init__(self, model) -> None:
        super().__init__("fake.gguf", threads=1)
        self._llm = _HFAsLlamaCpp(model)

    def _open(self, n_ctx: int, logits_all: bool = False, vocab_only: bool = False):
        return self._llm

    def _read_last(self, llm) -> np.ndarray:
        return llm.scores[-1]


def _conversations(tokenizer, n: int = 5):
    convs = [[{"role": "user", "content": f"Question {i}?" + " more" * i},
              {"role": "assistant", "content": "An answer " * (i + 1)}] for i in range(n)]
    return [encode_conversation(tokenizer, c) for c in convs]


def test_target_logits_line_up_with_the_packed_forward(tokenizer):
    """Agreement through the adapter (one unpadded sequence at a time, rows picked by the target
    mask) equals agreement through the HF model itself (padded, packed batches)."""
    teacher, student = make_tiny("llama", len(tokenizer), seed=1), make_tiny("llama", len(tokenizer), seed=2)
    data = _conversations(tokenizer)
    ref = agreement(teacher, [teacher, student], data, tokenizer.pad_token_id, len(tokenizer), batch_size=2)
    got = agreement(teacher, [teacher, _FakeLM(student)], data, tokenizer.pad_token_id, len(tokenizer), batch_size=2)
    for r, g in zip(ref, got):
        for k in ("nll", "kl", "top1"):
            assert g[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6)
        assert g["tokens"] == r["tokens"] > 0
    assert ref[1]["kl"] > 0.01  # a different model: a wrong row order could not match by accident


def test_generation_matches_the_hf_path(tokenizer):
    student = make_tiny("llama", len(tokenizer), seed=2)
    prompts = ["Name a colour.", "What is 2 plus 2?", "Write a short line about cats and dogs."]
    fake = _FakeLM(student)
    assert generate_texts(fake, tokenizer, prompts, 6) == generate_texts(student, tokenizer, prompts, 6, batch_size=1)
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=3)
    a = generate_texts(fake, tokenizer, prompts, 6, sampling=sampling, num_samples=3)
    assert a == generate_texts(fake, tokenizer, prompts, 6, sampling=sampling, num_samples=3)  # seeded
    assert [len(x) for x in a] == [3, 3, 3]
    assert any(len(set(x)) > 1 for x in a)  # samples of one prompt differ


def test_backend_choice(monkeypatch):
    assert backend_for("runs/distill", "llama.cpp") == "transformers"  # HF folders always run in transformers
    assert backend_for("embedded:smollm2-135m-instruct", "llama.cpp") == "transformers"
    assert backend_for("m.gguf", "transformers") == "transformers"
    with pytest.raises(ConfigError, match="backend must be one of"):
        backend_for("m.gguf", "vllm")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # llama-cpp-python not installed
    assert backend_for("m.gguf", "auto") == "transformers"
    with pytest.raises(ConfigError, match="llama-cpp-python"):
        backend_for("m.gguf", "llama.cpp")


def test_eval_runs_a_gguf_student_in_llama_cpp(tiny_model_dir, tmp_path):
    """The whole report with the student's F32 GGUF in llama.cpp: it agrees with its HF source, its
    runtime is recorded, and its speed was measured in llama.cpp (batch 1 only)."""
    pytest.importorskip("llama_cpp")  # optional extra: kdforge[llamacpp]
    from kdforge.cli import main

    assert main(["export", str(tiny_model_dir), "--quant", "f32", "--out", str(tmp_path / "gguf"), "--no-check"]) == 0
    gguf_file = next((tmp_path / "gguf").glob("*.gguf"))
    rows = [{"id": f"v{i}", "prompt": f"What is {i} plus {i}?", "split": "validation", "category": "math"}
            for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--out", str(tmp_path / "gen"), "--max-new-tokens", "6"]) == 0
    assert main(["eval", "--teacher", str(tiny_model_dir), "--students", str(tiny_model_dir), str(gguf_file),
                 "--names", "hf", "cpp", "--data", str(tmp_path / "gen"), "--out", str(tmp_path / "ev"),
                 "--backend", "llama.cpp", "--task-limit", "1", "--set", "task_max_new_tokens=4",
                 "--set", "code_max_new_tokens=4", "--set", "stability_prompts=1", "--set", "stability_samples=2",
                 "--set", "stability_max_new_tokens=4", "--set", "decode_tokens=4", "--set", "speed_batch=2",
                 "--set", "threads=1", "--set", "plots=false"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    hf, cpp = report["models"][1], report["models"][2]
    assert (hf["backend"], cpp["backend"]) == ("transformers", "llama.cpp")
    # F32 weights, but llama.cpp keeps an f16 KV cache: a near-tie of the random model may flip.
    assert cpp["top1"] >= 0.95 and cpp["kl"] < 1e-3 and abs(cpp["nll"] - hf["nll"]) < 1e-2
    assert cpp["params_m"] == pytest.approx(hf["params_m"], rel=0.01)
    assert cpp["speed"]["decode_tokens_per_s_b1"] > 0 and cpp["speed"]["decode_tokens_per_s_bn"] is None
    assert "| cpp | llama.cpp |" in (tmp_path / "ev" / "report.md").read_text()
