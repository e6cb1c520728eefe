"""Thread mode through a backend without our KV cache (any OpenAI-compatible server): the fallback.

No pruning, and tools run between requests: the tree streams under the tree grammar until a task's
`tooluse.parameters` close; that request is cut there, the tool runs, and a new request carries the
tree so far (with the tool result) in its prompt and continues under the grammar of the rest of a tree
from that task on (`ThreadSchema.ebnf(resume_at=path)`). Every request re-sends the whole context.
"""

from __future__ import annotations

import inspect
import json
import logging
import time

from agentrt.engine.sampling import SamplingParams
from agentrt.threads._pruning import ThreadStats
from agentrt.threads._runner import EventCallback, ThreadResult, ToolCaller, thread_messages
from agentrt.threads._schema import ThreadSchema
from agentrt.threads._tracker import StructureTracker, TreeEvent
from agentrt.tools import ToolRegistry

__all__ = ["run_remote"]

log = logging.getLogger(__name__)

_CONTINUE = "\n\nYour reasoning tree so far is below; continue it exactly where it stops:\n"


async def run_remote(backend, question: str, schema: ThreadSchema, tools: ToolRegistry, caller: ToolCaller,
                     params: SamplingParams, instructions: str | None, on_event: EventCallback | None
                     ) -> ThreadResult:
    messages = thread_messages(question, schema, tools, instructions)
    base = "\n\n".join(m["content"] for m in messages)
    note = (f"backend {backend.name!r} has no KV features: no pruning; tools ran between requests, each "
            "request re-sending the tree so far")
    log.warning("thread mode: %s", note)
    tracker = StructureTracker()
    stats = ThreadStats(pruning=False)  # text chunks carry no token counts: only calls and seconds are kept
    finish, requests, first = "stop", 0, time.perf_counter()

    async def emit(ev: TreeEvent) -> None:
        if on_event is not None:
            out = on_event(ev)
            if inspect.isawaitable(out):
                await out

    resume: tuple[int, ...] = ()  # the task whose tool just ran; () before the first request
    while not tracker.finished:
        requests += 1
        grammar, prompt = schema.ebnf()[0], base
        if resume:
            grammar, prompt = schema.ebnf(resume_at=resume)[0], base + _CONTINUE + tracker.text()
        call_event = None
        stream = backend.text(prompt, grammar, params)
        try:
            async for chunk in stream:
                for byte in chunk.encode():
                    for ev in tracker.feed(bytes([byte])):
                        await emit(ev)
                        call_event = ev if ev.kind == "tool_call" else call_event
                    if call_event is not None:  # cut the request here: the tool's result is ours to write
                        break
                if call_event is not None:
                    break
        finally:
            await stream.aclose()
        if call_event is None:
            finish = "stop" if tracker.finished else "length"
            break
        call = await caller.call(call_event.path, call_event.data["tool_name"], call_event.data["arguments"])
        comma, colon = schema.separators
        for ev in tracker.feed(f'{comma}"tool_result"{colon}' + caller.render(schema, call.result)):
            await emit(ev)
        await emit(TreeEvent("tool_end", call_event.offset, call_event.path, call))
        resume = call_event.path
    stats.tool_calls = len(caller.calls)
    stats.decode_seconds = time.perf_counter() - first
    text = tracker.text()
    try:
        tree = json.loads(text) if tracker.finished else None
    except json.JSONDecodeError:  # a server that ignored the grammar
        tree = None
    result = ThreadResult(text, tree, finish, caller.calls, stats, [f"{note} ({requests} requests)"],
                          max_tokens=params.max_tokens)
    if tree is None:
        result.cut_by = "max_tokens"
    return result
