"""The HTTP routes: thin functions over a :class:`ServedModel` (the engine and the names it answers to).

A route checks the model name, turns the request into prompt ids and :class:`SamplingParams`, submits them
and answers with the collected text or, for ``stream: true``, server-sent events (:mod:`kdforge.serve.streaming`).

Chat templating, tokenization and the echo's decoding run in a worker thread (``asyncio.to_thread``), never
on the event loop, so one client's long prompt cannot stall another's stream or ``/health``; a prompt with
more characters than the context could hold in tokens is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBearer

from kdforge.data.chat import encode_prompt
from kdforge.runtime.sampling import SamplingParams
from kdforge.serve.engine import BaseEngine, ContextLengthExceeded, GenerationHandle, Output
from kdforge.serve.errors import ERROR_RESPONSES, APIError
from kdforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
)
from kdforge.serve.streaming import (
    CompletionLogprobTracker,
    chat_events,
    completion_events,
    event_stream,
    usage_of,
)

# A streamed answer is a 200 too, as server-sent events: the schema says so.
_STREAMED = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}}


@dataclass
class ServedModel:
    """The engine behind the routes, the names it answers to, and its admission limit.

    Building one touches nothing on the engine (the schema tests build the app over ``None``).
    """

    engine: BaseEngine
    name: str
    aliases: tuple[str, ...] = ()
    max_in_flight: int = 64
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's timestamp
    allow_special_tokens: bool = False  # message content may become control tokens (off: always text)

    def check_model(self, name: str) -> None:
        if name != self.name and name not in self.aliases:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.name}'.",
                           "not_found_error", "model", "model_not_found")

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string's length bounds it from above)."""
        try:
            return max(1, max((len(t) for t in self.engine.tokenizer.get_vocab()), default=1))
        except Exception:  # a tokenizer without get_vocab: no pre-check
            return 1 << 30

    def check_length(self, chars: int, param: str) -> None:
        """A prompt of ``chars`` characters is at least chars / max_token_chars tokens: refuse, without
        tokenizing, what cannot fit the context in any case."""
        context = self.engine.context_length
        if chars > context * self.max_token_chars:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                           f"{param} hold {chars} characters, more than {context} tokens can cover. Shorten it.",
                           param=param, code="context_length_exceeded")

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The conversation through the model's chat template, ending in the assistant's turn."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        self.check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            prompt_ids = encode_prompt(self.engine.tokenizer, messages,
                                       allow_special_tokens=self.allow_special_tokens)
        except Exception as e:  # a template that rejects this conversation (roles, order) or odd text
            raise APIError(400, f"could not apply the model's chat template: {e}", param="messages") from None
        if not prompt_ids:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        return prompt_ids

    def completion_prompt(self, body: CompletionRequest) -> tuple[list[int], str | list[int]]:
        """The prompt's ids, and the prompt itself (one string, or token ids) for ``echo``."""
        tokenizer = self.engine.tokenizer
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            self.check_length(len(prompt), "prompt")
            try:
                prompt_ids = tokenizer(prompt)["input_ids"]
            except Exception as e:
                raise APIError(400, f"could not tokenize the prompt: {e}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        if not prompt_ids:
            # As OpenAI does, an empty prompt means "start of a document": begin from BOS (or EOS).
            start = tokenizer.bos_token_id
            start = tokenizer.eos_token_id if start is None else start
            if start is None:
                raise APIError(400, "the prompt is empty", param="prompt")
            prompt_ids = [start]
        return prompt_ids, prompt

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
                 requested: int | None, prompt_param: str) -> SamplingParams:
        """The request's sampling parameters, with OpenAI's defaults and max_tokens fitted to the context."""
        try:
            max_tokens = self.engine.resolve_max_tokens(len(prompt_ids), requested)
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
        )

    def submit(self, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None) -> GenerationHandle:
        """Admission: past ``max_in_flight`` requests a 429 (with Retry-After), else into the engine's queue."""
        if self.engine.num_in_flight >= self.max_in_flight:
            raise APIError(429, f"The server is busy ({self.max_in_flight} requests in flight); retry shortly.",
                           "server_busy", code="too_many_requests", headers={"Retry-After": "1"})
        return self.engine.submit(prompt_ids, params, logprobs=logprobs)


def build_router(served: ServedModel) -> APIRouter:
    """``/health``, ``/v1/models[/{id}]``, ``/v1/chat/completions`` and ``/v1/completions`` over ``served``."""
    router = APIRouter()
    bearer = [Depends(HTTPBearer(auto_error=False))]  # documents the bearer scheme; the middleware checks it

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        engine = served.engine
        return Health(model=served.name, backend=engine.backend, active=engine.num_active,
                      waiting=engine.num_waiting)

    @router.get("/v1/models", response_model=ModelList, dependencies=bearer, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[served.card()])

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=bearer,
                responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> ModelCard:
        served.check_model(model_id)
        return served.card()

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=bearer,
                 responses=_STREAMED)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> ChatCompletionResponse | StreamingResponse:
        served.check_model(body.model)
        prompt_ids = await asyncio.to_thread(served.chat_prompt, body)
        requested = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        handle = served.submit(prompt_ids, served.sampling(body, prompt_ids, requested, "messages"), top)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return event_stream(chat_events(handle, rid, now, body.model, _include_usage(body)))
        text, last, entries = await _collect(handle, request)
        logprobs = ChoiceLogprobs(content=entries) if entries is not None else None
        message = AssistantMessage(content=text)
        return ChatCompletionResponse(
            id=rid, created=now, model=body.model,
            choices=[ChatChoice(index=0, message=message, finish_reason=last.finish_reason, logprobs=logprobs)],
            usage=usage_of(last),
        )

    @router.post("/v1/completions", response_model=CompletionResponse, dependencies=bearer, responses=_STREAMED)
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
        served.check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "logprobs with echo are not supported: the prompt's log-probabilities are not "
                           "computed", param="logprobs", code="unsupported_parameter")
        prompt_ids, prompt = await asyncio.to_thread(served.completion_prompt, body)
        handle = served.submit(prompt_ids, served.sampling(body, prompt_ids, body.max_tokens, "prompt"),
                               body.logprobs)
        prefix = ""
        if body.echo:
            prefix = prompt if isinstance(prompt, str) else await asyncio.to_thread(
                served.engine.tokenizer.decode, prompt_ids)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        tracker = CompletionLogprobTracker(len(prefix)) if body.logprobs is not None else None
        if body.stream:
            return event_stream(completion_events(handle, rid, now, body.model, _include_usage(body), prefix,
                                                  tracker))
        text, last, entries = await _collect(handle, request)
        logprobs = tracker.render(entries or []) if tracker is not None else None
        return CompletionResponse(
            id=rid, created=now, model=body.model,
            choices=[CompletionChoice(index=0, text=prefix + text, finish_reason=last.finish_reason,
                                      logprobs=logprobs)],
            usage=usage_of(last),
        )

    return router


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _cancel_on_disconnect(request: Request, handle: GenerationHandle) -> None:
    """The body is read, so the next ASGI message is the client going away: stop its generation."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _collect(handle: GenerationHandle, request: Request) -> tuple[str, Output, list[dict] | None]:
    """The whole answer of a non-streamed request, its last :class:`Output` (finish reason, usage) and,
    when asked for, every token's logprob entry."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    parts: list[str] = []
    entries: list[dict] | None = [] if handle.logprobs is not None else None
    last = Output("")
    try:
        async for out in handle:
            parts.append(out.text)
            if entries is not None and out.logprobs:
                entries.extend(out.logprobs)
            last = out
    finally:
        watcher.cancel()
        handle.cancel()  # no-op when finished; stops the engine if this task itself was cancelled
    if last.finish_reason == "error":
        raise APIError(500, f"generation failed: {last.error}", "server_error")
    if last.finish_reason == "cancelled":  # the client has gone; this answer reaches nobody (nginx's 499)
        raise APIError(499, "the client closed the request", code="client_closed_request")
    return "".join(parts), last, entries
