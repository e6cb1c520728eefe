"""The FastAPI app: its routes, and `serve`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentrt.backends import LocalBackend
from agentrt.chat import ChatOptions, chat_constraint, prepare_chat
from agentrt.engine import Engine
from agentrt.errors import AgentrtError, InvalidRequestError, ModelNotFoundError
from agentrt.grammar import GrammarCompiler, compile_client
from agentrt.engine.sampling import SamplingParams
from agentrt.server._choices import (
    ChatChoice,
    CompletionChoice,
    agentrt_extension,
    prompt_logprobs_of,
    run_choices,
    score_prompt,
    sse_chunks,
    usage_of,
    warning_headers,
)
from agentrt.server._http import Guard, error_of, error_response
from agentrt.server._protocol import (
    API_KEY_ENV,
    COMPILE_TIMEOUT_ENV,
    AgentRunRequest,
    ChatCompletionRequest,
    CompletionRequest,
    check_common,
    check_request,
    completion_prompts,
    grammar_options,
    sampling_params_of,
    thread_options,
)
from agentrt.server._runs import agent_events, thread_events
from agentrt.tools import ToolRegistry, calculator

log = logging.getLogger(__name__)

# compiled at startup, in the background: the response formats clients send most, so that their first
# request finds them compiled (json_object's grammar also serves the schema {"type": "object"})
WARM_FORMATS = [{"type": "json_object"}] + [
    {"type": "json_schema", "json_schema": {"name": "response", "schema": {"type": kind}}}
    for kind in ("array", "string")]


def create_app(engine, *, api_key: str | None = None, model_names: list[str] | None = None,
               tools: list | None = None, compile_timeout: float | None = None) -> FastAPI:
    """An app serving `engine` (an agentrt Engine). `model_names`: the ids clients may ask for;
    `tools`: what `POST /v1/agent/runs` may call (side-effecting tools are always refused here);
    `compile_timeout`: seconds a request's grammar may take to compile before it is stopped (a 400;
    default $AGENTRT_COMPILE_TIMEOUT or 30: a large vocabulary on a busy CPU may need more)."""
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

        def warm() -> None:
            for fmt in WARM_FORMATS:
                compiler.compile(chat_constraint(ChatOptions(response_format=fmt)))

        async with anyio.create_task_group() as tg:  # warm the cache without holding up the start
            tg.start_soon(functools.partial(anyio.to_thread.run_sync, warm, abandon_on_cancel=True))
            yield
            tg.cancel_scope.cancel()

    app = FastAPI(title="agentrt", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.compiler = compiler
    created = int(time.time())

    app.add_middleware(Guard, api_key=api_key)

    @app.exception_handler(AgentrtError)
    async def agentrt_error(_: Request, exc: AgentrtError) -> JSONResponse:
        return error_of(exc)

    @app.exception_handler(Exception)  # ExceptionGroups of task groups too: answered by the error inside
    async def other_error(_: Request, exc: Exception) -> JSONResponse:
        return error_of(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"unknown route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        else:
            message = str(exc.detail)
        response = error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is a byte offset, not a parameter
            return error_response(400, f"invalid request: the body is not valid JSON ({first.get('ctx', {}).get('error', '')} "
                               f"at byte {first.get('loc', ['', '?'])[-1]})")
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        kind = f" ({first['type']})" if first.get("type") else ""  # e.g. less_than_equal, as vLLM names it
        return error_response(400, f"invalid request: {first.get('msg', 'malformed body')} at {'.'.join(loc) or 'body'}{kind}",
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
        check_request(body, engine)
        options = ChatOptions(tools=body.tools or [], tool_choice=body.tool_choice or "auto",
                              parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format,
                              grammar=body.guided_grammar or body.ebnf,
                              schema_options=grammar_options(body.grammar_options),
                              **({} if body.max_tool_calls is None else {"max_tool_calls": body.max_tool_calls}))
        top = body.top_logprobs or 0
        # tokenising and building the grammar are CPU work: a thread (with a loop of its own) does them;
        # each choice gets a matcher of its own (the compile is cached)
        with compile_client(request.client.host if request.client else None):  # kills counted per client
            prepared = [await anyio.to_thread.run_sync(anyio.run, prepare_chat, engine, compiler, body.messages,
                                                       options) for _ in range(body.n)]
        prompt_ids = prepared[0][0]
        headers = warning_headers(prepared[0][1])
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params_of(body, len(prompt_ids), engine.max_context, limit=limit,
                           logprobs=bool(body.logprobs) or top > 0, top_logprobs=top)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        k = body.prompt_logprobs
        scores = None if k is None else await score_prompt(engine, prompt_ids, k)
        extra = {"prompt_logprobs": None if scores is None else prompt_logprobs_of(scores, prompt_ids, k, engine.tokenizer)}
        choices = [ChatChoice(engine, i, ids, matcher, p, top, scores)
                   for i, ((ids, matcher), p) in enumerate(zip(prepared, params))]
        if body.stream:
            return StreamingResponse(sse_chunks(choices, rid, body.model, body.stream_options or {}, len(prompt_ids),
                                                first_extra=extra if scores is not None else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        results = await run_choices(request, rid, choices)
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
                        "logprobs": choice.all_logprobs, "agentrt": agentrt_extension(result)})
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": out, "usage": usage_of(results), **extra,
        }, headers=headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.model not in names:
            raise ModelNotFoundError(body.model, names)
        check_common(body)
        if body.suffix is not None:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by agentrt", param="suffix")
        prompts = await anyio.to_thread.run_sync(completion_prompts, engine, body.prompt)
        top = body.logprobs
        # the prompt's own logprobs: echoed with logprobs (OpenAI), or vLLM's prompt_logprobs
        echo_scores = body.echo and top is not None
        scored = max((top or 0) if echo_scores else 0, body.prompt_logprobs or 0)
        choices = []
        for k, ids in enumerate(prompts):
            params = sampling_params_of(body, len(ids), engine.max_context, limit=body.max_tokens,
                               logprobs=top is not None, top_logprobs=top or 0)
            echo = engine.tokenizer.decode(ids) if body.echo else ""
            scores = await score_prompt(engine, ids, scored) if echo_scores or body.prompt_logprobs is not None \
                else None
            choices += [CompletionChoice(engine, k * body.n + i, ids, p, top, echo, scores, body.prompt_logprobs)
                        for i, p in enumerate(params)]
        rid = f"cmpl-{secrets.token_hex(12)}"
        if body.stream:
            return StreamingResponse(sse_chunks(choices, rid, body.model, body.stream_options or {},
                                          sum(map(len, prompts))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await run_choices(request, rid, choices)
        if results is None:
            return Response(status_code=499)
        out = [{"index": c.index, "text": c.echo + r.content, "finish_reason": r.finish_reason,
                "logprobs": c.all_logprobs, "prompt_logprobs": c.prompt_logprobs} for c, r in zip(choices, results)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": body.model, "choices": out, "usage": usage_of(results, per_prompt=body.n)})

    @app.post("/v1/agent/runs")
    async def agent_runs(body: AgentRunRequest) -> Response:
        if body.mode not in ("plan", "dta", "react", "hogwild", "thread"):
            raise InvalidRequestError(f"mode {body.mode!r} is not one of plan, dta, react, hogwild, thread",
                                      param="mode")
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature)
        if body.mode == "hogwild":
            return StreamingResponse(agent_events(backend, ToolRegistry([]), body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if body.mode == "thread":
            options = thread_options(body.thread)
            events = thread_events(backend, ToolRegistry(tools or []), body.input, options, params)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not tools:
            raise InvalidRequestError("no tools are registered on this server", param="tools")
        return StreamingResponse(agent_events(backend, ToolRegistry(tools), body),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


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
