"""The OpenAI-compatible HTTP app: thin routes over an engine.

Routes (:mod:`kdforge.serve.routes`) validate and tokenize, submit to the engine and turn its
:class:`Output` deltas into OpenAI bodies or server-sent events (:mod:`kdforge.serve.streaming`). Every
error leaves as ``{"error": {"message", "type", "param", "code"}}`` (:mod:`kdforge.serve.errors`); bad
input is a 4xx, never a 500. A pure ASGI middleware checks the optional API key and logs one line per
request (written when the response, streamed or not, has been sent).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kdforge import __version__
from kdforge.serve.engine import BaseEngine
from kdforge.serve.errors import APIError, add_error_handlers, error_response
from kdforge.serve.routes import ServedModel, build_router

__all__ = ["APIError", "create_app", "error_response"]  # the error helpers moved to serve.errors

log = logging.getLogger("kdforge.serve")


def create_app(engine: BaseEngine, model_name: str, api_key: str | None = None, max_in_flight: int = 64,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name`` (also answering to ``aliases``)."""
    app = FastAPI(title="kdforge", version=__version__,
                  description="OpenAI-compatible chat and text completions served by kdforge.")
    add_error_handlers(app)
    app.include_router(build_router(ServedModel(engine, model_name, tuple(aliases), max_in_flight)))
    app.openapi = lambda: _openapi_400(app)
    app.add_middleware(_AuthAndLog, api_key=api_key)
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
