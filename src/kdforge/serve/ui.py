"""`kdforge app MODEL` / `kdforge serve MODEL --ui`: a Gradio chat page (port 7860 by default).

It talks to the engine in this process (not through HTTP), streams each answer, keeps the
multi-turn history, and has a system prompt, temperature and max-tokens control. Gradio is an
optional extra (``pip install 'kdforge[ui]'``), imported only here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from kdforge.data.chat import encode_prompt
from kdforge.errors import UserError
from kdforge.runtime.sampling import SamplingParams
from kdforge.serve.engine import BaseEngine, ContextLengthExceeded


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise UserError("the chat UI needs Gradio: pip install 'kdforge[ui]' (or pip install gradio)") from None
    return gr


def _text(content: Any) -> str:
    """Gradio hands content as a string, a dict {"text"/"value": ...} or a list of such parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("value", "")) or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return "" if content is None else str(content)


def history_messages(history: list, system: str | None, message: Any) -> list[dict]:
    """Gradio's history (message dicts, or [user, bot] pairs in old versions) -> OpenAI messages."""
    msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    for turn in history or []:
        if isinstance(turn, dict):
            if turn.get("role") in ("user", "assistant"):
                msgs.append({"role": turn["role"], "content": _text(turn.get("content"))})
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            msgs += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    msgs.append({"role": "user", "content": _text(message)})
    return msgs


def respond_stream(engine: BaseEngine, message: Any, history: list, system: str, temperature: float,
                   max_tokens: int) -> Iterator[str]:
    """Yield the growing answer; closing the generator (Gradio's stop button) cancels it."""
    prompt = encode_prompt(engine.tokenizer, history_messages(history, system, message))
    try:
        limit = engine.resolve_max_tokens(len(prompt), None)
    except ContextLengthExceeded as e:
        yield f"⚠️ {e} Clear the conversation to continue."
        return
    handle = engine.submit(prompt, SamplingParams(max_tokens=max(1, min(int(max_tokens), limit)),
                                                  temperature=float(temperature)))
    text = ""
    try:
        for delta in handle:
            text += delta.text
            if delta.finish_reason == "error":
                text += f"\n\n⚠️ generation failed: {delta.error}"
            yield text
    finally:
        handle.cancel()


def build_ui(engine: BaseEngine, model_name: str, system: str = "", temperature: float = 0.7,
             max_tokens: int = 512) -> Any:
    """A ``gr.ChatInterface`` over ``engine`` (not launched)."""
    gr = _import_gradio()

    def respond(message, history, system_prompt, temp, max_new):
        yield from respond_stream(engine, message, history, system_prompt, temp, max_new)

    kwargs: dict[str, Any] = {}
    if "type" in inspect.signature(gr.ChatInterface.__init__).parameters:  # Gradio 4/5; 6 has messages only
        kwargs["type"] = "messages"
    return gr.ChatInterface(
        respond,
        title=f"kdforge · {model_name}",
        description="Answers stream from the model served in this process. History is kept until you clear it.",
        additional_inputs=[
            gr.Textbox(value=system, label="System prompt", lines=2),
            gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(1, min(4096, engine.context_length), value=min(max_tokens, engine.context_length), step=1,
                      label="Max tokens"),
        ],
        **kwargs,
    )


def launch_ui(engine: BaseEngine, model_name: str, host: str = "127.0.0.1", port: int = 7860,
              open_browser: bool = False, **kwargs: Any) -> None:
    ui = build_ui(engine, model_name, **kwargs)
    ui.queue(default_concurrency_limit=engine.max_batch)  # concurrent chats share decode steps
    ui.launch(server_name=host, server_port=port, inbrowser=open_browser)
