"""The OpenAI-compatible HTTP app: thin routes over an engine.

Routes (:mod:`kdforge.serve.routes`) validate and tokenize, submit to the engine and turn its
:class:`Output` deltas into OpenAI bodies or server-sent events (:mod:`kdforge.serve.streaming`). Every
error leaves as ``{"error": {"message", "type", "param", "code"}}`` (:mod:`kdforge.serve.errors`); bad
input is a 4xx, never a 500. A pure ASGI middleware checks the optional API key, reads the request body
under ``max_body_bytes`` (413 past it: the Content-Length is checked before reading, a chunked body is
counted while it arrives), rejects bodies that are not UTF-8 or nest JSON deeper than
:data:`MAX_JSON_DEPTH` before FastAPI parses them, and logs one line per request (written when the
response, streamed or not, has been sent; a client that left before the end is logged as 499).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kdforge import __version__
from kdforge.serve.engine import BaseEngine
from kdforge.serve.errors import APIError, add_error_handlers, error_response
from kdforge.serve.routes import ServedModel, build_router

__all__ = ["DEFAULT_MAX_BODY_BYTES", "MAX_JSON_DEPTH", "APIError", "create_app", "error_response"]

log = logging.getLogger("kdforge.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # 4 MiB: a long conversation is far below it
MAX_JSON_DEPTH = 64  # an OpenAI request nests 4 levels; a JSON schema in response_format a dozen or so
# Routes outside /v1 that the API key guards too (vLLM's tokenizer endpoints); /health and /docs stay open.
KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})


def create_app(engine: BaseEngine, model_name: str, api_key: str | None = None, max_in_flight: int = 64,
               aliases: tuple[str, ...] = (), max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
               allow_special_tokens: bool = False, max_logprobs: int = 20) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name`` (also answering to ``aliases``).

    ``max_body_bytes``: the largest request body accepted (413 past it; None for no limit).
    ``allow_special_tokens``: let message content turn into control tokens (``<|im_start|>``...); off,
    content is always tokenized as text, so a user cannot forge a system or assistant turn.
    ``max_logprobs``: the most log-probabilities per position a request may ask for (``logprobs``,
    ``prompt_logprobs``, ``top_logprobs``; -1: the whole vocabulary), vLLM's ``--max-logprobs``: past it a
    400 with vLLM's message.
    """
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ValueError("max_body_bytes must be >= 1 (or None for no limit)")
    if max_logprobs < -1:
        raise ValueError("max_logprobs must be >= 0, or -1 for no cap")
    app = FastAPI(title="kdforge", version=__version__,
                  description="OpenAI-compatible chat and text completions served by kdforge, with vLLM's "
                              "extensions (prompt_logprobs, token-id prompts, /tokenize, /detokenize).")
    add_error_handlers(app)
    served = ServedModel(engine, model_name, tuple(aliases), max_in_flight, allow_special_tokens=allow_special_tokens,
                         max_logprobs=max_logprobs)
    app.include_router(build_router(served))
    app.openapi = lambda: _openapi_400(app)
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _openapi_400(app: FastAPI) -> dict[str, Any]:
    """The schema, saying that validation failures answer 400 (as OpenAI does), not FastAPI's default 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", {"description": "Bad Request", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
        app.openapi_schema = schema
    return app.openapi_schema


# A JSON string (escapes included), matched possessively: no backtracking on an unterminated one.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``body`` nests arrays/objects deeper than ``limit`` (brackets inside strings do not count).

    Python's JSON parser recurses once per level; a body of a million ``[`` would exhaust the stack.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    codes = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = (codes == ord("[")).astype(np.int32) + (codes == ord("{")) - (codes == ord("]")) - (codes == ord("}"))
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


class _Gate:
    """ASGI middleware: bearer-token check on /v1 (and the tokenizer) routes, the body limits, one log line
    per request."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status, completed = time.perf_counter(), [0], [False]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed[0] = True
            await send(message)

        outcome = ""
        try:
            keyed = scope["path"].startswith("/v1") or scope["path"] in KEYED_PATHS
            if self.api_key and keyed and not self._authorized(scope):
                resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_and_record)
                return
            body, refusal = await self._read_body(scope, receive)
            if body is None:
                if refusal is not None:
                    await refusal(scope, receive, send_and_record)
                else:
                    status[0], outcome = 499, " (client disconnected while sending)"
                return
            await self.app(scope, _replay(body, receive), send_and_record)
        except BaseException:
            outcome = " (unhandled error)"
            raise
        finally:
            shown = status[0] or (500 if outcome else "-")
            if not completed[0] and not outcome:
                # The response never ended: the client went away mid-answer (a closed stream). Its
                # status line said 200, but no answer was delivered: nginx's 499.
                shown, outcome = 499, f" (client disconnected; response started as {status[0] or '-'})"
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %s %.1fms%s', client[0], scope["method"], scope["path"], shown,
                     (time.perf_counter() - t0) * 1000, outcome)

    async def _read_body(self, scope, receive):
        """(the whole body, None), or (None, an error response to send), or (None, None) when the client left."""
        limit = self.max_body_bytes
        if limit is not None:
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        declared = int(value)
                    except ValueError:
                        break
                    if declared > limit:
                        return None, _too_large(limit, f"The request body is {declared} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:
                return None, _too_large(limit, f"The request body is more than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                return None, error_response(400, f"The request body is not valid UTF-8 (byte {e.start}); JSON "
                                                 "bodies must be UTF-8.", code="invalid_body")
            if await asyncio.to_thread(json_too_deep, body):
                return None, error_response(400, f"The request body nests JSON deeper than {MAX_JSON_DEPTH} "
                                                 "levels.", code="invalid_body")
        return body, None

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key)
        return False


_AuthAndLog = _Gate  # the old name


def _too_large(limit: int, what: str):
    # The connection stays open: the server reads the rest of the body and drops it (uvicorn does, once
    # the answer is sent), so the client, still sending, can read this answer instead of a reset.
    return error_response(413, f"{what}; this server accepts at most {limit} bytes (max_body_bytes).",
                          code="request_too_large")


def _replay(body: bytes, receive):
    """The ASGI ``receive`` of a request whose body was read already: the body once, then the client's
    own messages (its disconnect, which cancels generation)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        if pending:
            return pending.pop()
        return await receive()

    return replayed
