"""Backends: where a generation runs. The local engine (our forward, grammars, KV features) or any
OpenAI-compatible server (vLLM, SGLang, another agentrt) over httpx, behind one small interface.

Both give the SDK and the planner two things: a chat turn with tools as a stream of ChatEvents
ending in a ChatResult, and a text LLM (prompt + optional EBNF grammar -> text chunks).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from agentrt.chat import ChatEvent, ChatOptions, ChatResult, ToolCall, prepare_chat, stream_chat
from agentrt.errors import EngineError, InvalidRequestError
from agentrt.sampling import SamplingParams

__all__ = ["Backend", "LocalBackend", "RemoteBackend", "open_backend", "collect_notes", "note"]

log = logging.getLogger(__name__)

# What a backend could not do as asked, said where the run can see it (RunResult.notes): each run
# collects into its own list (a context variable, so concurrent runs keep theirs apart).
_NOTES: ContextVar[list[str] | None] = ContextVar("agentrt_backend_notes", default=None)


@contextmanager
def collect_notes() -> Iterator[list[str]]:
    """Collect the notes backends make while the block runs (the Agent puts them in RunResult.notes)."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(message: str) -> None:
    """Say what was not enforced as asked: logged, and kept for the run's notes (once per run)."""
    notes = _NOTES.get()
    if notes is None or message not in notes:
        log.warning("%s", message)
    if notes is not None and message not in notes:
        notes.append(message)


class Backend(Protocol):
    name: str
    kv_features: bool  # thread pruning and hogwild need our own engine

    def chat(self, messages: list[dict], options: ChatOptions, params: SamplingParams
             ) -> AsyncIterator[ChatEvent | ChatResult]: ...

    def text(self, prompt: str, grammar: str | None, params: SamplingParams) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class LocalBackend:
    """The in-process engine with xgrammar constraints."""

    kv_features = True

    def __init__(self, engine, *, owns_engine: bool = False, compiler=None) -> None:
        from agentrt.grammar import GrammarCompiler

        self.engine = engine
        self.name = engine.name
        self.compiler = compiler or GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size)
        self._owns = owns_engine

    async def chat(self, messages: list[dict], options: ChatOptions, params: SamplingParams
                   ) -> AsyncIterator[ChatEvent | ChatResult]:
        prompt_ids, matcher = await prepare_chat(self.engine, self.compiler, messages, options)
        async for ev in stream_chat(self.engine, prompt_ids, matcher, params):
            yield ev

    async def text(self, prompt: str, grammar: str | None, params: SamplingParams) -> AsyncIterator[str]:
        from agentrt.grammar import Ebnf, Matcher

        ids = self.engine.chat_prompt([{"role": "user", "content": prompt}])
        matcher = None
        if grammar is not None:
            compiled = await self.compiler.compile_async(Ebnf(grammar))
            matcher = Matcher(compiled, stop_token_ids=sorted(self.engine.eos_token_ids))
            matcher.close_by(params.max_tokens)  # as every constrained path: open values close near the budget
        async for out in self.engine.stream(ids, params, matcher):
            if out.text:
                yield out.text

    async def aclose(self) -> None:
        if self._owns:
            self.engine.close()


class RemoteBackend:
    """Any OpenAI-compatible server. Constraints travel as `tools`/`response_format`; plan grammars as
    the EBNF extensions vLLM (`guided_grammar`) and SGLang (`ebnf`) accept."""

    kv_features = False

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.name = model
        self.base_url = base_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._http: Any = None  # an httpx.AsyncClient, made in (and only used from) one event loop
        self._http_loop: Any = None

    @property
    def http(self):
        """The httpx client of the running event loop. Its connections belong to the loop that opened
        them, so a client made in another loop (one `run_sync` started and closed) is not reused."""
        import anyio.lowlevel
        import httpx

        loop = anyio.lowlevel.current_token()
        if self._http is not None and self._http_loop != loop:
            log.debug("event loop changed: a new httpx client for %s", self.base_url)
            self._http = None
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
            self._http_loop = loop
        return self._http

    async def release(self) -> None:
        """Close the connections of the running loop's client (before that loop ends); the next request
        opens new ones. The backend stays usable."""
        import anyio.lowlevel

        client, loop, self._http, self._http_loop = self._http, self._http_loop, None, None
        if client is not None and loop == anyio.lowlevel.current_token():
            await client.aclose()  # a client of a loop that has ended has nothing left to close there

    def _body(self, messages: list[dict], params: SamplingParams, **extra: Any) -> dict:
        body = {"model": self.name, "messages": messages, "stream": True, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, **extra}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        return body

    async def _chunks(self, body: dict) -> AsyncIterator[dict]:
        async with self.http.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")[:500]
                raise (InvalidRequestError if r.status_code < 500 else EngineError)(
                    f"{self.base_url} answered {r.status_code}: {detail}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise EngineError(f"{self.base_url}: {obj['error'].get('message')}")
                yield obj

    async def chat(self, messages: list[dict], options: ChatOptions, params: SamplingParams
                   ) -> AsyncIterator[ChatEvent | ChatResult]:
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}}
        if options.tools:
            extra.update(tools=options.tools, tool_choice=options.tool_choice,
                         parallel_tool_calls=options.parallel_tool_calls)
        if options.response_format:
            extra["response_format"] = options.response_format
        content, calls, reason, usage = "", [], "stop", {}
        async for obj in self._chunks(self._body(messages, params, **extra)):
            usage = obj.get("usage") or usage
            for choice in obj.get("choices", []):
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    content += delta["content"]
                    yield ChatEvent("content", delta["content"])
                for tc in delta.get("tool_calls") or []:
                    i, fn = tc.get("index", 0), tc.get("function") or {}
                    if i >= len(calls):
                        calls.append(ToolCall(tc.get("id") or f"call_{i}", fn.get("name", ""), ""))
                        yield ChatEvent("call_start", index=i, call_id=calls[i].id, name=calls[i].name)
                    if fn.get("arguments"):
                        calls[i].arguments += fn["arguments"]
                        yield ChatEvent("call_args", fn["arguments"], index=i)
                reason = choice.get("finish_reason") or reason
        for i, call in enumerate(calls):  # a server reports a cut-short call only through finish_reason
            call.complete = not (reason == "length" and i == len(calls) - 1)
        yield ChatResult(content, calls, reason, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    async def text(self, prompt: str, grammar: str | None, params: SamplingParams) -> AsyncIterator[str]:
        extra = {"guided_grammar": grammar, "ebnf": grammar} if grammar is not None else {}
        async for obj in self._chunks(self._body([{"role": "user", "content": prompt}], params, **extra)):
            for choice in obj.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text

    async def aclose(self) -> None:
        await self.release()


def open_backend(model: Any = None, *, device: str | None = None, dtype: str | None = None) -> Backend:
    """A backend for `model`: a Backend or Engine as is, `openai:<base_url>#<model>` for a remote
    server, anything else a model name, directory or hub id for the local engine (on `device`, in
    `dtype`: see `Engine.load`)."""
    from agentrt.engine import Engine
    from agentrt.models import DEFAULT_MODEL

    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, Engine):
        return LocalBackend(model)
    if hasattr(model, "chat") and hasattr(model, "text"):
        return model
    if isinstance(model, str) and model.startswith("openai:"):
        url, _, name = model[len("openai:"):].partition("#")
        if not url or not name:
            raise InvalidRequestError("remote models are written openai:<base_url>#<model>", param="model")
        return RemoteBackend(url, name)
    return LocalBackend(Engine.load(model, device=device, dtype=dtype), owns_engine=True)
