"""`kdforge serve`, `app` and `chat`: a model behind an OpenAI-compatible API, a browser page, a terminal.

serve: the HTTP API (continuous batching; `--ui` adds the chat page), until interrupted.
app:   the Gradio chat page alone (port 7860; needs kdforge[ui]).
chat:  a streaming chat in the terminal (/reset, /exit).
Each loads the model into an engine (kdforge/serve/launch.py) and hands it to the front end; nothing
is written to disk, so these stages take no --out and are not steps of `kdforge run`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from kdforge.config import Dtype, StageConfig
from kdforge.stages import Stage


class _ModelServing(StageConfig):
    """What every front end needs: the model and how its engine runs."""

    model: str = Field(description="HF folder, .gguf file or embedded:smollm2-135m-instruct")
    backend: Literal["auto", "transformers", "llama.cpp"] = Field(
        "auto", description="auto: llama.cpp for .gguf files when llama-cpp-python is installed, else transformers")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: Dtype = Field("auto", description="weights dtype (auto: fp32 on CPU, bf16 on CUDA)")
    max_model_len: int | None = Field(None, gt=0, description="context length (default: the model's)")
    max_batch: int = Field(16, gt=0, description="sequences decoded together in one step")
    model_name: str | None = Field(None, description="the name clients use (default: from MODEL)")
    trust_remote_code: bool = Field(False, description="allow the model folder's own Python code")


class ServeConfig(_ModelServing):
    """`kdforge serve`: the OpenAI-compatible HTTP API."""

    host: str = Field("127.0.0.1", description="bind address (default 127.0.0.1: this machine only)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1 (default: "
                                "$KDFORGE_API_KEY, else none)")
    max_in_flight: int = Field(64, gt=0, description="requests accepted at once; more get 429 with Retry-After")
    max_tokens_limit: int | None = Field(None, gt=0, description="cap every request's max_tokens at this "
                                         "(default: the context)")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="largest request body accepted; a larger "
                                "one gets 413 before it is parsed")
    allow_special_tokens: bool = Field(False, description="let message content become control tokens "
                                       "(<|im_start|>...): off, a user cannot forge a system turn")
    max_logprobs: int = Field(20, ge=-1, description="the most log-probabilities per position a request may ask "
                              "for (logprobs, prompt_logprobs, top_logprobs), as vLLM's --max-logprobs; -1: the "
                              "whole vocabulary")
    ui: bool = Field(False, description="also open the Gradio chat page (needs kdforge[ui])")
    ui_port: int = Field(7860, ge=0, le=65535, description="port of the chat page (with --ui)")


class _Chatting(_ModelServing):
    system: str = Field("", description="system prompt")
    temperature: float = Field(0.7, ge=0, le=2, description="0 = greedy")
    max_tokens: int = Field(512, gt=0, description="answer length cap in tokens")


class AppConfig(_Chatting):
    """`kdforge app`: the Gradio chat page."""

    host: str = Field("127.0.0.1", description="bind address (default: this machine only)")
    port: int = Field(7860, ge=0, le=65535, description="port of the page")
    open: bool = Field(False, description="open it in the browser")


class ChatConfig(_Chatting):
    """`kdforge chat`: chat in the terminal."""

    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens with "
                         "this much probability")
    seed: int | None = Field(None, description="sampling seed (default: a fresh one per answer)")


@contextlib.contextmanager
def _serving(cfg: _ModelServing, max_tokens_cap: int | None = None) -> Iterator[Any]:
    """The model's engine for the life of a front end: Ctrl-C ends it quietly, and the engine thread is
    always shut down."""
    from kdforge.quiet import quiet_transformers
    from kdforge.serve.launch import load_engine

    quiet_transformers()
    engine = load_engine(cfg.model, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype,
                         max_batch=cfg.max_batch, max_model_len=cfg.max_model_len, max_tokens_cap=max_tokens_cap,
                         trust_remote_code=cfg.trust_remote_code)
    try:
        yield engine
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()


def _name(cfg: _ModelServing) -> str:
    from kdforge.serve.launch import default_model_name

    return cfg.model_name or default_model_name(cfg.model)


def _require_gradio() -> None:
    from kdforge.serve.ui import _import_gradio

    _import_gradio()  # fail before loading the model if Gradio is missing


def run_serve(cfg: ServeConfig) -> int:
    from kdforge.serve.launch import configure_logging, run_server

    if cfg.ui:
        _require_gradio()
    configure_logging()
    name = _name(cfg)
    api_key = cfg.api_key or os.environ.get("KDFORGE_API_KEY") or None
    aliases = (cfg.model,) if cfg.model != name else ()
    with _serving(cfg, cfg.max_tokens_limit) as engine:
        server = dict(host=cfg.host, port=cfg.port, api_key=api_key, max_in_flight=cfg.max_in_flight,
                      aliases=aliases, max_body_bytes=cfg.max_body_bytes,
                      allow_special_tokens=cfg.allow_special_tokens, max_logprobs=cfg.max_logprobs)
        if not cfg.ui:
            run_server(engine, name, **server)
            return 0
        from kdforge.serve.ui import launch_ui

        run_server(engine, name, in_thread=True, **server)
        print(f"[kdforge] API on http://{cfg.host}:{cfg.port}/v1, chat page on "
              f"http://{cfg.host}:{cfg.ui_port}", flush=True)
        launch_ui(engine, name, host=cfg.host, port=cfg.ui_port)
    return 0


def run_app(cfg: AppConfig) -> int:
    from kdforge.serve.launch import configure_logging
    from kdforge.serve.ui import launch_ui

    _require_gradio()
    configure_logging()
    with _serving(cfg) as engine:
        launch_ui(engine, _name(cfg), host=cfg.host, port=cfg.port, open_browser=cfg.open, system=cfg.system,
                  temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    return 0


def run_chat(cfg: ChatConfig) -> int:
    from kdforge.serve.chat_cli import run_chat as chat_loop

    with _serving(cfg) as engine:
        chat_loop(engine, _name(cfg), system=cfg.system or None, temperature=cfg.temperature, top_p=cfg.top_p,
                  max_tokens=cfg.max_tokens, seed=cfg.seed)
    return 0


_MODEL_FLAGS = ("backend", "device", "dtype", "max_model_len", "max_batch", "model_name", "trust_remote_code")
_CHAT_FLAGS = ("system", "temperature", "max_tokens")

STAGES = (
    Stage("serve", "OpenAI-compatible HTTP server (continuous batching); --ui adds a chat page", ServeConfig,
          run_serve, positional="model",
          flags=(*_MODEL_FLAGS, "host", "port", "api_key", "max_in_flight", "max_tokens_limit", "max_body_bytes",
                 "allow_special_tokens", "max_logprobs", "ui", "ui_port"),
          pipeline=False),
    Stage("app", "Gradio chat page for a model (port 7860; needs kdforge[ui])", AppConfig, run_app,
          positional="model", flags=(*_MODEL_FLAGS, "host", "port", "open", *_CHAT_FLAGS), pipeline=False),
    Stage("chat", "chat with a model in the terminal (streaming, /reset, /exit)", ChatConfig, run_chat,
          positional="model", flags=(*_MODEL_FLAGS, "top_p", "seed", *_CHAT_FLAGS), pipeline=False),
)
