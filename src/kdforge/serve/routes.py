"""The HTTP routes: thin functions over a :class:`ServedModel` (the engine and the names it answers to).

A route checks the model name, turns the request into prompt ids and :class:`SamplingParams`, submits them
and answers with the collected text or, for ``stream: true``, server-sent events (:mod:`kdforge.serve.streaming`).

Chat templating, tokenization and the echo's decoding run in a worker thread (``asyncio.to_thread``), never
on the event loop, so one client's long prompt cannot stall another's stream or ``/health``; a prompt with
more characters than the context could hold in tokens is refused before it is tokenized.

vLLM's side of the protocol (what a teacher client and lm-evaluation-harness send): ``/v1/completions``
takes several prompts (texts or token-id lists, a choice each), ``prompt_logprobs``, ``echo`` with
``logprobs`` (the prompt's tokens scored), ``max_tokens: 0`` with echo, ``return_tokens_as_token_ids``,
every log-probability count capped by ``max_logprobs`` with vLLM's message; ``/tokenize``,
``/detokenize`` and ``/tokenizer_info`` answer in vLLM's shapes. Prompt log-probabilities come from one
scoring pass of the engine (:meth:`BaseEngine.score`); when at most one token is generated it is sampled
from that same pass.
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

from kdforge.data.chat import encode_conversation, encode_prompt
from kdforge.runtime.sampling import SamplingParams
from kdforge.serve.detokenize import TokenPieces
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
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    Usage,
)
from kdforge.serve.scoring import PromptScores, ScoringUnavailable, prompt_entries, vllm_prompt_logprobs
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
    max_logprobs: int = 20  # the most log-probabilities per position a request may ask for (-1: no cap), as vLLM

    def check_model(self, name: str | None) -> None:
        if name is None:  # /tokenize and /detokenize may leave it out (vLLM: the served model)
            return
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

    def chat_prompt(self, body: ChatCompletionRequest | TokenizeRequest) -> list[int]:
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

    @cached_property
    def pieces(self) -> TokenPieces:
        """Token id -> (text, bytes), for the log-probability entries the routes build (cached per id)."""
        return TokenPieces(self.engine.tokenizer)

    def logprob_count(self, value: int | None, kind: str, param: str) -> int | None:
        """A request's log-probability count (-1: the whole vocabulary) checked against ``max_logprobs``,
        with vLLM's message when it is over."""
        if value is None:
            return None
        vocab = len(self.engine.tokenizer)
        count = vocab if value == -1 else value
        cap = vocab if self.max_logprobs == -1 else self.max_logprobs
        if count > cap:
            raise APIError(400, f"Requested {kind} logprobs of {count}, which is greater than max allowed: {cap}",
                           param=param, code="invalid_value")
        return min(count, vocab)

    @staticmethod
    def split_prompts(body: CompletionRequest) -> list[str | list[int]]:
        """The request's prompts: one text, one token-id list, a list holding one text, or a list of token-id
        lists (a choice each; what teacher clients and lm-eval send)."""
        prompt = body.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]
        if isinstance(prompt[0], str) and len(prompt) > 1:
            raise APIError(400, "several text prompts in one request are not supported: send them as token-id "
                           "lists (a list of lists of ints; /tokenize gives the ids) or one request per text",
                           param="prompt")
        return list(prompt)

    def completion_prompt(self, body: CompletionRequest, prompt: str | list[int] | None = None
                          ) -> tuple[list[int], str | list[int]]:
        """A prompt's ids (default: the request's only prompt), and the prompt itself (a string, or token
        ids) for ``echo``."""
        tokenizer = self.engine.tokenizer
        if prompt is None:
            prompts = self.split_prompts(body)
            if len(prompts) != 1:
                raise APIError(400, "expected one prompt", param="prompt")
            prompt = prompts[0]
        if isinstance(prompt, str):
            self.check_length(len(prompt), "prompt")
            try:
                prompt_ids = tokenizer(prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
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

    def admit(self, n: int = 1) -> None:
        """Admission of a request of ``n`` prompts: past ``max_in_flight`` a 429 (with Retry-After)."""
        if n > self.max_in_flight:  # could never be admitted: not "busy", too big
            raise APIError(400, f"{n} prompts in one request; this server takes at most {self.max_in_flight} "
                           "(--max-in-flight)", param="prompt")
        if self.engine.num_in_flight + n > self.max_in_flight:
            raise APIError(429, f"The server is busy ({self.max_in_flight} requests in flight); retry shortly.",
                           "server_busy", code="too_many_requests", headers={"Retry-After": "1"})

    def submit(self, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None,
               admitted: bool = False) -> GenerationHandle:
        """Into the engine's queue, after admission (unless the request was ``admitted`` as a whole)."""
        if not admitted:
            self.admit()
        return self.engine.submit(prompt_ids, params, logprobs=logprobs)

    def score(self, prompts: list[list[int]], top: int, params: list[SamplingParams] | None,
              logprobs: int | None) -> tuple[asyncio.Future, list[GenerationHandle]]:
        """The engine's scoring pass over ``prompts`` (and their one-token answers with ``params``)."""
        try:
            future, handles = self.engine.score(prompts, top, params, logprobs)
        except ScoringUnavailable as e:
            raise APIError(400, f"prompt log-probabilities are not available: {e}", param="prompt_logprobs",
                           code="unsupported_parameter") from None
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        return asyncio.wrap_future(future), handles

    # ---- /tokenize, /detokenize ----------------------------------------------------------------------
    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either 'prompt' (a text) or 'messages' (a conversation)", param="prompt")
        tokenizer = self.engine.tokenizer
        if body.prompt is not None:
            self.check_length(len(body.prompt), "prompt")
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            try:
                ids = list(tokenizer(body.prompt, add_special_tokens=add_special)["input_ids"])
            except Exception as e:
                raise APIError(400, f"could not tokenize the prompt: {e}", param="prompt") from None
        else:
            if body.add_special_tokens:
                # The template writes the special tokens; adding more would tokenize another text than
                # /v1/chat/completions does.
                raise APIError(400, "add_special_tokens with messages is not supported: the chat template "
                               "adds the model's special tokens", param="add_special_tokens")
            if body.add_generation_prompt:
                ids = self.chat_prompt(body)  # exactly what /v1/chat/completions would run
            else:
                messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in body.messages]
                self.check_length(sum(len(m["content"]) for m in messages), "messages")
                try:
                    ids = encode_conversation(tokenizer, messages,
                                              allow_special_tokens=self.allow_special_tokens).input_ids
                except Exception as e:
                    raise APIError(400, f"could not apply the model's chat template: {e}",
                                   param="messages") from None
        # As vLLM: the vocabulary's own strings (byte-level BPE writes a space as "Ġ").
        strs = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.context_length, tokens=ids,
                                token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        vocab = len(self.engine.tokenizer)
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(body.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        tok = self.engine.tokenizer

        def text(name: str) -> str | None:
            value = getattr(tok, name, None)
            return None if value is None else str(value)

        template = getattr(tok, "chat_template", None)
        return TokenizerInfo(tokenizer_class=type(tok).__name__, bos_token=text("bos_token"),
                             eos_token=text("eos_token"), pad_token=text("pad_token"), unk_token=text("unk_token"),
                             chat_template=template if isinstance(template, str) else None,
                             model_max_length=self.engine.context_length,
                             add_bos_token=getattr(tok, "add_bos_token", None))


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
        top = served.logprob_count(body.top_logprobs or 0, "sample", "top_logprobs") if body.logprobs else None
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
        # Every check that needs no tokenization first: a refused request costs nothing.
        sample_top = served.logprob_count(body.logprobs, "sample", "logprobs")
        prompt_top = served.logprob_count(body.prompt_logprobs, "prompt", "prompt_logprobs")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (the prompt scored, nothing generated)",
                           param="max_tokens")
        raw_prompts = served.split_prompts(body)
        if body.stream and len(raw_prompts) > 1:
            raise APIError(400, "streaming is supported for one prompt per request; send stream: false or one "
                           "request per prompt", param="stream")
        if body.stream and prompt_top is not None:
            raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        served.admit(len(raw_prompts))
        prompts = await asyncio.to_thread(lambda: [served.completion_prompt(body, p) for p in raw_prompts])
        ids = [p for p, _ in prompts]

        # What to compute. With echo, logprobs cover the prompt's tokens too (vLLM then also returns them
        # as prompt_logprobs, with the logprobs count); they come from one scoring pass, as prompt_logprobs do.
        echo_scored = body.echo and sample_top is not None
        shown_top = prompt_top if prompt_top is not None else (sample_top if echo_scored else None)
        generate = body.max_tokens != 0
        params = [served.sampling(body, p, body.max_tokens, "prompt") for p in ids] if generate else None
        future = None
        handles: list[GenerationHandle] = []
        if shown_top is not None:
            top = max(shown_top, sample_top or 0)
            one_token = params is not None and all(p.max_tokens == 1 for p in params)
            # At most one token each: sampled from the scoring pass. Longer answers: generated as usual (the
            # prompt then runs twice, once scored and once prefilled).
            future, handles = served.score(ids, top, params if one_token else None, sample_top if one_token else None)
            if params is not None and not one_token:
                handles = [served.submit(p, pp, sample_top, admitted=True) for p, pp in zip(ids, params)]
        elif params is not None:
            handles = [served.submit(p, pp, sample_top, admitted=True) for p, pp in zip(ids, params)]

        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefixes = [""] * len(ids)
        if body.echo:
            prefixes = await asyncio.to_thread(lambda: [
                prompt if isinstance(prompt, str) else served.engine.tokenizer.decode(p) for p, prompt in prompts])
        try:
            scores = await _scores(future) if future is not None else None
        except BaseException:
            for handle in handles:  # the answer cannot be sent: stop generating it
                handle.cancel()
            raise
        if body.stream:
            entries = prompt_entries(scores[0], sample_top, served.pieces) if echo_scored else None
            # Offsets count from the echoed text's start: through its token entries, or past it.
            tracker = (CompletionLogprobTracker(0 if echo_scored else len(prefixes[0]),
                                                as_ids=body.return_tokens_as_token_ids)
                       if sample_top is not None else None)
            return event_stream(completion_events(handles[0] if handles else None, rid, now, body.model,
                                                  _include_usage(body), prefixes[0], tracker, entries, len(ids[0])))
        results = await _collect_all(handles, request) if handles else [("", None, None)] * len(ids)

        def choices() -> list[CompletionChoice]:  # in a worker thread: a long prompt's entries take a while
            out = []
            for i, (text, last, generated) in enumerate(results):
                logprobs = None
                if sample_top is not None:
                    entries = prompt_entries(scores[i], sample_top, served.pieces) if echo_scored else []
                    tracker = CompletionLogprobTracker(0 if echo_scored else len(prefixes[i]),
                                                       as_ids=body.return_tokens_as_token_ids)
                    logprobs = tracker.render(entries + (generated or []))
                shown = vllm_prompt_logprobs(scores[i], shown_top, served.pieces) if shown_top is not None else None
                out.append(CompletionChoice(index=i, text=prefixes[i] + text, logprobs=logprobs,
                                            finish_reason=last.finish_reason if last is not None else "length",
                                            prompt_logprobs=shown))
            return out

        prompt_tokens = sum(len(p) for p in ids)
        completion_tokens = sum(last.completion_tokens for _, last, _ in results if last is not None)
        return CompletionResponse(id=rid, created=now, model=body.model, choices=await asyncio.to_thread(choices),
                                  usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))

    # ---- vLLM's tokenizer endpoints (outside /v1, as vLLM has them; the API key applies all the same) ----
    @router.post("/tokenize", response_model=TokenizeResponse, dependencies=bearer, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        served.check_model(body.model)
        return await asyncio.to_thread(served.tokenize, body)

    @router.post("/detokenize", response_model=DetokenizeResponse, dependencies=bearer, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        served.check_model(body.model)
        return await asyncio.to_thread(served.detokenize, body)

    @router.get("/tokenizer_info", response_model=TokenizerInfo, dependencies=bearer, responses=ERROR_RESPONSES)
    async def tokenizer_info() -> TokenizerInfo:
        return served.tokenizer_info()

    return router


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _cancel_on_disconnect(request: Request, handles: list[GenerationHandle]) -> None:
    """The body is read, so the next ASGI message is the client going away: stop its generations."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for handle in handles:
                handle.cancel()
            return


async def _drain(handle: GenerationHandle) -> tuple[str, Output, list[dict] | None]:
    parts: list[str] = []
    entries: list[dict] | None = [] if handle.logprobs is not None else None
    last = Output("")
    async for out in handle:
        parts.append(out.text)
        if entries is not None and out.logprobs:
            entries.extend(out.logprobs)
        last = out
    return "".join(parts), last, entries


async def _collect_all(handles: list[GenerationHandle], request: Request
                       ) -> list[tuple[str, Output, list[dict] | None]]:
    """The whole answers of a non-streamed request's generations: text, last :class:`Output` (finish reason,
    usage) and, when asked for, every token's logprob entry. One watcher cancels them all if the client goes."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
    try:
        results = await asyncio.gather(*(_drain(h) for h in handles))
    finally:
        watcher.cancel()
        for handle in handles:
            handle.cancel()  # no-op when finished; stops the engine if this task itself was cancelled
    for _, last, _ in results:
        if last.finish_reason == "error":
            raise APIError(500, f"generation failed: {last.error}", "server_error")
    if any(last.finish_reason == "cancelled" for _, last, _ in results):
        # The client has gone; this answer reaches nobody (nginx's 499).
        raise APIError(499, "the client closed the request", code="client_closed_request")
    return list(results)


async def _collect(handle: GenerationHandle, request: Request) -> tuple[str, Output, list[dict] | None]:
    """One generation's whole answer (see :func:`_collect_all`)."""
    return (await _collect_all([handle], request))[0]


async def _scores(future: asyncio.Future) -> list[PromptScores]:
    """A scoring job's result; a backend that cannot score is the client's 400, a failed pass a 500."""
    try:
        return await future
    except ScoringUnavailable as e:
        raise APIError(400, f"prompt log-probabilities are not available: {e}", param="prompt_logprobs",
                       code="unsupported_parameter") from None
    except Exception as e:
        raise APIError(500, f"scoring failed: {type(e).__name__}: {e}", "server_error") from None
