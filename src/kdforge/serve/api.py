"""The OpenAI-compatible HTTP app: thin routes over an engine.

Routes validate and tokenize, submit to the engine and turn its :class:`Output` deltas into OpenAI
bodies or server-sent events. Every error leaves as ``{"error": {"message", "type", "param",
"code"}}``; bad input is a 4xx, never a 500. A pure ASGI middleware checks the optional API key and
logs one line per request (written when the response, streamed or not, has been sent).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdforge import __version__
from kdforge.data.chat import encode_prompt
from kdforge.serve.engine import BaseEngine, ContextLengthExceeded, GenerationHandle, Output
from kdforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Usage,
)
from kdforge.serve.sampling import SamplingParams

log = logging.getLogger("kdforge.serve")


class APIError(Exception):
    """An error the client caused (or a busy server), rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429)}


class _AuthAndLog:
    """ASGI middleware: bearer-token check on /v1 routes, one log line per request."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [0]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1") and not self._authorized(scope):
                resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %s %.1fms', client[0], scope["method"], scope["path"], status[0] or "-",
                     (time.perf_counter() - t0) * 1000)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key)
        return False


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if tuple(first.get("loc", ())) == ("body",):
        return "The request body must be a JSON object (sent with Content-Type: application/json).", None
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


def create_app(engine: BaseEngine, model_name: str, api_key: str | None = None, max_in_flight: int = 64,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name`` (also answering to ``aliases``)."""
    app = FastAPI(title="kdforge", version=__version__,
                  description="OpenAI-compatible chat and text completions served by kdforge.")
    names = {model_name, *aliases}
    created = int(time.time())
    bearer = [Depends(HTTPBearer(auto_error=False))]  # documents the bearer scheme; checked in middleware

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value" if param else "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")

    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           "not_found_error", "model", "model_not_found")

    def sampling(body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
                 requested: int | None, prompt_param: str) -> SamplingParams:
        try:
            max_tokens = engine.resolve_max_tokens(len(prompt_ids), requested)
        except ContextLengthExceeded as e:
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
        )

    def submit(prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        if engine.num_in_flight >= max_in_flight:
            raise APIError(429, f"The server is busy ({max_in_flight} requests in flight); retry shortly.",
                           "server_busy", code="too_many_requests", headers={"Retry-After": "1"})
        return engine.submit(prompt_ids, params)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=model_name, backend=engine.backend, active=engine.num_active, waiting=engine.num_waiting)

    @app.get("/v1/models", response_model=ModelList, dependencies=bearer, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=bearer, responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_name, created=created)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=bearer,
              responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_ids = encode_prompt(engine.tokenizer, messages)
        except Exception as e:  # a template that rejects this conversation (roles, order) or odd text
            raise APIError(400, f"could not apply the model's chat template: {e}", param="messages") from None
        if not prompt_ids:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        requested = body.max_completion_tokens or body.max_tokens
        handle = submit(prompt_ids, sampling(body, prompt_ids, requested, "messages"))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_events(handle, rid, now, body.model, usage))
        text, last = await _collect(handle, request)
        return ChatCompletionResponse(
            id=rid, created=now, model=body.model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=last.finish_reason)],
            usage=_usage(last),
        )

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=bearer,
              responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                prompt_ids = engine.tokenizer(prompt)["input_ids"]
            except Exception as e:
                raise APIError(400, f"could not tokenize the prompt: {e}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
            vocab = len(engine.tokenizer)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        if not prompt_ids:
            # As OpenAI does, an empty prompt means "start of a document": begin from BOS (or EOS).
            start = engine.tokenizer.bos_token_id
            start = engine.tokenizer.eos_token_id if start is None else start
            if start is None:
                raise APIError(400, "the prompt is empty", param="prompt")
            prompt_ids = [start]
        handle = submit(prompt_ids, sampling(body, prompt_ids, body.max_tokens, "prompt"))
        prefix = ""
        if body.echo:
            prefix = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt_ids)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_events(handle, rid, now, body.model, usage, prefix))
        text, last = await _collect(handle, request)
        return CompletionResponse(
            id=rid, created=now, model=body.model,
            choices=[CompletionChoice(index=0, text=prefix + text, finish_reason=last.finish_reason)],
            usage=_usage(last),
        )

    def openapi() -> dict[str, Any]:
        # Validation failures answer 400 (as OpenAI does), not FastAPI's default 422: say so.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", {"description": "Bad Request", "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(_AuthAndLog, api_key=api_key)
    app.state.engine = engine
    return app


def _usage(out: Output) -> Usage:
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                 total_tokens=out.prompt_tokens + out.completion_tokens)


async def _cancel_on_disconnect(request: Request, handle: GenerationHandle) -> None:
    """The body is read, so the next ASGI message is the client going away: stop its generation."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _collect(handle: GenerationHandle, request: Request) -> tuple[str, Output]:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    parts: list[str] = []
    last = Output("")
    try:
        async for out in handle:
            parts.append(out.text)
            last = out
    finally:
        watcher.cancel()
        handle.cancel()  # no-op when finished; stops the engine if this task itself was cancelled
    if last.finish_reason == "error":
        raise APIError(500, f"generation failed: {last.error}", "server_error")
    if last.finish_reason == "cancelled":  # the client has gone; this answer reaches nobody (nginx's 499)
        raise APIError(499, "the client closed the request", code="client_closed_request")
    return "".join(parts), last


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error_event(out: Output) -> str:
    body = ErrorResponse(error={"message": f"generation failed: {out.error}", "type": "server_error"})
    return f"data: {body.model_dump_json()}\n\n"


async def _chat_events(handle: GenerationHandle, rid: str, created: int, model: str,
                       include_usage: bool) -> AsyncIterator[str]:
    """Role chunk, content chunks, one finish chunk, [usage chunk], [DONE] (OpenAI's order)."""
    exclude = None if include_usage else {"usage"}  # without include_usage no chunk carries a usage key

    def chunk(delta: DeltaMessage, finish: str | None = None, choices: bool = True, usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=rid, created=created, model=model, usage=usage, choices=[
            ChatChunkChoice(index=0, delta=delta, finish_reason=finish)] if choices else [])
        return f"data: {body.model_dump_json(exclude=exclude, exclude_none=False)}\n\n"

    try:
        yield chunk(DeltaMessage(role="assistant", content=""))
        async for out in handle:
            if out.finish_reason == "error":
                yield _error_event(out)
                break
            if out.text:
                yield chunk(DeltaMessage(content=out.text))
            if out.finish_reason in ("stop", "length"):
                yield chunk(DeltaMessage(), out.finish_reason)
                if include_usage:
                    yield chunk(DeltaMessage(), choices=False, usage=_usage(out))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # the client went away (Starlette cancels this generator): free the batch row


async def _completion_events(handle: GenerationHandle, rid: str, created: int, model: str,
                             include_usage: bool, prefix: str) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}

    def chunk(text: str, finish: str | None = None, choices: bool = True, usage: Usage | None = None) -> str:
        body = CompletionResponse(id=rid, created=created, model=model, usage=usage, choices=[
            CompletionChoice(index=0, text=text, finish_reason=finish)] if choices else [])
        return f"data: {body.model_dump_json(exclude=exclude)}\n\n"

    try:
        if prefix:
            yield chunk(prefix)
        async for out in handle:
            if out.finish_reason == "error":
                yield _error_event(out)
                break
            if out.finish_reason in ("stop", "length"):
                yield chunk(out.text, out.finish_reason)
                if include_usage:
                    yield chunk("", choices=False, usage=_usage(out))
            elif out.text:
                yield chunk(out.text)
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()
