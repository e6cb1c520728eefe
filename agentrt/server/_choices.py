"""Running a request's choices (n of them) and shaping their answers, streamed (SSE) and not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import anyio
from fastapi import Request

from agentrt.chat import ChatResult, stream_chat
from agentrt.engine.kv import OutOfPagesError
from agentrt.engine.sampling import SamplingParams
from agentrt.engine.sequence import PromptLogprobs
from agentrt.errors import OverloadedError
from agentrt.server._http import error_parts, leaf_error
from agentrt.server._protocol import WARNINGS_HEADER

log = logging.getLogger(__name__)


def warning_headers(matcher) -> dict[str, str]:
    """What the request's grammar does not enforce, for the client to see (not only in our log)."""
    warnings = list(getattr(matcher, "warnings", None) or [])
    if not warnings:
        return {}
    text = json.dumps(warnings)  # ASCII: safe in a header
    return {WARNINGS_HEADER: text if len(text) <= 4096 else json.dumps(warnings[:8] + [f"... {len(warnings)} in all"])}


class Tap:
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


def token_entries(outputs: list) -> list[tuple[int, float, dict[int, float] | None]]:
    """(token, logprob, alternatives) per generated token; a token the grammar forced had no choice:
    its log-probability is 0 under the distribution sampled from (the mask left it alone)."""
    out = []
    for o in outputs:
        lps = o.logprobs or [None] * len(o.token_ids)
        tops = o.top_logprobs or [None] * len(o.token_ids)
        for t, lp, top in zip(o.token_ids, lps, tops):
            out.append((t, 0.0 if lp is None else lp, top if top is not None else {t: 0.0 if lp is None else lp}))
    return out


async def score_prompt(engine, ids: list[int], top: int) -> PromptLogprobs:
    """The prompt's own logprobs (echo with logprobs, prompt_logprobs): one prefill on the engine thread,
    whose pages the generation that follows reads from the prefix cache."""
    try:
        return await asyncio.wrap_future(engine.call(lambda e: e.runner.score_prompt(ids, top)))
    except OutOfPagesError as exc:
        raise OverloadedError(f"no KV cache room to score the prompt's {len(ids)} tokens now ({exc}); "
                              "retry") from None


def prompt_logprobs_of(scores: PromptLogprobs, ids: list[int], k: int, tokenizer) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token after the first, {token id: {logprob, rank, decoded_token}}
    for its k most likely tokens and itself."""
    out: list[dict | None] = [None]
    for t, lp, rank, top in zip(ids[1:], scores.logprobs[1:], scores.ranks[1:], scores.top_logprobs[1:]):
        entry = {t: (lp, rank)}
        for r, (a, alp) in enumerate(list(top.items())[:k], start=1):
            entry.setdefault(a, (alp, r))
        out.append({str(a): {"logprob": alp, "rank": r, "decoded_token": tokenizer.decode([a])}
                    for a, (alp, r) in entry.items()})
    return out


class ChoiceRun:
    """One choice of a request: its decode, with chunk payloads for SSE and logprobs in OpenAI's shape.
    `prompt`: the prompt's own logprobs, when the request asked for them (scored before the decode)."""

    def __init__(self, engine, index: int, prompt_ids: list[int], params: SamplingParams, top: int | None,
                 prompt: PromptLogprobs | None = None) -> None:
        self.tap, self.index, self.prompt_ids, self.params, self.top = Tap(engine), index, prompt_ids, params, top
        self.prompt = prompt
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
                if self.prompt is not None:  # the scoring pass put the prompt in the cache: not a hit
                    value.cached_tokens = self.prompt.cached_tokens
                text, before = held if held is not None else (None, None)
                yield self._payload(text, join_logprobs(before, logprobs), value), value
                return
            else:
                if held is not None:
                    yield self._payload(*held), None
                    held = None
                yield self._payload(None, logprobs, extra=value), None

    async def run(self) -> ChatResult:
        """Decode to the end; `self.all_logprobs` then holds the logprobs of every token."""
        async for payload, result in self.payloads():
            self.all_logprobs = join_logprobs(self.all_logprobs, payload["logprobs"])
            if result is not None:
                return result
        raise AssertionError("a decode ended without a result")


def join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Two chunks' logprobs as one (either shape: every list field concatenated)."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] if isinstance(a[k], list) else a[k] for k in a}


class ChatChoice(ChoiceRun):
    def __init__(self, engine, index: int, prompt_ids: list[int], matcher, params: SamplingParams, top: int,
                 prompt: PromptLogprobs | None = None) -> None:
        super().__init__(engine, index, prompt_ids, params, top, prompt)
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
            choice["agentrt"] = agentrt_extension(result)
        return choice

    def logprobs(self, outputs: list) -> dict | None:
        if not self.params.logprobs:
            return None

        def item(t: int, lp: float) -> dict:
            text = self._text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in list(alts.items())[:self.top]]}
                   for t, lp, alts in token_entries(outputs)]
        return {"content": content, "refusal": None}


class CompletionChoice(ChoiceRun):
    """A legacy completion: `echo` is the prompt's text, given back first; with `prompt` (its scores)
    and `top` set, `logprobs` starts with the prompt's tokens (the first one's null, as OpenAI gives it);
    `prompt_top` (vLLM's prompt_logprobs) adds their alternatives in vLLM's shape to the first payload."""

    def __init__(self, engine, index: int, prompt_ids: list[int], params: SamplingParams, top: int | None,
                 echo: str, prompt: PromptLogprobs | None = None, prompt_top: int | None = None) -> None:
        super().__init__(engine, index, prompt_ids, params, top, prompt)
        self.echo = echo
        self._echoed = bool(echo) and prompt is not None  # the prompt's logprobs are still to go out
        self._offset = 0 if self._echoed else len(echo)  # text_offset of the next token
        self.prompt_logprobs = None if prompt_top is None else prompt_logprobs_of(prompt, prompt_ids, prompt_top,
                                                                                  engine.tokenizer)
        self._first = True

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
                                           out.completion_tokens, out.incomplete, cached_tokens=out.cached_tokens)

    def first(self) -> None:
        return None

    def _payload(self, text: str | None, logprobs: dict | None, result: ChatResult | None = None,
                 extra: dict | None = None) -> dict:
        payload = {"index": self.index, "text": text or "", "logprobs": logprobs,
                   "finish_reason": None if result is None else result.finish_reason}
        if self._first and self.prompt_logprobs is not None:
            payload["prompt_logprobs"] = self.prompt_logprobs
        self._first = False
        return payload

    def _prompt_entries(self) -> list[tuple[int, float | None, dict[int, float] | None]]:
        p, ids = self.prompt, self.prompt_ids
        return [(ids[0], None, None), *zip(ids[1:], p.logprobs[1:], p.top_logprobs[1:])]

    def logprobs(self, outputs: list) -> dict | None:
        """The legacy shape: tokens, token_logprobs, top_logprobs (the sampled token always among them,
        as vLLM reports it) and text_offset; the echoed prompt's tokens first."""
        if self.top is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []

        def add(entries) -> None:
            for t, lp, alts in entries:
                text = self._text(t)
                tokens.append(text)
                lps.append(lp)
                if alts is None:
                    tops.append(None)
                else:
                    best = dict(list(alts.items())[:self.top])
                    best.setdefault(t, lp)
                    tops.append({self._text(a): alp for a, alp in best.items()})
                offsets.append(self._offset)
                self._offset += len(text)

        if self._echoed:
            add(self._prompt_entries())
            self._echoed, self._offset = False, len(self.echo)  # the text goes on after the whole echo
        add(token_entries(outputs))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def run_choices(request: Request, rid: str, choices: list[ChoiceRun]) -> list[ChatResult] | None:
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
        raise leaf_error(group) from None
    if any(r is None for r in results):
        return None
    return results  # type: ignore[return-value]


def agentrt_extension(result: ChatResult) -> dict:
    """The `agentrt` field of a finished choice: `incomplete` when max_tokens cut a constrained output
    before its grammar could end (finish_reason is then "length"), `refused_calls` for exact repeats."""
    return {"incomplete": result.incomplete, "refused_calls": result.refused}


def usage_of(results: list[ChatResult], per_prompt: int | None = None) -> dict:
    """Token counts of a request: its prompt counted once (once per prompt of a completions batch,
    whose choices come `per_prompt` to a prompt), every choice's completion."""
    step = per_prompt or len(results)
    prompt = sum(r.prompt_tokens for r in results[::step])
    completion = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results[::step])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def sse_chunks(choices: list[ChoiceRun], rid: str, model: str, options: dict[str, Any], prompt_tokens: int,
                     first_extra: dict | None = None):
    """SSE chunks of every choice, interleaved as they come; `include_usage` adds a last chunk with the
    usage and no choices, and with it `continuous_usage_stats` (vLLM's extension) the usage so far on
    every chunk. `first_extra`: top-level fields of the first chunk (chat's prompt_logprobs)."""
    created = int(time.time())
    chat = isinstance(choices[0], ChatChoice)
    kind = "chat.completion.chunk" if chat else "text_completion"
    continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))

    def usage(completion: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def chunk(choice: dict | None, totals: dict | None = None, extra: dict | None = None) -> str:
        obj: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                               "choices": [] if choice is None else [choice], **(extra or {})}
        if continuous and totals is None:
            totals = usage(sum(c.tokens_so_far() for c in choices))
        if totals is not None:
            obj["usage"] = totals
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    extra = first_extra or None
    for c in choices:
        first = c.first()
        if first is not None:
            yield chunk(first, extra=extra)
            extra = None
    results: list[ChatResult] = []
    try:
        async for choice, result in merge_streams([c.payloads() for c in choices], choices[0].tap.started):
            if result is not None:
                results.append(result)
            yield chunk(choice)
        if options.get("include_usage"):
            cached = {"cached_tokens": results[0].cached_tokens if results else 0}
            yield chunk(None, {**usage(sum(r.completion_tokens for r in results)), "prompt_tokens_details": cached})
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as OpenAI does
        log.warning("%s failed mid-stream: %r", rid, exc)
        yield f"data: {json.dumps(error_parts(exc)[1])}\n\n"
    yield "data: [DONE]\n\n"


async def merge_streams(streams: list, first_started: anyio.Event):
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
