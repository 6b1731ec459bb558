"""The `serve`, `app` and `chat` subcommands (registered by kdforge.cli; nothing heavy imported here)."""

from __future__ import annotations

import argparse
import os

from kdforge.errors import UserError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file or embedded:smollm2-135m-instruct")
    p.add_argument("--backend", choices=["auto", "transformers", "llama.cpp"], default="auto",
                   help="auto: llama.cpp for .gguf files when llama-cpp-python is installed, else transformers")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=_positive, dest="max_model_len",
                   help="context length (default: the model's)")
    p.add_argument("--max-batch", type=_positive, default=16, dest="max_batch",
                   help="sequences decoded together in one step (default 16)")
    p.add_argument("--model-name", dest="model_name", help="the name clients use (default: from MODEL)")
    p.add_argument("--trust-remote-code", action="store_true", dest="trust_remote_code")


def _chat_flags(p: argparse.ArgumentParser, max_tokens: int = 512) -> None:
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--max-tokens", type=_positive, default=max_tokens, dest="max_tokens")


def add_serving_parsers(sub) -> None:
    """Add `serve`, `app` and `chat` to the `kdforge` subcommand parser."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching); --ui adds a chat page")
    _model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KDFORGE_API_KEY, else none)")
    s.add_argument("--max-in-flight", type=_positive, default=64, dest="max_in_flight",
                   help="requests accepted at once; more get 429 with Retry-After (default 64)")
    s.add_argument("--max-tokens-limit", type=_positive, dest="max_tokens_limit",
                   help="cap every request's max_tokens at this (default: the context)")
    s.add_argument("--ui", action="store_true", help="also open the Gradio chat page (needs kdforge[ui])")
    s.add_argument("--ui-port", type=int, default=7860, dest="ui_port")

    a = sub.add_parser("app", help="Gradio chat page for a model (port 7860; needs kdforge[ui])")
    _model_flags(a)
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=7860)
    a.add_argument("--open", action="store_true", help="open it in the browser")
    _chat_flags(a)

    c = sub.add_parser("chat", help="chat with a model in the terminal (streaming, /reset, /exit)")
    _model_flags(c)
    c.add_argument("--top-p", type=float, default=1.0, dest="top_p")
    c.add_argument("--seed", type=int)
    _chat_flags(c)


def run_serving_command(args: argparse.Namespace) -> int:
    from kdforge.serve.launch import configure_logging, default_model_name, load_engine, run_server

    if args.command in ("app",) or getattr(args, "ui", False):
        from kdforge.serve.ui import _import_gradio

        _import_gradio()  # fail before loading the model if Gradio is missing
    if args.command == "chat" and not 0.0 < args.top_p <= 1.0:
        raise UserError("--top-p must be in (0, 1]")
    if args.command in ("app", "chat") and not 0.0 <= args.temperature <= 2.0:
        raise UserError("--temperature must be in [0, 2]")
    if args.command != "chat":
        configure_logging()
    from kdforge.quiet import quiet_transformers

    quiet_transformers()
    engine = load_engine(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                         max_batch=args.max_batch, max_model_len=args.max_model_len,
                         max_tokens_cap=getattr(args, "max_tokens_limit", None),
                         trust_remote_code=args.trust_remote_code)
    name = args.model_name or default_model_name(args.model)
    try:
        if args.command == "chat":
            from kdforge.serve.chat_cli import run_chat

            run_chat(engine, name, system=args.system or None, temperature=args.temperature, top_p=args.top_p,
                     max_tokens=args.max_tokens, seed=args.seed)
        elif args.command == "app":
            from kdforge.serve.ui import launch_ui

            launch_ui(engine, name, host=args.host, port=args.port, open_browser=args.open, system=args.system,
                      temperature=args.temperature, max_tokens=args.max_tokens)
        else:
            api_key = args.api_key or os.environ.get("KDFORGE_API_KEY") or None
            aliases = (args.model,) if args.model != name else ()
            if args.ui:
                run_server(engine, name, args.host, args.port, api_key, args.max_in_flight, aliases, in_thread=True)
                print(f"[kdforge] API on http://{args.host}:{args.port}/v1, chat page on "
                      f"http://{args.host}:{args.ui_port}", flush=True)
                from kdforge.serve.ui import launch_ui

                launch_ui(engine, name, host=args.host, port=args.ui_port)
            else:
                run_server(engine, name, args.host, args.port, api_key, args.max_in_flight, aliases)
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    return 0
