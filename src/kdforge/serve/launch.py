"""Build an engine for a model spec and run the HTTP server (used by ``kdforge serve``/``app``/``chat``)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from kdforge.models.loading import EMBEDDED_PREFIX, end_of_turn_ids, load_model
from kdforge.runtime import BACKENDS, LLAMA_CPP, ONNX_GENAI, TRANSFORMERS, backend_for
from kdforge.serve.engine import BaseEngine

API_KEY_ENV = "KDFORGE_API_KEY"
__all__ = ["API_KEY_ENV", "BACKENDS", "configure_logging", "default_model_name", "load_engine", "run_server"]


def default_model_name(spec: str) -> str:
    """What /v1/models lists: the embedded name, a folder's name, or a GGUF file's stem."""
    if spec.startswith(EMBEDDED_PREFIX):
        return spec[len(EMBEDDED_PREFIX):]
    path = Path(spec).expanduser()
    return path.stem if path.suffix.lower() == ".gguf" else (path.resolve().name or spec)


def load_engine(spec: str, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                max_batch: int = 16, max_model_len: int | None = None, max_tokens_cap: int | None = None,
                trust_remote_code: bool = False) -> BaseEngine:
    """Load the model and start its engine thread.

    The backend is `kdforge.runtime.backend_for`'s choice: ``auto`` picks llama.cpp for a .gguf file
    when ``llama-cpp-python`` is installed, else transformers (which reads GGUF files too,
    dequantized to fp32/bf16); HF folders always run in transformers; a folder with ``genai_config.json``
    (``kdforge export --to onnx``) runs in ONNX Runtime GenAI, one request at a time.
    """
    opts = {"device": device, "dtype": dtype, "max_batch": max_batch, "max_model_len": max_model_len,
            "max_tokens_cap": max_tokens_cap, "trust_remote_code": trust_remote_code}
    resolved = backend_for(spec, backend)
    if resolved not in _ENGINES:
        raise ValueError(f"kdforge serve runs a local model (HF folder, GGUF file, ONNX Runtime GenAI folder, "
                         f"embedded:NAME), not {spec}")
    return _ENGINES[resolved](spec, **opts).start()


def _transformers_engine(spec: str, device: str, dtype: str, max_batch: int, max_model_len: int | None,
                         max_tokens_cap: int | None, trust_remote_code: bool) -> BaseEngine:
    from kdforge.serve.hf import TransformersEngine

    model, tok = load_model(spec, device, dtype, trust_remote_code)
    return TransformersEngine(model, tok, end_of_turn_ids(tok, model), max_batch=max_batch,
                              max_model_len=max_model_len, max_tokens_cap=max_tokens_cap)


def _llama_cpp_engine(spec: str, max_model_len: int | None, max_tokens_cap: int | None, **_: object) -> BaseEngine:
    from kdforge.serve.llamacpp import LlamaCppEngine

    # One sequence at a time on the file's own types and device: max_batch, device and dtype do not apply.
    return LlamaCppEngine.from_gguf(spec, max_model_len=max_model_len, max_tokens_cap=max_tokens_cap)


def _onnx_engine(spec: str, device: str, max_batch: int, max_model_len: int | None, max_tokens_cap: int | None,
                 **_: object) -> BaseEngine:
    from kdforge.serve.onnx import OnnxEngine

    # One sequence at a time on the folder's own types, on the CPU: max_batch and dtype do not apply.
    if max_batch > 1:
        logging.getLogger("kdforge.serve").info(
            "%s: ONNX Runtime GenAI answers one request at a time (max_batch %d does not apply); concurrent "
            "requests queue", spec, max_batch)
    return OnnxEngine.from_folder(spec, max_model_len=max_model_len, max_tokens_cap=max_tokens_cap, device=device)


# The batching engine of each runtime backend (serve's engines keep their own KV caches across steps).
_ENGINES = {TRANSFORMERS: _transformers_engine, LLAMA_CPP: _llama_cpp_engine, ONNX_GENAI: _onnx_engine}


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


def run_server(engine: BaseEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_in_flight: int = 64, aliases: tuple[str, ...] = (),
               in_thread: bool = False, max_body_bytes: int | None = 4 * 1024 * 1024,
               allow_special_tokens: bool = False, max_logprobs: int = 20) -> Any:
    """Serve until interrupted (or, with ``in_thread``, start a daemon thread and return the server).

    ``max_body_bytes``, ``allow_special_tokens`` and ``max_logprobs`` are :func:`kdforge.serve.api.create_app`'s.
    Returns the ``uvicorn.Server``: ``.started`` tells when it listens, ``.should_exit = True`` stops it.
    """
    import uvicorn

    from kdforge.serve.api import create_app

    app = create_app(engine, model_name, api_key=api_key or os.environ.get(API_KEY_ENV) or None,
                     max_in_flight=max_in_flight, aliases=aliases, max_body_bytes=max_body_bytes,
                     allow_special_tokens=allow_special_tokens, max_logprobs=max_logprobs)
    # access_log off: the app's middleware already logs one line per request (with its duration).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning"))
    if in_thread:
        threading.Thread(target=server.run, name="kdforge-http", daemon=True).start()
        return server
    logging.getLogger("kdforge.serve").info("serving '%s' on http://%s:%d/v1 (backend %s)",
                                            model_name, host, port, engine.backend)
    server.run()
    return server
