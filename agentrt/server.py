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

from agentrt.chat import ChatOptions, ChatResult, chat_constraint, prepare_chat, stream_chat
from agentrt.errors import (AgentrtError, ContextLengthError, EngineClosedError, InvalidRequestError,
                            ModelNotFoundError, OverloadedError)
from agentrt.sampling import SamplingParams

__all__ = ["create_app", "ChatCompletionRequest", "serve"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
API_KEY_ENV = "AGENTRT_API_KEY"
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what OpenAI accepts
WARNINGS_HEADER = "x-agentrt-grammar-warnings"
MAX_NESTING = 128  # objects and lists in one request field (the schema normaliser allows 64)
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch generator takes


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=_SEED_RANGE[0], le=_SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    guided_grammar: str | None = None  # extension (vLLM's name): decode under this EBNF
    ebnf: str | None = None  # the same extension under SGLang's name
    # extension: caps on tool arguments and json_schema replies for this request, e.g.
    # {"max_string_length": 512} or {"max_string_length": null} (defaults: grammar.TOOL_ARGUMENT_CAPS)
    grammar_options: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)  # extension: calls one reply may make (default 8)


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
               tools: list | None = None, compile_timeout: float = 30.0) -> FastAPI:
    """An app serving `engine` (an agentrt Engine). `model_names`: the ids clients may ask for;
    `tools`: what `POST /v1/agent/runs` may call (side-effecting tools are always refused here);
    `compile_timeout`: seconds a request's grammar may take to compile before it is stopped (a 400)."""
    from agentrt.backends import LocalBackend
    from agentrt.grammar import GrammarCompiler

    names = model_names or [engine.name or "agentrt"]
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
        return _error(400, f"invalid request: {first.get('msg', 'malformed body')} at {'.'.join(loc) or 'body'}",
                      param=".".join(loc) or None)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active_requests": engine.num_active}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "agentrt"} for n in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.model not in names:
            raise ModelNotFoundError(body.model, names)
        if body.n != 1:
            raise InvalidRequestError("only n=1 is supported", param="n")
        _check_request(body, engine)
        options = ChatOptions(tools=body.tools or [], tool_choice=body.tool_choice or "auto",
                              parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format,
                              grammar=body.guided_grammar or body.ebnf,
                              schema_options=_grammar_options(body.grammar_options),
                              **({} if body.max_tool_calls is None else {"max_tool_calls": body.max_tool_calls}))
        # tokenising and building the grammar are CPU work: a thread (with a loop of its own) does them
        prompt_ids, matcher = await anyio.to_thread.run_sync(anyio.run, prepare_chat, engine, compiler,
                                                             body.messages, options)
        headers = _warning_headers(matcher)
        params = _sampling(body, len(prompt_ids), engine.max_context)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(engine, prompt_ids, matcher, params, rid, body.model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        result: ChatResult | None = None

        async def run(scope: anyio.CancelScope) -> None:
            nonlocal result
            async for ev in stream_chat(engine, prompt_ids, matcher, params):
                if isinstance(ev, ChatResult):
                    result = ev
            scope.cancel()

        async def watch(scope: anyio.CancelScope) -> None:
            while not await request.is_disconnected():
                await anyio.sleep(0.05)
            log.info("%s: client disconnected, cancelling", rid)
            scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, tg.cancel_scope)
                tg.start_soon(watch, tg.cancel_scope)
        except BaseExceptionGroup as group:  # the engine's error, not the task group's wrapper
            raise _leaf(group) from None
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        message: dict[str, Any] = {"role": "assistant", "content": result.content or None}
        if result.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in result.tool_calls]
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None,
                         "agentrt": _extension(result)}],
            "usage": _usage(result),
        }, headers=headers)

    @app.post("/v1/agent/runs")
    async def agent_runs(body: AgentRunRequest) -> Response:
        from agentrt.tools import ToolRegistry

        if body.mode not in ("plan", "dta", "react", "hogwild", "thread"):
            raise InvalidRequestError(f"mode {body.mode!r} is not one of plan, dta, react, hogwild, thread",
                                      param="mode")
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature)
        if body.mode == "hogwild":
            return StreamingResponse(_hogwild_events(engine, body, params), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if body.mode == "thread":
            options = _thread_options(body.thread)
            events = _thread_events(backend, ToolRegistry(tools or []), body.input, options, params)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not tools:
            raise InvalidRequestError("no tools are registered on this server", param="tools")
        return StreamingResponse(_agent_events(backend, ToolRegistry(tools), body, params),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _agent_events(backend, registry, body: AgentRunRequest, params: SamplingParams):
    """SSE events of a plan/dta/react run: task, tool_start, tool_end, final, then [DONE]."""
    from agentrt import planner

    state = planner.ExecutionState()

    def on_span(send, kind: str, span) -> None:
        event: dict[str, Any] = {"type": {"task": "task", "start": "tool_start", "end": "tool_end"}[kind],
                                 "id": span.task_id, "tool": span.tool}
        if kind == "task":
            event["args"] = state.tasks[span.task_id].to_json()["args"]
        elif kind == "end":
            result = state.results[span.task_id]
            event.update(ok=result.ok, observation=result.observation(1000), seconds=round(span.duration, 4))
        send.send_nowait(event)

    def llm(prompt: str, grammar: str | None):
        return backend.text(prompt, grammar, params)

    async def produce(send) -> None:
        state.trace.listeners.append(lambda kind, span: on_span(send, kind, span))
        runner = {"plan": planner.run_plan, "dta": planner.run_dta, "react": planner.run_react}[body.mode]
        kwargs = {"max_replans": body.max_replans} if body.mode == "plan" else {}
        result = await runner(body.input, llm, registry, state=state, **kwargs)
        await send.send({"type": "final", "answer": result.answer, "rounds": result.rounds,
                         "tasks": len(result.state.tasks),
                         "ok": sum(r.ok for r in result.state.results.values())})

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


async def _hogwild_events(engine, body: AgentRunRequest, params: SamplingParams):
    """SSE events of a Hogwild! run: one `final` event with the answer and each worker's text."""
    from agentrt.hogwild import HogwildPool

    try:
        result = await HogwildPool(engine, workers=body.workers).run(body.input, max_tokens=body.max_tokens,
                                                                      params=params)
        event = {"type": "final", "answer": result.answer, "workers": result.texts, "steps": result.steps,
                 "generated_tokens": result.generated_tokens, "finish_reason": result.finish_reason}
    except AgentrtError as exc:
        event = {"type": "error", "error": json.loads(_error_for(exc).body)["error"]}
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
    choice = body.tool_choice
    if choice not in (None, "none", "auto") and not body.tools:
        raise InvalidRequestError(f"tool_choice {choice!r} needs tools; this request has none", param="tool_choice")
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


def _sampling(body: ChatCompletionRequest, prompt_len: int, max_context: int) -> SamplingParams:
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    room = max_context - prompt_len
    if room < 1:
        raise ContextLengthError(prompt_len, max_context)
    if limit is not None and limit > room:
        raise ContextLengthError(prompt_len, max_context, requested=limit)
    if body.stop is not None and not isinstance(body.stop, (str, list)):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    return SamplingParams(
        max_tokens=limit if limit is not None else room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    )


def _extension(result: ChatResult) -> dict:
    """The `agentrt` field of a finished choice: `incomplete` when max_tokens cut a constrained output
    before its grammar could end (finish_reason is then "length"), `refused_calls` for exact repeats."""
    return {"incomplete": result.incomplete, "refused_calls": result.refused}


def _usage(result: ChatResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _sse(engine, prompt_ids, matcher, params, rid: str, model: str, include_usage: bool):
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True,
              extension: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        if extension is not None:
            choice["agentrt"] = extension
        obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [choice] if choices else []}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in stream_chat(engine, prompt_ids, matcher, params):
            if isinstance(ev, ChatResult):
                yield chunk({}, ev.finish_reason, extension=_extension(ev))
                if include_usage:
                    yield chunk({}, usage=_usage(ev), choices=False)
            elif ev.kind == "content":
                yield chunk({"content": ev.text})
            elif ev.kind == "call_start":
                yield chunk({"tool_calls": [{"index": ev.index, "id": ev.call_id, "type": "function",
                                             "function": {"name": ev.name, "arguments": ""}}]})
            else:
                yield chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as OpenAI does
        log.warning("%s failed mid-stream: %r", rid, exc)
        yield f"data: {json.dumps(json.loads(_error_of(exc).body))}\n\n"
    yield "data: [DONE]\n\n"


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
          device: str | None = None, dtype: str | None = None, api_key_file: str | None = None) -> None:
    """Load `model` and serve it until interrupted (what `agentrt serve` runs). The agent-runs
    extension gets the calculator; register your own tools with `create_app(..., tools=[...])`.
    The API key comes from `api_key`, `api_key_file` or $AGENTRT_API_KEY (none: no key required)."""
    import uvicorn

    from agentrt.engine import Engine
    from agentrt.tools import calculator

    key = resolve_api_key(api_key, api_key_file)
    engine = Engine.load(model, device=device, dtype=dtype)
    try:
        uvicorn.run(create_app(engine, api_key=key, tools=[calculator]), host=host, port=port,
                    log_level="info")
    finally:
        engine.close()
