"""kdforge.runtime: one sampler for every backend, greedy answers of one GGUF file in transformers and
in llama.cpp, the backend choice, and the interface's small parts (top-k, batch limits)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from kdforge.config import ConfigError
from kdforge.data.chat import encode_conversation, render
from kdforge.eval.generation import Sampling, generate_texts
from kdforge.models.loading import ModelLoadError
from kdforge.runtime import BACKENDS, LLAMA_CPP, TRANSFORMERS, as_runtime, backend_for, open_model, runtime_class
from kdforge.runtime.sampling import SamplingParams, make_generator
from kdforge.runtime.transformers import TransformersRuntime

from .conftest import make_tiny
from .test_eval_llamacpp import _FakeLM

PROMPTS = ["Name a colour.", "What is 2 plus 2?", "Write a short line about cats and dogs."]


def _prompt_ids(tokenizer) -> list[list[int]]:
    texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _peaked(model, scale: float = 40.0):
    """A random tiny model's logits are nearly flat (std ~0.16 over 49k tokens): at temperature 0.9 the
    nucleus holds almost all of them, and their sort order flips on the ~1e-7 float noise between a
    batched KV-cache forward and a full one, so no two forward paths could sample alike. Scaling the
    final norm scales the logits (std ~6): only clearly separated tokens compete, as in a trained model."""
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return model


def test_seeded_sampling_is_the_same_on_every_backend(tokenizer):
    """The same seeded request through the transformers runtime (batched HF generate, kdforge's sampler
    in a logits processor) and through the llama.cpp runtime's decode loop (llama.cpp replaced by the
    same HF model) draws the same tokens; another seed draws others."""
    model = _peaked(make_tiny("qwen2", len(tokenizer), seed=3))  # untied: a tied one repeats its input
    hf, cpp = TransformersRuntime(model, tokenizer), _FakeLM(model)
    ids, stop = _prompt_ids(tokenizer), hf.stop_ids()
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9)
    drawn = {}
    for seed in (10, 11):
        for name, lm in (("hf", hf), ("cpp", cpp)):
            # Each prompt twice: rows of one batch with their own generators must not share draws.
            rows = [i for i in ids for _ in range(2)]
            gens = [make_generator(seed * 100 + r) for r in range(len(rows))]
            drawn[name, seed] = lm.generate(rows, params, stop, gens, batch_size=len(rows), vocab=len(tokenizer))
        assert drawn["hf", seed] == drawn["cpp", seed]
        assert sum(map(len, drawn["hf", seed])) > 20
    assert drawn["hf", 10] != drawn["hf", 11]
    # transformers' own sampler, seeded the usual way, draws other tokens: the equality above is
    # kdforge's sampler at work, not a coincidence of the two paths.
    torch.manual_seed(10)
    own = model.generate(input_ids=torch.tensor([ids[0]]), max_new_tokens=8, do_sample=True, temperature=0.9,
                         top_p=0.9, top_k=0, pad_token_id=tokenizer.pad_token_id)[0, len(ids[0]):].tolist()
    assert own != drawn["hf", 10][0]


def test_eval_stability_samples_alike_on_both_backends(tokenizer):
    """generate_texts (the stability probe) gives the same sampled answers from both runtimes."""
    model = _peaked(make_tiny("qwen2", len(tokenizer), seed=4))
    s = Sampling(temperature=0.9, top_p=0.9, seed=7)
    a = generate_texts(model, tokenizer, PROMPTS, 6, batch_size=4, sampling=s, num_samples=2)
    assert a == generate_texts(_FakeLM(model), tokenizer, PROMPTS, 6, sampling=s, num_samples=2)
    assert any(len(set(x)) > 1 for x in a)  # the samples of a prompt differ


def test_greedy_stays_plain_greedy_generate(tokenizer):
    """Temperature 0 runs transformers' greedy search untouched (bit-identical answers to before)."""
    model = make_tiny("qwen2", len(tokenizer), seed=5)
    ids = _prompt_ids(tokenizer)
    got = TransformersRuntime(model, tokenizer).generate(ids[:1], SamplingParams(max_tokens=6, temperature=0),
                                                         [tokenizer.eos_token_id])
    ref = model.generate(input_ids=torch.tensor([ids[0]]), max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids[0]):].tolist()
    assert got[0] == ref[:len(got[0])] and got[0]


def test_greedy_answers_of_a_gguf_file_match_across_runtimes(tokenizer, tmp_path, monkeypatch):
    """One F32 GGUF file: transformers' GGUF loader and llama.cpp itself give the same greedy answers.

    llama.cpp keeps an f16 KV cache, so its logits differ from transformers' by float noise (<1e-4 on
    this model); the smallest top-1 margin along these answers is ~1.8e-3, so no step is a near-tie.
    (Scaling the final norm would not widen that gap: it scales the noise with the logits.)
    """
    pytest.importorskip("llama_cpp")  # optional extra: kdforge[llamacpp]
    import kdforge.models.loading as loading
    from kdforge.export.gguf_writer import write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(make_tiny("qwen2", len(tokenizer), seed=1), tokenizer, path, "f32")
    # The file's tokenizer is the fixture's; skip transformers' slow GGUF tokenizer conversion.
    monkeypatch.setattr(loading, "load_tokenizer", lambda spec, trust_remote_code=False: tokenizer)
    params = SamplingParams(max_tokens=16, temperature=0)
    ids = _prompt_ids(tokenizer)
    with open_model(str(path), TRANSFORMERS) as hf, open_model(str(path), LLAMA_CPP, threads=1) as cpp:
        assert (hf.backend, cpp.backend) == (TRANSFORMERS, LLAMA_CPP)
        stop = hf.stop_ids(tokenizer)
        answers = hf.generate(ids, params, stop, batch_size=1)
        assert answers == cpp.generate(ids, params, stop, vocab=len(tokenizer))
        assert all(len(a) == 16 for a in answers)
        assert cpp.num_parameters() == hf.num_parameters()
        assert cpp.decode_speed(ids[0], 4, repeats=1)["decode_tokens_per_s"] > 0
        with pytest.raises(ValueError, match="at most 1 sequence"):
            cpp.decode_speed(ids[0], 4, batch=2)


def test_backend_choice(monkeypatch):
    assert BACKENDS == ("auto", TRANSFORMERS, LLAMA_CPP)
    assert backend_for("runs/distill", LLAMA_CPP) == TRANSFORMERS  # llama.cpp reads GGUF files only
    assert backend_for("embedded:smollm2-135m-instruct", "auto") == TRANSFORMERS
    assert backend_for("m.gguf", TRANSFORMERS) == TRANSFORMERS
    with pytest.raises(ConfigError, match="backend must be one of"):
        backend_for("m.gguf", "vllm")
    assert runtime_class(TRANSFORMERS).hf_model and not runtime_class(LLAMA_CPP).hf_model
    assert runtime_class(LLAMA_CPP).max_batch == 1
    if importlib.util.find_spec("llama_cpp") is not None:
        assert backend_for("m.gguf", "auto") == backend_for("m.gguf", LLAMA_CPP) == LLAMA_CPP
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # llama-cpp-python not installed
    assert backend_for("m.gguf", "auto") == TRANSFORMERS
    with pytest.raises(ConfigError, match="llama-cpp-python"):
        backend_for("m.gguf", LLAMA_CPP)


def test_missing_llama_cpp_is_a_clear_error(monkeypatch):
    from kdforge.runtime.llamacpp import LlamaCppRuntime

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))  # installed, but broken
    with pytest.raises(ModelLoadError, match="llama-cpp-python"):
        LlamaCppRuntime.load("x.gguf")


def test_topk_logprobs_and_as_runtime(tokenizer):
    model = make_tiny("llama", len(tokenizer), seed=2)
    lm = as_runtime(model, tokenizer)
    assert as_runtime(lm) is lm and lm.vocab_rows == len(tokenizer)
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]
    e = encode_conversation(tokenizer, conv)
    args = (torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids), dtype=torch.long), torch.tensor([e.labels]))
    logits = lm.target_logits(*args, len(tokenizer))  # (N, V)
    values, ids = lm.topk_logprobs(*args, len(tokenizer), k=5)  # (N, 5) each
    assert values.shape == ids.shape == (logits.shape[0], 5) and logits.shape[0] == e.num_targets
    assert torch.equal(ids[:, 0], logits.argmax(-1))
    assert torch.allclose(values, torch.log_softmax(logits.float(), -1).gather(1, ids))
