"""OpenAI's error shape for the HTTP app: :class:`APIError`, its rendering, and the app's exception handlers.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``; bad input is a 4xx, never a 500
(only an unexpected exception is, and it is logged).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdforge.serve.protocol import ErrorResponse

log = logging.getLogger("kdforge.serve")

# The error answers each /v1 route documents in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429)}


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


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable message for a failed request validation (the first error) and the parameter at fault."""
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


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    # 400 as OpenAI answers, not FastAPI's 422 (the schema says so too: see api._openapi_400).
    message, param = validation_message(exc)
    return error_response(400, message, param=param, code="invalid_value" if param else "invalid_body")


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own 404/405s (unknown path, wrong method), in the same shape as ours.
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))


async def _crash(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")


def add_error_handlers(app: FastAPI) -> None:
    """Make every error ``app`` answers, ours or the framework's, an OpenAI error body."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
