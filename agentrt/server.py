"""OpenAI-compatible HTTP server (FastAPI): chat completions with tools and structured output.

Follows the Chat Completions contract as vLLM and SGLang implement it: `tools` / `tool_choice` /
`parallel_tool_calls` and `response_format` are enforced by grammars, streaming uses SSE with
tool-call deltas, errors use OpenAI's `{"error": {...}}` shape. A client that disconnects cancels
its generation, which frees its KV pages.

Hostile input is bounded: bodies over 8 MB (chunked ones too) get a 413, prompts are tokenised and
grammars compiled off the event loop (compiles in worker processes killed at their deadline), every
error, including 404/405 and faults, is OpenAI-shaped, and keywords a schema grammar cannot enforce
come back in the `x-agentrt-grammar-warnings` header (`strict: true` refuses them instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentrt.agent import Agent
from agentrt.chat import ChatOptions, ChatResult, chat_constraint, prepare_chat, stream_chat
from agentrt.errors import (AgentrtError, ContextLengthError, EngineClosedError, InvalidRequestError,
                            ModelNotFoundError, OverloadedError)
from agentrt.events import wire_event
from agentrt.sampling import SamplingParams

__all__ = ["create_app", "ChatCompletionRequest", "serve"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
API_KEY_ENV = "AGENTRT_API_KEY"
COMPILE_TIMEOUT_ENV = "AGENTRT_COMPILE_TIMEOUT"
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what OpenAI accepts
WARNINGS_HEADER = "x-agentrt-grammar-warnings"
MAX_NESTING = 128  # objects and lists in one request field (the schema normaliser allows 64)
_SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as vLLM takes it (torch generators take these)
MAX_N = 16  # choices per request (each a request of its own; they share the prompt's KV pages)


class _SamplingRequest(BaseModel):
    """The sampling fields chat and legacy completions share (OpenAI's names; extensions marked)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1)  # extension (vLLM's): -1 or 0 is off
    seed: int | None = Field(default=None, ge=_SEED_RANGE[0], le=_SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM's): over prompt and output tokens


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    guided_grammar: str | None = None  # extension (vLLM's name): decode under this EBNF
    ebnf: str | None = None  # the same extension under SGLang's name
    # extension: caps on tool arguments and json_schema replies for this request, e.g.
    # {"max_string_length": 512} or {"max_string_length": null} (defaults: grammar.TOOL_ARGUMENT_CAPS)
    grammar_options: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)  # extension: calls one reply may make (default 8)


class CompletionRequest(_SamplingRequest):
    """Legacy `/v1/completions`: plain text (or token ids) in, continuation out, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # the top alternatives per token (0..20); 0 reports the sampled token only
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _error_for(exc: AgentrtError) -> JSONResponse:
    if isinstance(exc, ModelNotFoundError):
        return _error(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return _error(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return _error(400, str(exc), param=exc.param)
    if isinstance(exc, (EngineClosedError, OverloadedError)):
        return _error(503, str(exc), type_="server_error", code="overloaded" if isinstance(exc, OverloadedError) else None)
    return _error(500, str(exc), type_="server_error")


def _leaf(exc: BaseException) -> BaseException:
    """The error inside task-group wrappers: the first agentrt error of an ExceptionGroup, else its first."""
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if isinstance(_leaf(e), AgentrtError)), exc.exceptions[0])
    return exc


def _error_of(exc: BaseException) -> JSONResponse:
    """Any exception as an OpenAI-shaped error: agentrt errors by kind, anything else a 500."""
    exc = _leaf(exc)
    if isinstance(exc, AgentrtError):
        return _error_for(exc)
    log.error("internal error: %r", exc, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}", type_="server_error")


class _Guard:
    """Body-size limit and API key, as plain ASGI (BaseHTTPMiddleware would hide client disconnects).

    A body without Content-Length (chunked) is read here, up to the limit, and handed on whole."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                return await _too_large(f"{length} bytes")(scope, receive, send)
            if self.api_key is not None and scope["path"].startswith("/v1/"):
                if not secrets.compare_digest(headers.get("authorization", ""), f"Bearer {self.api_key}"):
                    return await _error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key")(scope, receive, send)
            if not length.isdigit() and scope.get("method") in ("POST", "PUT", "PATCH"):
                body = bytearray()
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left before its body arrived
                    body += message.get("body", b"")
                    if len(body) > MAX_BODY_BYTES:
                        return await _too_large("more bytes")(scope, receive, send)
                    if not message.get("more_body", False):
                        break
                receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)


def _too_large(size: str) -> JSONResponse:
    return _error(413, f"request body of {size} exceeds the limit of {MAX_BODY_BYTES} bytes",
                  code="request_too_large")


def _replay(body: bytes, receive):
    """A `receive` that gives `body` as one message, then whatever the client sends (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class AgentRunRequest(BaseModel):
    """Extension: run a server-side agent over the server's registered tools."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1)
    mode: str = "plan"  # plan | dta | react | hogwild | thread
    max_replans: int = Field(2, ge=0, le=10)
    workers: int = Field(4, ge=1, le=16)  # hogwild only
    max_tokens: int = Field(512, ge=1)
    temperature: float = 0.0
    thread: dict[str, Any] | None = None  # thread only: agentrt.threads.ThreadOptions fields


def create_app(engine, *, api_key: str | None = None, model_names: list[str] | None = None,
               tools: list | None = None, compile_timeout: float | None = None) -> FastAPI:
    """An app serving `engine` (an agentrt Engine). `model_names`: the ids clients may ask for;
    `tools`: what `POST /v1/agent/runs` may call (side-effecting tools are always refused here);
    `compile_timeout`: seconds a request's grammar may take to compile before it is stopped (a 400;
    default $AGENTRT_COMPILE_TIMEOUT or 30: a large vocabulary on a busy CPU may need more)."""
    from agentrt.backends import LocalBackend
    from agentrt.grammar import GrammarCompiler

    names = model_names or [engine.name or "agentrt"]
    if compile_timeout is None:
        compile_timeout = float(os.environ.get(COMPILE_TIMEOUT_ENV, 30.0))
    # compiles in worker processes, killed at their deadline, two at a time
    compiler = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size, isolate=True,
                               timeout=compile_timeout)
    backend = LocalBackend(engine, compiler=compiler)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        compiler.pool.prestart()  # the first request's compile does not wait for a worker to start
        common = chat_constraint(ChatOptions(response_format={"type": "json_object"}))
        async with anyio.create_task_group() as tg:  # warm the cache without holding up the start
            tg.start_soon(functools.partial(anyio.to_thread.run_sync, compiler.compile, common,
                                            abandon_on_cancel=True))
            yield
            tg.cancel_scope.cancel()

    app = FastAPI(title="agentrt", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.compiler = compiler
    created = int(time.time())

    app.add_middleware(_Guard, api_key=api_key)

    @app.exception_handler(AgentrtError)
    async def agentrt_error(_: Request, exc: AgentrtError) -> JSONResponse:
        return _error_for(exc)

    @app.exception_handler(Exception)  # ExceptionGroups of task groups too: answered by the error inside
    async def other_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_of(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"unknown route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        else:
            message = str(exc.detail)
        response = _error(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is a byte offset, not a parameter
            return _error(400, f"invalid request: the body is not valid JSON ({first.get('ctx', {}).get('error', '')} "
                               f"at byte {first.get('loc', ['', '?'])[-1]})")
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        kind = f" ({first['type']})" if first.get("type") else ""  # e.g. less_than_equal, as vLLM names it
        return _error(400, f"invalid request: {first.get('msg', 'malformed body')} at {'.'.join(loc) or 'body'}{kind}",
                      param=".".join(loc) or None)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active_requests": engine.num_active}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "agentrt"} for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        if model_id not in names:
            raise ModelNotFoundError(model_id, names)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "agentrt"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.model not in names:
            raise ModelNotFoundError(body.model, names)
        _check_request(body, engine)
        options = ChatOptions(tools=body.tools or [], tool_choice=body.tool_choice or "auto",
                              parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format,
                              grammar=body.guided_grammar or body.ebnf,
                              schema_options=_grammar_options(body.grammar_options),
                              **({} if body.max_tool_calls is None else {"max_tool_calls": body.max_tool_calls}))
        top = body.top_logprobs or 0
        # tokenising and building the grammar are CPU work: a thread (with a loop of its own) does them;
        # each choice gets a matcher of its own (the compile is cached)
        prepared = [await anyio.to_thread.run_sync(anyio.run, prepare_chat, engine, compiler, body.messages, options)
                    for _ in range(body.n)]
        prompt_ids = prepared[0][0]
        headers = _warning_headers(prepared[0][1])
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _sampling(body, len(prompt_ids), engine.max_context, limit=limit,
                           logprobs=bool(body.logprobs) or top > 0, top_logprobs=top)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        choices = [_ChatChoice(engine, i, ids, matcher, p, top)
                   for i, ((ids, matcher), p) in enumerate(zip(prepared, params))]
        if body.stream:
            return StreamingResponse(_sse(choices, rid, body.model, body.stream_options or {}, len(prompt_ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        results = await _run_choices(request, rid, choices)
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        out = []
        for choice, result in zip(choices, results):
            message: dict[str, Any] = {"role": "assistant", "content": result.content or None}
            if result.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}}
                                         for c in result.tool_calls]
            out.append({"index": choice.index, "message": message, "finish_reason": result.finish_reason,
                        "logprobs": choice.all_logprobs, "agentrt": _extension(result)})
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": out, "usage": _usage(results),
        }, headers=headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.model not in names:
            raise ModelNotFoundError(body.model, names)
        _check_common(body)
        if body.suffix is not None:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by agentrt", param="suffix")
        prompts = await anyio.to_thread.run_sync(_completion_prompts, engine, body.prompt)
        top = body.logprobs
        choices = []
        for k, ids in enumerate(prompts):
            params = _sampling(body, len(ids), engine.max_context, limit=body.max_tokens,
                               logprobs=top is not None, top_logprobs=top or 0)
            echo = engine.tokenizer.decode(ids) if body.echo else ""
            choices += [_CompletionChoice(engine, k * body.n + i, ids, p, top, echo) for i, p in enumerate(params)]
        rid = f"cmpl-{secrets.token_hex(12)}"
        if body.stream:
            return StreamingResponse(_sse(choices, rid, body.model, body.stream_options or {},
                                          sum(map(len, prompts))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _run_choices(request, rid, choices)
        if results is None:
            return Response(status_code=499)
        out = [{"index": c.index, "text": c.echo + r.content, "finish_reason": r.finish_reason,
                "logprobs": c.all_logprobs} for c, r in zip(choices, results)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": body.model, "choices": out, "usage": _usage(results, per_prompt=body.n)})

    @app.post("/v1/agent/runs")
    async def agent_runs(body: AgentRunRequest) -> Response:
        from agentrt.tools import ToolRegistry

        if body.mode not in ("plan", "dta", "react", "hogwild", "thread"):
            raise InvalidRequestError(f"mode {body.mode!r} is not one of plan, dta, react, hogwild, thread",
                                      param="mode")
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature)
        if body.mode == "hogwild":
            return StreamingResponse(_agent_events(backend, ToolRegistry([]), body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if body.mode == "thread":
            options = _thread_options(body.thread)
            events = _thread_events(backend, ToolRegistry(tools or []), body.input, options, params)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not tools:
            raise InvalidRequestError("no tools are registered on this server", param="tools")
        return StreamingResponse(_agent_events(backend, ToolRegistry(tools), body),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _agent_events(backend, registry, body: AgentRunRequest):
    """SSE events of a plan, dta, react or hogwild run, as `Agent.stream` gives them (see
    agentrt.events.wire_event): task, tool_start, tool_end, plan and text deltas, final, then [DONE]."""
    plan = {"max_replans": body.max_replans} if body.mode == "plan" else None
    agent = Agent(backend, registry, mode=body.mode, max_tokens=body.max_tokens, temperature=body.temperature,
                  workers=body.workers, plan_options=plan)

    async def produce(send) -> None:
        tasks = 0
        async for ev in agent.stream(body.input):
            event = wire_event(ev)
            if event is not None:
                tasks += event["type"] == "task"
                if event["type"] == "final" and body.mode != "hogwild":
                    event["tasks"] = tasks
                await send.send(event)

    async for line in _sse_events(produce):
        yield line


async def _sse_events(produce):
    """SSE lines of the events `produce(send)` sends, then [DONE]; an agentrt error becomes an error event."""
    send, receive = anyio.create_memory_object_stream[dict](1024)

    async def run() -> None:
        async with send:
            try:
                await produce(send)
            except AgentrtError as exc:
                await send.send({"type": "error", "error": json.loads(_error_for(exc).body)["error"]})

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(run)
        async for event in receive:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _grammar_options(fields: dict[str, Any] | None) -> dict[str, Any]:
    """The request's caps (each a positive integer or null: checked where the grammar is built)."""
    from agentrt.grammar import TOOL_ARGUMENT_CAPS

    unknown = sorted(set(fields or {}) - set(TOOL_ARGUMENT_CAPS))
    if unknown:
        raise InvalidRequestError(f"grammar_options: unknown {', '.join(unknown)}; the caps are "
                                  f"{', '.join(TOOL_ARGUMENT_CAPS)}", param="grammar_options")
    return dict(fields or {})


def _thread_options(fields: dict[str, Any] | None):
    from agentrt.threads import ThreadOptions

    try:
        return ThreadOptions(**(fields or {}))
    except TypeError as exc:
        raise InvalidRequestError(f"thread: {exc}", param="thread") from None


async def _thread_events(backend, registry, question: str, options, params: SamplingParams):
    """SSE events of a thread run: task, tool_start, tool_end, prune, answer, then final (the whole tree
    and what was pruned), then [DONE]."""
    from agentrt.threads import run_thread

    def event_of(ev) -> dict | None:
        path = list(ev.path)
        if ev.kind == "task":
            return {"type": "task", "path": path}
        if ev.kind == "tool_call":
            return {"type": "tool_start", "path": path, "tool": ev.data["tool_name"],
                    "args": ev.data["arguments"]}
        if ev.kind == "tool_end":
            r = ev.data.result
            return {"type": "tool_end", "path": path, "tool": ev.data.tool_name, "ok": r.ok,
                    "observation": r.observation(1000), "seconds": round(ev.data.seconds, 4)}
        if ev.kind == "prune":
            return {"type": "prune", "path": path, **ev.data}
        if ev.kind == "answer":
            return {"type": "answer", "answer": ev.data}
        return None

    async def produce(send) -> None:
        async def on_event(ev) -> None:
            event = event_of(ev)
            if event is not None:
                await send.send(event)

        result = await run_thread(backend, question, registry, options=options, params=params,
                                  on_event=on_event)
        result.raise_for_incomplete()
        await send.send({"type": "final", "answer": result.answer, "tree": result.tree,
                         "stats": result.stats.to_dict(), "notes": result.notes})

    async for line in _sse_events(produce):
        yield line


def _check_request(body: ChatCompletionRequest, engine) -> None:
    """Refuse what OpenAI refuses, and prompts that cannot fit, before any CPU work is spent on them."""
    from agentrt.grammar._schema import json_extent

    for field in ("messages", "tools", "response_format", "tool_choice", "stop", "grammar_options"):
        value = getattr(body, field)
        if value is not None and json_extent(value, 1 << 30)[1] > MAX_NESTING:
            raise InvalidRequestError(f"{field} is nested more than {MAX_NESTING} levels deep", param=field)
    for i, tool in enumerate(body.tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and not TOOL_NAME.fullmatch(name):
            raise InvalidRequestError(f"tools[{i}].function.name {name[:80]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                                      param=f"tools[{i}].function.name")
    _check_common(body)
    _check_tool_choice(body.tool_choice, body.tools)
    size = 0
    for i, m in enumerate(body.messages):
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"messages[{i}].content must be a string, a list of parts or null",
                                      param=f"messages[{i}].content")
        size += len(json.dumps(content, ensure_ascii=False)) if content is not None else 0
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls is not None:
            _check_tool_calls(calls, f"messages[{i}].tool_calls")
    # a token is at most a few dozen bytes: a prompt this long cannot fit, so it is never tokenised
    if size > engine.max_context * 64:
        raise ContextLengthError(size // 64, engine.max_context,
                                 message=f"input too long: {size} characters cannot fit the model's context of "
                                         f"{engine.max_context} tokens; shorten the prompt")


def _check_common(body: _SamplingRequest) -> None:
    """What OpenAI refuses in the fields chat and completions share."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")


def _check_tool_choice(choice: Any, tools: list | None) -> None:
    """OpenAI's rules: a string is none, auto or required; an object names a function of `tools`."""
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice {choice!r} is not one of none, auto, required or a named "
                                      "function", param="tool_choice")
        if choice == "required" and not tools:
            raise InvalidRequestError("tool_choice 'required' needs tools; this request has none", param="tool_choice")
        return
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError('tool_choice must be {"type": "function", "function": {"name": ...}}',
                                  param="tool_choice")
    if not tools:
        raise InvalidRequestError(f"tool_choice names {name!r} but this request has no tools", param="tool_choice")
    offered = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
    if name not in offered:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not one of the request's tools",
                                  param="tool_choice")


def _check_tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRequestError(f"{param} must be a list of tool calls", param=param)
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"{param}[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                      "\"arguments\": ...}}}", param=f"{param}[{k}]")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise InvalidRequestError(f"{param}[{k}].function.arguments must be a JSON string",
                                      param=f"{param}[{k}].function.arguments")


def _warning_headers(matcher) -> dict[str, str]:
    """What the request's grammar does not enforce, for the client to see (not only in our log)."""
    warnings = list(getattr(matcher, "warnings", None) or [])
    if not warnings:
        return {}
    text = json.dumps(warnings)  # ASCII: safe in a header
    return {WARNINGS_HEADER: text if len(text) <= 4096 else json.dumps(warnings[:8] + [f"... {len(warnings)} in all"])}


def _sampling(body: _SamplingRequest, prompt_len: int, max_context: int, *, limit: int | None, logprobs: bool,
              top_logprobs: int) -> list[SamplingParams]:
    """One SamplingParams per choice: choice i draws from seed + i (each its own seed stream)."""
    room = max_context - prompt_len
    if room < 1:
        raise ContextLengthError(prompt_len, max_context)
    if limit is not None and limit > room:
        raise ContextLengthError(prompt_len, max_context, requested=limit)
    if body.stop is not None and not isinstance(body.stop, (str, list)):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    fields = dict(
        max_tokens=limit if limit is not None else room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        logprobs=logprobs, top_logprobs=top_logprobs,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
    )
    seeds = [None if body.seed is None else _shift_seed(body.seed, i) for i in range(body.n)]
    return [SamplingParams(seed=seed, **fields) for seed in seeds]


def _shift_seed(seed: int, i: int) -> int:
    return seed + i if seed + i <= _SEED_RANGE[1] else seed - i


def _completion_prompts(engine, prompt: Any) -> list[list[int]]:
    """The prompts of a completions request as token ids: a string, ids, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if len(prompt) > MAX_N:
        raise InvalidRequestError(f"at most {MAX_N} prompts per request", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = engine.encode(p) if p else []
        if not ids:
            raise InvalidRequestError(f"prompt[{i}] is empty", param="prompt")
        out.append(ids)
    return out


class _Tap:
    """The engine as a choice's decoder sees it, keeping each Output (tokens, logprobs) on the way;
    `started` is set once the first Output is out: the prompt is prefilled and its pages cached."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.outputs: list = []
        self.started = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def stream(self, *args: Any, **kwargs: Any):
        try:
            async for out in self._engine.stream(*args, **kwargs):
                self.outputs.append(out)
                self.started.set()
                yield out
        finally:
            self.started.set()


def _token_entries(outputs: list) -> list[tuple[int, float, dict[int, float] | None]]:
    """(token, logprob, alternatives) per generated token; a token the grammar forced had no choice:
    its log-probability is 0 under the distribution sampled from (the mask left it alone)."""
    out = []
    for o in outputs:
        lps = o.logprobs or [None] * len(o.token_ids)
        tops = o.top_logprobs or [None] * len(o.token_ids)
        for t, lp, top in zip(o.token_ids, lps, tops):
            out.append((t, 0.0 if lp is None else lp, top if top is not None else {t: 0.0 if lp is None else lp}))
    return out


class _Choice:
    """One choice of a request: its decode, with chunk payloads for SSE and logprobs in OpenAI's shape."""

    def __init__(self, engine, index: int, prompt_ids: list[int], params: SamplingParams, top: int | None) -> None:
        self.tap, self.index, self.prompt_ids, self.params, self.top = _Tap(engine), index, prompt_ids, params, top
        self.tokenizer = engine.tokenizer
        self._sent = 0  # outputs whose logprobs went out in a chunk
        self.all_logprobs: dict | None = None

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, outputs: list) -> dict | None:
        raise NotImplementedError

    def _pending_logprobs(self) -> dict | None:
        outputs, self._sent = self.tap.outputs[self._sent:], len(self.tap.outputs)
        return self.logprobs(outputs)

    def tokens_so_far(self) -> int:
        return sum(len(o.token_ids) for o in self.tap.outputs)

    async def payloads(self):
        """(choice payload, ChatResult on the last one) as the decode goes, each with the logprobs of the
        tokens that arrived with it. The last text delta waits for the next event, so the chunk with the
        finish_reason carries the end of the text."""
        held: tuple[str, dict | None] | None = None
        async for kind, value in self._events():
            logprobs = self._pending_logprobs()
            if kind == "text":
                if held is not None:
                    yield self._payload(*held), None
                held = (value, logprobs)
            elif kind == "result":
                text, before = held if held is not None else (None, None)
                yield self._payload(text, _join_logprobs(before, logprobs), value), value
                return
            else:
                if held is not None:
                    yield self._payload(*held), None
                    held = None
                yield self._payload(None, logprobs, extra=value), None

    async def run(self) -> ChatResult:
        """Decode to the end; `self.all_logprobs` then holds the logprobs of every token."""
        async for payload, result in self.payloads():
            self.all_logprobs = _join_logprobs(self.all_logprobs, payload["logprobs"])
            if result is not None:
                return result
        raise AssertionError("a decode ended without a result")


def _join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Two chunks' logprobs as one (either shape: every list field concatenated)."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] if isinstance(a[k], list) else a[k] for k in a}


class _ChatChoice(_Choice):
    def __init__(self, engine, index: int, prompt_ids: list[int], matcher, params: SamplingParams, top: int) -> None:
        super().__init__(engine, index, prompt_ids, params, top)
        self.matcher = matcher

    async def _events(self):
        async for ev in stream_chat(self.tap, self.prompt_ids, self.matcher, self.params):
            if isinstance(ev, ChatResult):
                yield "result", ev
            elif ev.kind == "content":
                yield "text", ev.text
            elif ev.kind == "call_start":
                yield "call", {"tool_calls": [{"index": ev.index, "id": ev.call_id, "type": "function",
                                               "function": {"name": ev.name, "arguments": ""}}]}
            else:
                yield "call", {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}

    def first(self) -> dict:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def _payload(self, text: str | None, logprobs: dict | None, result: ChatResult | None = None,
                 extra: dict | None = None) -> dict:
        delta = dict(extra or {})
        if text is not None:
            delta["content"] = text
        choice = {"index": self.index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": None if result is None else result.finish_reason}
        if result is not None:
            choice["agentrt"] = _extension(result)
        return choice

    def logprobs(self, outputs: list) -> dict | None:
        if not self.params.logprobs:
            return None

        def item(t: int, lp: float) -> dict:
            text = self._text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in list(alts.items())[:self.top]]}
                   for t, lp, alts in _token_entries(outputs)]
        return {"content": content, "refusal": None}


class _CompletionChoice(_Choice):
    def __init__(self, engine, index: int, prompt_ids: list[int], params: SamplingParams, top: int | None,
                 echo: str) -> None:
        super().__init__(engine, index, prompt_ids, params, top)
        self.echo = echo
        self._offset = len(echo)  # text_offset of the next token

    async def _events(self):
        text = []
        if self.echo:
            yield "text", self.echo
        async for out in self.tap.stream(self.prompt_ids, self.params):
            text.append(out.text)
            if out.text:
                yield "text", out.text
            if out.finish_reason is not None:
                yield "result", ChatResult("".join(text), [], out.finish_reason, out.prompt_tokens,
                                           out.completion_tokens, out.incomplete)

    def first(self) -> None:
        return None

    def _payload(self, text: str | None, logprobs: dict | None, result: ChatResult | None = None,
                 extra: dict | None = None) -> dict:
        return {"index": self.index, "text": text or "", "logprobs": logprobs,
                "finish_reason": None if result is None else result.finish_reason}

    def logprobs(self, outputs: list) -> dict | None:
        """The legacy shape: tokens, token_logprobs, top_logprobs (the sampled token always among them,
        as vLLM reports it) and text_offset."""
        if self.top is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        for t, lp, alts in _token_entries(outputs):
            text = self._text(t)
            best = dict(list(alts.items())[:self.top])
            best.setdefault(t, lp)
            tokens.append(text)
            lps.append(lp)
            tops.append({self._text(a): alp for a, alp in best.items()})
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _run_choices(request: Request, rid: str, choices: list[_Choice]) -> list[ChatResult] | None:
    """Decode every choice (the first alone until its prompt is cached, then the rest beside it, sharing
    its pages); None when the client disconnects first (every decode is cancelled)."""
    results: list[ChatResult | None] = [None] * len(choices)

    async def run(i: int) -> None:
        results[i] = await choices[i].run()

    async def all_of(scope: anyio.CancelScope) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 0)
            await choices[0].tap.started.wait()
            for i in range(1, len(choices)):
                tg.start_soon(run, i)
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while not await request.is_disconnected():
            await anyio.sleep(0.05)
        log.info("%s: client disconnected, cancelling", rid)
        scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(all_of, tg.cancel_scope)
            tg.start_soon(watch, tg.cancel_scope)
    except BaseExceptionGroup as group:  # the engine's error, not the task group's wrapper
        raise _leaf(group) from None
    if any(r is None for r in results):
        return None
    return results  # type: ignore[return-value]


def _extension(result: ChatResult) -> dict:
    """The `agentrt` field of a finished choice: `incomplete` when max_tokens cut a constrained output
    before its grammar could end (finish_reason is then "length"), `refused_calls` for exact repeats."""
    return {"incomplete": result.incomplete, "refused_calls": result.refused}


def _usage(results: list[ChatResult], per_prompt: int | None = None) -> dict:
    """Token counts of a request: its prompt counted once (once per prompt of a completions batch,
    whose choices come `per_prompt` to a prompt), every choice's completion."""
    step = per_prompt or len(results)
    prompt = sum(r.prompt_tokens for r in results[::step])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(choices: list[_Choice], rid: str, model: str, options: dict[str, Any], prompt_tokens: int):
    """SSE chunks of every choice, interleaved as they come; `include_usage` adds a last chunk with the
    usage and no choices, and with it `continuous_usage_stats` (vLLM's extension) the usage so far on
    every chunk."""
    created = int(time.time())
    chat = isinstance(choices[0], _ChatChoice)
    kind = "chat.completion.chunk" if chat else "text_completion"
    continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))

    def usage(completion: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def chunk(choice: dict | None, totals: dict | None = None) -> str:
        obj: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                               "choices": [] if choice is None else [choice]}
        if continuous and totals is None:
            totals = usage(sum(c.tokens_so_far() for c in choices))
        if totals is not None:
            obj["usage"] = totals
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    for c in choices:
        first = c.first()
        if first is not None:
            yield chunk(first)
    results: list[ChatResult] = []
    try:
        async for choice, result in _merge([c.payloads() for c in choices], choices[0].tap.started):
            if result is not None:
                results.append(result)
            yield chunk(choice)
        if options.get("include_usage"):
            yield chunk(None, usage(sum(r.completion_tokens for r in results)))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as OpenAI does
        log.warning("%s failed mid-stream: %r", rid, exc)
        yield f"data: {json.dumps(json.loads(_error_of(exc).body))}\n\n"
    yield "data: [DONE]\n\n"


async def _merge(streams: list, first_started: anyio.Event):
    """Items of several async iterators as each comes; the first runs alone until `first_started`
    (its prompt is then cached for the others). Leaving early closes them all (cancelling decodes)."""
    pending: dict[asyncio.Task, int] = {}

    def pull(i: int) -> None:
        pending[asyncio.ensure_future(anext(streams[i]))] = i

    pull(0)
    started = asyncio.ensure_future(first_started.wait()) if len(streams) > 1 else None
    try:
        while pending:
            waiting = set(pending) | ({started} if started is not None else set())
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if started is not None and started in done:
                started = None
                for i in range(1, len(streams)):
                    pull(i)
            for task in done & set(pending):
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pull(i)
                yield item
    finally:
        for task in [*pending, *([started] if started is not None else [])]:
            task.cancel()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()


def resolve_api_key(api_key: str | None = None, api_key_file: str | Path | None = None) -> str | None:
    """The key to require: given directly, read from a file (first line), or from $AGENTRT_API_KEY
    (a key on the command line is visible to every user of the machine in `ps`)."""
    if api_key_file is not None:
        try:
            key = Path(api_key_file).read_text().strip()
        except OSError as e:
            raise InvalidRequestError(f"cannot read the API key file {api_key_file}: {e.strerror}",
                                      param="api_key_file") from None
        if not key:
            raise InvalidRequestError(f"the API key file {api_key_file} is empty", param="api_key_file")
        return key
    return api_key or os.environ.get(API_KEY_ENV) or None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str | None = None, dtype: str | None = None, api_key_file: str | None = None,
          mcp: list | None = None) -> None:
    """Load `model` and serve it until interrupted (what `agentrt serve` runs). The agent-runs
    extension gets the calculator and the tools of the `mcp` servers (`MCPServerStdio`s, started
    here, stopped on exit); register your own tools with `create_app(..., tools=[...])`.
    The API key comes from `api_key`, `api_key_file` or $AGENTRT_API_KEY (none: no key required)."""
    import uvicorn

    from agentrt.engine import Engine
    from agentrt.tools import calculator

    key = resolve_api_key(api_key, api_key_file)
    servers = list(mcp or [])
    try:
        tools = [calculator, *(t for server in servers for t in server.tools())]  # a bad server fails here
        engine = Engine.load(model, device=device, dtype=dtype)
        try:
            uvicorn.run(create_app(engine, api_key=key, tools=tools), host=host, port=port, log_level="info")
        finally:
            engine.close()
    finally:
        for server in servers:
            server.close()
