"""Build an engine for a model spec and run the HTTP server (used by ``kdforge serve``/``app``/``chat``)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from kdforge.export.llamacpp import llama_cpp_available
from kdforge.models.loading import EMBEDDED_PREFIX, end_of_turn_ids, is_gguf_file, load_model
from kdforge.serve.engine import BaseEngine

API_KEY_ENV = "KDFORGE_API_KEY"
BACKENDS = ("auto", "transformers", "llama.cpp")


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

    ``auto`` picks llama.cpp for a .gguf file when ``llama-cpp-python`` is installed, else
    transformers (which reads GGUF files too, dequantized to fp32/bf16).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    if backend == "auto":
        backend = "llama.cpp" if is_gguf_file(spec) and llama_cpp_available() else "transformers"
    if backend == "llama.cpp":
        from kdforge.serve.llamacpp import LlamaCppEngine

        engine: BaseEngine = LlamaCppEngine.from_gguf(spec, max_model_len=max_model_len,
                                                      max_tokens_cap=max_tokens_cap)
    else:
        from kdforge.serve.hf import TransformersEngine

        model, tok = load_model(spec, device, dtype, trust_remote_code)
        engine = TransformersEngine(model, tok, end_of_turn_ids(tok, model), max_batch=max_batch,
                                    max_model_len=max_model_len, max_tokens_cap=max_tokens_cap)
    return engine.start()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


def run_server(engine: BaseEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_in_flight: int = 64, aliases: tuple[str, ...] = (),
               in_thread: bool = False) -> Any:
    """Serve until interrupted (or, with ``in_thread``, start a daemon thread and return the server).

    Returns the ``uvicorn.Server``: ``.started`` tells when it listens, ``.should_exit = True`` stops it.
    """
    import uvicorn

    from kdforge.serve.api import create_app

    app = create_app(engine, model_name, api_key=api_key or os.environ.get(API_KEY_ENV) or None,
                     max_in_flight=max_in_flight, aliases=aliases)
    # access_log off: the app's middleware already logs one line per request (with its duration).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning"))
    if in_thread:
        threading.Thread(target=server.run, name="kdforge-http", daemon=True).start()
        return server
    logging.getLogger("kdforge.serve").info("serving '%s' on http://%s:%d/v1 (backend %s)",
                                            model_name, host, port, engine.backend)
    server.run()
    return server
