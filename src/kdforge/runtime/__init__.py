"""One causal-LM interface (`CausalLM`) and its backends: transformers, llama.cpp, ONNX Runtime GenAI, and a
served model.

Stages and components ask for a model by spec::

    with open_model("runs/export/model-q8_0.gguf", backend="auto", threads=2) as lm:
        answers = lm.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0.7), lm.stop_ids(),
                              [make_generator(seed) for seed in seeds])

A spec ``http(s)://host:port/v1[#model-name]`` (several URLs comma-separated) is a model behind a
vLLM-compatible server (`kdforge.runtime.served`; its options, the local ``tokenizer`` first, come as
``open_model(..., served={...})``). A folder holding ``genai_config.json`` (``kdforge export --to onnx``)
runs in ONNX Runtime GenAI (`kdforge.runtime.onnx`, the ``onnx`` extra). Callers never branch on which
backend answered; what differs is a capability on the runtime (``max_batch``, ``hf_model``,
``release_scoring``). Every backend samples with `kdforge.runtime.sampling.sample_token`.
"""

from __future__ import annotations

from typing import Any

from kdforge.config import ConfigError
from kdforge.models.loading import is_gguf_file
from kdforge.runtime.base import LLAMA_CPP, ONNX_GENAI, SERVED, TRANSFORMERS, CausalLM
from kdforge.runtime.llamacpp import INSTALL_HINT, llama_cpp_available
from kdforge.runtime.onnx import INSTALL_HINT as ONNX_INSTALL_HINT
from kdforge.runtime.onnx import is_onnx_folder, onnx_genai_available
from kdforge.runtime.sampling import SamplingParams, make_generator, sample_token
from kdforge.runtime.served import is_served_spec

AUTO = "auto"
BACKENDS = (AUTO, TRANSFORMERS, LLAMA_CPP)

__all__ = ["AUTO", "BACKENDS", "INSTALL_HINT", "LLAMA_CPP", "ONNX_GENAI", "SERVED", "TRANSFORMERS", "CausalLM",
           "SamplingParams", "as_runtime", "backend_for", "is_onnx_folder", "is_served_spec", "llama_cpp_available",
           "make_generator", "onnx_genai_available", "open_model", "runtime_class", "sample_token"]


def backend_for(spec: str, backend: str = AUTO) -> str:
    """The backend a model spec runs on. llama.cpp reads GGUF files only, so HF folders and the
    embedded teacher always run in transformers; a GGUF file runs in llama.cpp when asked, or with
    ``auto`` when llama-cpp-python is installed (else transformers' GGUF loader, dequantised). An
    ``http(s)://`` spec is a served model whatever the backend says (``auto`` or ``transformers``, the
    configs' defaults; ``llama.cpp`` is refused). So is an ONNX Runtime GenAI folder (its
    ``genai_config.json``): nothing else reads it, so ``auto`` and ``transformers`` both mean ONNX Runtime."""
    if backend not in BACKENDS and backend not in (SERVED, ONNX_GENAI):
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if is_served_spec(spec):
        if backend == LLAMA_CPP:
            raise ConfigError(f"{spec} is a served model: backend {LLAMA_CPP} runs local GGUF files only")
        return SERVED
    if backend == SERVED:
        raise ConfigError(f"backend {SERVED} needs an http(s):// model spec, not {spec}")
    if is_onnx_folder(spec):
        if backend == LLAMA_CPP:
            raise ConfigError(f"{spec} is an ONNX Runtime GenAI folder: backend {LLAMA_CPP} runs GGUF files only")
        if not onnx_genai_available():
            raise ConfigError(f"{spec} is an ONNX Runtime GenAI folder; running it needs {ONNX_INSTALL_HINT}")
        return ONNX_GENAI
    if backend == ONNX_GENAI:
        raise ConfigError(f"backend {ONNX_GENAI} needs an ONNX Runtime GenAI folder (genai_config.json), not {spec}")
    if not is_gguf_file(spec) or backend == TRANSFORMERS:
        return TRANSFORMERS
    installed = llama_cpp_available()
    if backend == LLAMA_CPP and not installed:
        raise ConfigError(f"backend {LLAMA_CPP} for {spec} needs llama-cpp-python: {INSTALL_HINT}, "
                          f"or use backend {TRANSFORMERS}")
    return LLAMA_CPP if installed else TRANSFORMERS


def runtime_class(backend: str) -> type[CausalLM]:
    """The runtime type of a resolved backend name (imported on first use: transformers is heavy)."""
    if backend == TRANSFORMERS:
        from kdforge.runtime.transformers import TransformersRuntime

        return TransformersRuntime
    if backend == LLAMA_CPP:
        from kdforge.runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime
    if backend == ONNX_GENAI:
        from kdforge.runtime.onnx import OnnxRuntime

        return OnnxRuntime
    if backend == SERVED:
        from kdforge.runtime.served import ServedRuntime

        return ServedRuntime
    raise ConfigError(f"no runtime named {backend!r}; choose one of {', '.join(BACKENDS[1:])}")


def open_model(spec: str, backend: str = AUTO, device: str = "auto", dtype: str = "auto", threads: int | None = None,
               context: int | None = None, trust_remote_code: bool = False,
               placement: dict[str, Any] | None = None, served: dict[str, Any] | None = None) -> CausalLM:
    """Load ``spec`` (HF folder, .gguf file, ``embedded:NAME``, ``http(s)://...``) in the backend
    `backend_for` picks.

    ``device``/``dtype``/``trust_remote_code`` apply to transformers; ``threads`` (default: torch's)
    and ``context`` (the decoder's tokens per sequence, default 4096; 0: the model's own) to llama.cpp.
    ``placement``: `kdforge.models.loading.load_model`'s precision / device_map / max_memory /
    offload_folder (transformers; llama.cpp refuses them), e.g. ``TeacherPlacement.load_kwargs()``
    less device and dtype. ``served``: a served model's options (`ServedRuntime.load`: ``tokenizer``,
    ``max_in_flight``, ``timeout``, ``retries``, ``backoff``); other runtimes ignore them.
    """
    resolved = backend_for(spec, backend)
    if resolved == SERVED:
        return runtime_class(SERVED).load(spec, trust_remote_code=trust_remote_code, placement=placement,
                                          **(served or {}))
    return runtime_class(resolved).load(spec, device=device, dtype=dtype, threads=threads, context=context,
                                        trust_remote_code=trust_remote_code, placement=placement)


def as_runtime(model: Any, tokenizer: Any = None) -> CausalLM:
    """``model`` itself if it is a runtime, else a loaded transformers module wrapped as one (so code
    holding a bare ``PreTrainedModel``, e.g. a training loop's student, can call runtime code)."""
    if isinstance(model, CausalLM):
        return model
    from kdforge.runtime.transformers import TransformersRuntime

    return TransformersRuntime(model, tokenizer)
