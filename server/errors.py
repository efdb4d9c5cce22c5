"""Every error in the OpenAI shape (responses.ErrorResponse): the 400 that pydantic's validation
becomes, 413 for large bodies, the handlers that keep stack traces from clients, and the body parser
that routes call after the API key and the rate limit."""

from __future__ import annotations

import logging
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from slowapi.errors import RateLimitExceeded
from starlette.exceptions import HTTPException

from server.connections import body_deadline
from server.responses import ERROR_TYPES, ErrorResponse, error_body

log = logging.getLogger("medusa")
Body = TypeVar("Body", bound=BaseModel)
ERRORS = {code: {"model": ErrorResponse} for code in ERROR_TYPES}  # what any route may answer, for OpenAPI
FIELD_SHAPES = {  # what union fields accept, for errors that pydantic reports per union branch
    "prompt": "must be a non-empty string, or a non-empty list of non-empty strings, of token ids (>= 0), or of "
              "non-empty lists of token ids",
    "stop": "must be a string or a list of strings",
}


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class BodyLimit:
    """413 for bodies over the limit: by Content-Length up front, or as a body streams in; 408 for a
    body that takes longer than timeout_s to arrive (server/connections.py)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await error(413, message)(scope, receive, send)
        seen, timed = 0, body_deadline(receive, self.timeout_s)

        async def counted():
            nonlocal seen
            msg = await timed()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, message)  # FastAPI re-raises HTTPExceptions met while reading
            return msg

        await self.app(scope, counted, send)


async def parse_body(request: Request, model: type[Body]) -> tuple[Body | None, JSONResponse | None]:
    """The body as `model`, parsed and validated in one pass by pydantic (in Rust, from the bytes), or
    the 400 that says why not. Routes call this themselves, after the API key and the rate limit, so
    that refused bodies count against the limit too (and get its headers); every list in the schemas
    is bounded and fails fast, so that no body under MAX_BODY_BYTES holds the event loop for long."""
    try:
        return model.model_validate_json(await request.body()), None
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        return None, invalid_request([{**err, "loc": ("body", *err["loc"])} for err in errors])


def invalid_request(errors: list[dict]) -> JSONResponse:
    """400 for pydantic's errors, naming the field of the first that says most."""
    def wrong_shape(e: dict) -> bool:
        return e.get("type", "").endswith(("_type", "_parsing"))

    # a union field is reported once per branch: the branch that matched the input's shape says why
    first = next((e for e in errors if not wrong_shape(e)), errors[0])
    if first.get("type") == "json_invalid":
        return error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
    loc = [str(p) for p in first.get("loc", ())]
    param = loc[1] if len(loc) > 1 and loc[0] == "body" else None  # the field, not the union branch
    message = FIELD_SHAPES.get(param) if len(loc) > 2 and wrong_shape(first) else None
    message = message or str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return error(400, f"{param}: {message}" if param else message, param)


def add_error_handlers(app: FastAPI) -> None:
    """No stack trace ever reaches a client."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return invalid_request(list(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        messages = {404: "no such route", 405: "method not allowed"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    @app.exception_handler(RateLimitExceeded)
    async def rate_limited(request: Request, exc: RateLimitExceeded):
        response = error(429, f"rate limit exceeded: {exc.detail}; retry after the time in Retry-After")
        return request.app.state.limiter._inject_headers(response, request.state.view_rate_limit)  # X-RateLimit-*

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        log.exception("unhandled error")
        return error(500, "internal server error")
