"""Backends: where a generation runs. The local engine (our forward, grammars, KV features) or any
OpenAI-compatible server (vLLM, SGLang, llama.cpp, another agentrt: agentrt.remote), behind one small
interface.

Both give the SDK and the planner two things: a chat turn with tools as a stream of ChatEvents
ending in a ChatResult, and a text LLM (prompt + optional EBNF grammar -> text chunks).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from agentrt.chat import ChatEvent, ChatOptions, ChatResult, prepare_chat, stream_chat
from agentrt.engine import Engine
from agentrt.engine.sampling import SamplingParams
from agentrt.errors import InvalidRequestError
from agentrt.grammar import Ebnf, GrammarCompiler, Matcher
from agentrt.engine.models import DEFAULT_MODEL
from agentrt.notes import collect_notes, note
from agentrt.remote import RemoteBackend

__all__ = ["Backend", "LocalBackend", "RemoteBackend", "open_backend", "collect_notes", "note"]

log = logging.getLogger(__name__)

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


def open_backend(model: Any = None, *, device: str | None = None, dtype: str | None = None) -> Backend:
    """A backend for `model`: a Backend or Engine as is, `openai:<base_url>#<model>` for a remote
    server, anything else a model name, directory or hub id for the local engine (on `device`, in
    `dtype`: see `Engine.load`)."""
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
