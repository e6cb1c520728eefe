"""OpenAI-shaped errors, the body-size and API-key guard, and SSE framing."""

from __future__ import annotations

import json
import logging
import math
import secrets

import anyio
from fastapi.responses import JSONResponse

from agentrt.errors import (
    AgentrtError,
    ContextLengthError,
    EngineClosedError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)
from agentrt.server._protocol import MAX_BODY_BYTES

log = logging.getLogger(__name__)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object, {"error": {message, type, param, code}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_parts(exc: BaseException) -> tuple[int, dict]:
    """Any exception as (HTTP status, OpenAI error object): agentrt errors by kind, anything else a 500."""
    exc = leaf_error(exc)
    if isinstance(exc, ModelNotFoundError):
        return 404, error_body(str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return 400, error_body(str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return 400, error_body(str(exc), param=exc.param)
    if isinstance(exc, OverloadedError) and getattr(exc, "retry_after", None) is not None:  # this client only
        return 429, error_body(str(exc), type_="requests", code="rate_limit_exceeded")
    if isinstance(exc, (EngineClosedError, OverloadedError)):
        code = "overloaded" if isinstance(exc, OverloadedError) else None
        return 503, error_body(str(exc), type_="server_error", code=code)
    if isinstance(exc, AgentrtError):
        return 500, error_body(str(exc), type_="server_error")
    log.error("internal error: %r", exc, exc_info=exc)
    return 500, error_body(f"internal error: {type(exc).__name__}", type_="server_error")


def leaf_error(exc: BaseException) -> BaseException:
    """The error inside task-group wrappers: the first agentrt error of an ExceptionGroup, else its first."""
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if isinstance(leaf_error(e), AgentrtError)), exc.exceptions[0])
    return exc


def error_of(exc: BaseException) -> JSONResponse:
    """Any exception as an OpenAI-shaped error response."""
    status, body = error_parts(exc)
    retry = getattr(leaf_error(exc), "retry_after", None)
    return JSONResponse(body, status, headers={"Retry-After": str(math.ceil(retry))} if status == 429 else None)


class Guard:
    """Body-size limit and API key, as plain ASGI (BaseHTTPMiddleware would hide client disconnects).

    A body without Content-Length (chunked) is read here, up to the limit, and handed on whole."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                return await too_large(f"{length} bytes")(scope, receive, send)
            if self.api_key is not None and scope["path"].startswith("/v1/"):
                if not secrets.compare_digest(headers.get("authorization", ""), f"Bearer {self.api_key}"):
                    return await error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key")(scope, receive, send)
            if not length.isdigit() and scope.get("method") in ("POST", "PUT", "PATCH"):
                body = bytearray()
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left before its body arrived
                    body += message.get("body", b"")
                    if len(body) > MAX_BODY_BYTES:
                        return await too_large("more bytes")(scope, receive, send)
                    if not message.get("more_body", False):
                        break
                receive = replay_body(bytes(body), receive)
        await self.app(scope, receive, send)


def too_large(size: str) -> JSONResponse:
    return error_response(413, f"request body of {size} exceeds the limit of {MAX_BODY_BYTES} bytes",
                  code="request_too_large")


def replay_body(body: bytes, receive):
    """A `receive` that gives `body` as one message, then whatever the client sends (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def sse_events(produce):
    """SSE lines of the events `produce(send)` sends, then [DONE]; an error (an agentrt error as itself,
    any other as a 500 "internal error") becomes an error event: the stream always ends with [DONE]."""
    send, receive = anyio.create_memory_object_stream[dict](1024)

    async def run() -> None:
        async with send:
            try:
                await produce(send)
            except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
                await send.send({"type": "error", "error": error_parts(exc)[1]["error"]})

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(run)
        async for event in receive:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
