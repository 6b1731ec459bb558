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
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                                    for code in (400, 401, 404, 413, 429)}

# The ``code`` of the framework's own errors (unknown route, wrong method, a body it could not parse).
HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
              415: "unsupported_media_type"}


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


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union in an error's location (``str``, ``list[str]``, ``TextPart``,
    ``function-after[...]``): those are no request fields (OpenAI's fields are snake_case)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none")
                                      or part[:1].isupper())


def _field(error: dict) -> tuple:
    return tuple(x for x in error.get("loc", ()) if x != "body" and not _is_union_tag(x))


def _pick(errors: list[dict]) -> dict:
    """The error that says what is wrong. A value that fails a union (``stop``: a string or a list;
    ``content``: a string or parts) fails every member, and the member of the value's own type (a list
    too long, an image part) explains it; the others only say "Input should be a valid string"."""
    first_field = _field(errors[0])[:1]
    same = [e for e in errors if _field(e)[:1] == first_field]
    telling = [e for e in same if not str(e.get("type", "")).endswith("_type")]
    return (telling or same)[0]


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable message for a failed request validation (the first error) and the parameter at fault."""
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = _pick(errors)
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if tuple(first.get("loc", ())) == ("body",) and str(first.get("type", "")).endswith("_type"):
        return "The request body must be a JSON object (sent with Content-Type: application/json).", None
    param = ".".join(str(x) for x in _field(first)) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    others = {_field(e)[:1] for e in errors} - {_field(first)[:1]}
    more = f" (and errors in {len(others)} more fields)" if others else ""
    return (f"{param}: {msg}" if param else msg) + more, param


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    # 400 as OpenAI answers, not FastAPI's 422 (the schema says so too: see api._openapi_400).
    message, param = validation_message(exc)
    return error_response(400, message, param=param, code="invalid_value" if param else "invalid_body")


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own 404/405s (unknown path, wrong method) and FastAPI's unparsable bodies, in our shape.
    status = exc.status_code
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    message = str(exc.detail)
    if status == 400 and message == "There was an error parsing the body":
        message = "The request body could not be parsed: send JSON (UTF-8) with Content-Type: application/json."
    elif status == 404:
        message = ("Not found: this server has /v1/models, /v1/chat/completions, /v1/completions, /tokenize, "
                   "/detokenize, /tokenizer_info and /health.")
    return error_response(status, message, kind, code=HTTP_CODES.get(status, f"http_{status}"),
                          headers=getattr(exc, "headers", None))


async def _crash(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")


def add_error_handlers(app: FastAPI) -> None:
    """Make every error ``app`` answers, ours or the framework's, an OpenAI error body."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
