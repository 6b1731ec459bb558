"""Server-sent events for a streamed answer: one generator, rendered as chat or as text completion chunks.

:func:`sse_events` walks an engine's :class:`Output` deltas in OpenAI's event order; :func:`chat_events` and
:func:`completion_events` only say how one chunk looks and what is sent first:

* chat: the role chunk (content ``""``), content chunks, one finish chunk, [usage chunk], ``[DONE]``;
* completions: [the echoed prompt, with its tokens' log-probabilities when asked for], text chunks, the
  finish chunk (carrying the last text), [usage chunk], ``[DONE]``; with ``max_tokens: 0`` the echoed
  prompt is the finish chunk.

With log-probabilities asked for, each chunk carries the entries of the tokens whose text it carries
(a token held back as part of a character rides with the chunk that completes it).

An engine error sends an error event, then ``[DONE]``; a cancelled request (the client left) gets no finish
chunk.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from kdforge.serve.engine import GenerationHandle, Output
from kdforge.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    Usage,
)

# (text, finish_reason, usage, logprob entries or None) -> one "data: ..." event. A chunk with usage
# carries no choice (OpenAI's final usage chunk has "choices": []).
ChunkRenderer = Callable[[str, str | None, Usage | None, list[dict] | None], str]

DONE = "data: [DONE]\n\n"


def usage_of(out: Output) -> Usage:
    """The usage block of a finished request (its last :class:`Output`)."""
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                 total_tokens=out.prompt_tokens + out.completion_tokens)


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and X-Accel-Buffering: no keep proxies (nginx) from holding chunks back.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class CompletionLogprobTracker:
    """Engine logprob entries -> the text completions (legacy) shape, with ``text_offset`` counted across
    the chunks of one answer (from ``start``: 0, or the length of an echoed prompt whose tokens are not
    among the entries).

    Each position's ``top_logprobs`` holds the token itself first, then its alternatives (OpenAI's "up to
    logprobs + 1"; vLLM's order); an echoed prompt's first token has None. ``as_ids``: tokens are written
    ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``), so tokens with the same text stay apart.
    """

    def __init__(self, start: int = 0, as_ids: bool = False) -> None:
        self._chars = start  # characters of the answer so far (a token's partial bytes count once complete)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.as_ids = as_ids

    def _name(self, entry: dict) -> str:
        return f"token_id:{entry['id']}" if self.as_ids else entry["token"]

    def render(self, entries: list[dict]) -> CompletionLogprobs:
        offsets = []
        for e in entries:
            offsets.append(self._chars)
            self._chars += len(self._decoder.decode(bytes(e["bytes"] or [])))
        tops: list[dict[str, float] | None] = []
        for e in entries:
            if e["top_logprobs"] is None:
                tops.append(None)
                continue
            top = {self._name(e): e["logprob"]}
            for t in e["top_logprobs"]:
                top.setdefault(self._name(t), t["logprob"])
            tops.append(top)
        return CompletionLogprobs(tokens=[self._name(e) for e in entries],
                                  token_logprobs=[e["logprob"] for e in entries], top_logprobs=tops,
                                  text_offset=offsets)


def _event(body_json: str) -> str:
    return f"data: {body_json}\n\n"


def _error_event(out: Output) -> str:
    body = ErrorResponse(error={"message": f"generation failed: {out.error}", "type": "server_error"})
    return _event(body.model_dump_json())


def chat_events(handle: GenerationHandle, rid: str, created: int, model: str,
                include_usage: bool) -> AsyncIterator[str]:
    """Role chunk, content chunks, one finish chunk, [usage chunk], [DONE] (OpenAI's order)."""
    exclude = None if include_usage else {"usage"}  # without include_usage no chunk carries a usage key

    def event(delta: DeltaMessage, finish: str | None = None, usage: Usage | None = None,
              logprobs: list[dict] | None = None) -> str:
        lp = ChoiceLogprobs(content=logprobs) if logprobs is not None else None
        choices = [] if usage is not None else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish,
                                                                logprobs=lp)]
        body = ChatCompletionChunk(id=rid, created=created, model=model, usage=usage, choices=choices)
        return _event(body.model_dump_json(exclude=exclude))

    def chunk(text: str, finish: str | None, usage: Usage | None, logprobs: list[dict] | None) -> str:
        # The finish chunk's delta is empty (content null): its text went out in a content chunk before it.
        return event(DeltaMessage(content=text or None), finish, usage, logprobs)

    return sse_events(handle, chunk, include_usage, first=event(DeltaMessage(role="assistant", content="")))


def completion_events(handle: GenerationHandle | None, rid: str, created: int, model: str, include_usage: bool,
                      prefix: str = "", logprobs: CompletionLogprobTracker | None = None,
                      prefix_entries: list[dict] | None = None, prompt_tokens: int = 0) -> AsyncIterator[str]:
    """[The echoed prompt ``prefix`` and its tokens' ``prefix_entries``], text chunks, the finish chunk with the
    last text, [usage chunk], [DONE]. ``handle`` None (``max_tokens: 0``): the echo is the finish chunk (its
    usage: ``prompt_tokens``, no completion)."""
    # No chunk carries a usage key without include_usage; prompt_logprobs are never streamed (vLLM's rule).
    exclude: dict = {"choices": {"__all__": {"prompt_logprobs"}}}
    if not include_usage:
        exclude["usage"] = True

    def chunk(text: str, finish: str | None, usage: Usage | None, entries: list[dict] | None) -> str:
        # Each chunk is a whole completion body, as OpenAI streams them.
        lp = logprobs.render(entries or []) if logprobs is not None and usage is None and (text or entries) else None
        choices = [] if usage is not None else [CompletionChoice(index=0, text=text, finish_reason=finish,
                                                                 logprobs=lp)]
        body = CompletionResponse(id=rid, created=created, model=model, usage=usage, choices=choices)
        return _event(body.model_dump_json(exclude=exclude))

    if handle is None:
        return _echo_only(chunk, prefix, prefix_entries, include_usage, prompt_tokens)
    first = chunk(prefix, None, None, prefix_entries) if prefix or prefix_entries else None
    return sse_events(handle, chunk, include_usage, first=first, text_in_finish=True)


async def _echo_only(chunk: ChunkRenderer, prefix: str, entries: list[dict] | None, include_usage: bool,
                     prompt_tokens: int) -> AsyncIterator[str]:
    yield chunk(prefix, "length", None, entries)
    if include_usage:
        yield chunk("", None, Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens),
                    None)
    yield DONE


async def sse_events(handle: GenerationHandle, chunk: ChunkRenderer, include_usage: bool, first: str | None = None,
                     text_in_finish: bool = False) -> AsyncIterator[str]:
    """``first`` (if any), a chunk per delta, the finish chunk, [the usage chunk], ``[DONE]``.

    ``text_in_finish``: the last delta's text rides in the finish chunk (completions) instead of a content
    chunk of its own before it (chat).
    """
    try:
        if first:
            yield first
        async for out in handle:
            if out.finish_reason == "error":
                yield _error_event(out)
                break  # the stream still ends with [DONE], so clients stop reading
            finished = out.finish_reason in ("stop", "length")
            entries = out.logprobs
            if out.text and not (finished and text_in_finish):
                yield chunk(out.text, None, None, entries)
                entries = None  # sent with the text
            if finished:
                yield chunk(out.text if text_in_finish else "", out.finish_reason, None, entries)
                if include_usage:
                    yield chunk("", None, usage_of(out), None)
        yield DONE
    finally:
        handle.cancel()  # the client went away (Starlette cancels this generator): free the batch row
