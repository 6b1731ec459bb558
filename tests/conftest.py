"""Shared fixtures: tiny random Llama and Qwen2 models with the embedded teacher's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

EMBEDDED = "embedded:smollm2-135m-instruct"

# Qwen2.5's ChatML template shape (a default system prompt, <|im_start|>/<|im_end|> turns).
QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded teacher converted to an HF folder (cached across runs in KDFORGE_CACHE)."""
    from kdforge.models.embedded import ensure_embedded_folder

    return ensure_embedded_folder("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(embedded_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_folder)


def make_tiny(arch: str, vocab_size: int, seed: int = 0, layers: int = 2, extra_rows: int = 0):
    """A tiny random model of the given architecture (2 layers, width 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size + extra_rows, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        raise ValueError(arch)
    return model.eval()


def save_tiny(path: Path, arch: str, tokenizer, **kw) -> Path:
    model = make_tiny(arch, len(tokenizer), **kw)
    model.save_pretrained(path)
    tok = tokenizer
    if arch == "qwen2":
        tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tok.chat_template = QWEN_STYLE_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory, tokenizer) -> Path:
    """An HF folder with a tiny random model (Llama: tied embeddings; Qwen2: q/k/v biases, untied)."""
    return save_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """A small mixed-format prompt file with a train/validation split."""
    import json

    rows = [{"id": f"t{i}", "prompt": f"Name a colour number {i}.", "split": "train", "category": "demo"}
            for i in range(6)]
    rows += [{"id": f"v{i}", "prompt": f"What is {i} plus {i}?", "split": "validation", "category": "math"}
             for i in range(3)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_conversations(path: Path, turns: list[tuple[str, str]]) -> Path:
    """A JSONL file of one-turn conversations c0, c1, ... from (user, assistant) pairs."""
    import json

    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for i, (u, a) in enumerate(turns)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kill_when(args: list[str], ready, timeout: float = 120.0, sig: int | None = None) -> int:
    """Start a kdforge command, send it ``sig`` (default SIGKILL) as soon as ``ready()`` is true; its
    return code (-SIGKILL when it was killed, anything else when it ended first)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "kdforge.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL if sig is None else sig)
            break
        time.sleep(0.01)
    proc.wait()
    return proc.returncode

