"""Thread mode on the local engine: one generation writes the whole reasoning tree; tools run inside it and
finished subtasks leave the KV cache (TIM/TIMRUN, "Subconscious Threads"; TIMRUN itself is closed source).

When a task's `tooluse.parameters` close, the sequence pauses (other sequences keep decoding), the tool
runs off the engine thread through the planner's executor (limits, timeouts, errors as data), and its
result is written into the sequence by prefill, accepted by the grammar, and decoding resumes: no round
trip, no re-prefill. When a task starts its conclusion, its closed subtask list enters the pruning
buffer; older lists leave the KV cache (see agentrt.engine.control for the exactness of that surgery). The text
returned is the full tree: pruning changes only what the model attends to.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from agentrt.engine.control import SequenceHandle
from agentrt.errors import ContextLengthError, InvalidRequestError
from agentrt.engine.sampling import SamplingParams
from agentrt.threads._pruning import PruneBuffer, ThreadStats, TokenBytes
from agentrt.threads._schema import ThreadSchema
from agentrt.threads._tracker import StructureTracker, TreeEvent
from agentrt.tools import ToolRegistry, ToolResult

__all__ = ["ThreadOptions", "ThreadResult", "ThreadToolCall", "run_thread", "thread_messages"]

log = logging.getLogger(__name__)

EventCallback = Callable[[TreeEvent], "Awaitable[None] | None"]


@dataclass(frozen=True)
class ThreadOptions:
    """How a thread run is shaped and pruned.

    max_depth: levels of tasks. pruning: prune closed subtask lists at all. buffer: closed lists kept in
    the cache (TIM's pruning buffer). max_recompute: longest tail after a pruned span that is recomputed
    (exact); longer tails are re-rotated only (approximate); None: always recompute. max_text_chars:
    cap on thoughts and conclusions, max_items: on tasks per list (see ThreadSchema). require_tool: the
    first task must call a tool.
    max_tool_calls: later calls get an error as their result. max_result_chars: longer results are
    written as a truncated string. tool_timeout: seconds per call for tools that set none.
    """

    max_depth: int = 3
    pruning: bool = True
    buffer: int = 1
    max_recompute: int | None = 512
    max_text_chars: int | None = None
    max_items: int | None = None
    require_tool: bool = False
    max_tool_calls: int = 16
    max_result_chars: int = 4000
    tool_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if self.buffer < 0:
            raise InvalidRequestError(f"buffer must be >= 0, got {self.buffer}", param="buffer")
        if self.max_recompute is not None and self.max_recompute < 0:
            raise InvalidRequestError(f"max_recompute must be >= 0 or None, got {self.max_recompute}",
                                      param="max_recompute")
        if self.max_tool_calls < 0 or self.max_result_chars < 16:
            raise InvalidRequestError("max_tool_calls must be >= 0 and max_result_chars >= 16",
                                      param="max_tool_calls")


@dataclass
class ThreadToolCall:
    path: tuple[int, ...]  # the task that called it
    tool_name: str
    arguments: Any
    result: ToolResult
    seconds: float = 0.0


@dataclass
class ThreadResult:
    """The full tree (pruning never shortens it), its answer, the calls made, and what was pruned."""

    text: str
    tree: dict | None  # None when the tree was cut short
    finish_reason: str  # stop | length
    tool_calls: list[ThreadToolCall] = field(default_factory=list)
    stats: ThreadStats = field(default_factory=ThreadStats)
    notes: list[str] = field(default_factory=list)  # e.g. what a remote backend could not do
    cut_by: str | None = None  # max_tokens | context, when the tree was cut short
    max_tokens: int = 0
    max_context: int = 0

    @property
    def complete(self) -> bool:
        return self.tree is not None

    @property
    def answer(self) -> Any:
        return None if self.tree is None else self.tree.get("answer")

    def raise_for_incomplete(self) -> None:
        """Raise a clear error when the tree was cut short."""
        if self.complete:
            return
        if self.cut_by == "context":
            raise ContextLengthError(self.stats.peak_kv_tokens, self.max_context, message=(
                f"the thread's live context reached the model's context of {self.max_context} tokens before "
                "the tree closed; prune more (pruning on, a smaller buffer), lower max_depth, or shorten the "
                "prompt"))
        raise InvalidRequestError(f"the reasoning tree was cut at max_tokens={self.max_tokens} before it "
                                  "closed: raise max_tokens, lower max_depth or cap max_text_chars",
                                  param="max_tokens")


def thread_messages(question: str, schema: ThreadSchema, tools: ToolRegistry,
                    instructions: str | None = None) -> list[dict]:
    """The chat messages that ask for a reasoning tree (system: format, tools, answer; user: question)."""
    lines = [instructions, ""] if instructions else []
    lines += [
        "Solve the task by writing a reasoning tree in JSON:",
        '{"reasoning": [task, ...], "answer": ...}',
        ('where a task is {"thought": "...", "tooluse": null or {"tool_name": "...", "parameters": {...}, '
         '"tool_result": ...}, "subtasks": null or [task, ...], "conclusion": "..."}.'),
        (f"Split hard tasks into subtasks, at most {schema.max_depth} levels deep. To use a tool, write "
         "its name and parameters: its tool_result is written for you. Each conclusion states what its "
         "task found."),
    ]
    if len(tools):
        lines.append("Tools:")
        lines += [f"- {t.name}: {t.description} Parameters: {json.dumps(t.parameters)}" for t in tools]
    if schema.answer_schema != {"type": "string"}:
        lines.append(f"The answer is JSON following this schema: {json.dumps(schema.answer_schema)}")
    return [{"role": "system", "content": "\n".join(lines)}, {"role": "user", "content": question}]


class ToolCaller:
    """Runs the tree's tool calls through the planner's executor and renders results for the tree."""

    def __init__(self, tools: ToolRegistry, options: ThreadOptions, executor=None) -> None:
        from agentrt.planner import ExecutionState, Executor

        self.executor = executor or Executor(tools, default_timeout=options.tool_timeout)
        self.state = ExecutionState()
        self.options = options
        self.calls: list[ThreadToolCall] = []

    async def call(self, path: tuple[int, ...], name: str, arguments: Any) -> ThreadToolCall:
        from agentrt.planner import Task

        t0 = time.perf_counter()
        if len(self.calls) >= self.options.max_tool_calls:
            result = ToolResult("refused", error=f"the limit of {self.options.max_tool_calls} tool calls "
                                                 "per thread is reached")
        elif not isinstance(arguments, dict):
            result = ToolResult("invalid_args", error="the parameters are not a JSON object")
        else:
            tid = self.state.next_id
            await self.executor.run([Task(tid, name, arguments)], self.state)
            result = self.state.results[tid]
        call = ThreadToolCall(path, name, arguments, result, time.perf_counter() - t0)
        self.calls.append(call)
        return call

    def render(self, schema: ThreadSchema, result: ToolResult) -> str:
        """The tool_result value as tree text: the value, or {"error", "kind"}; too long: truncated text."""
        value = result.value if result.ok else {"error": result.error, "kind": result.kind}
        text = schema.render_result(value)
        if len(text) > self.options.max_result_chars:
            text = schema.render_result(result.observation(self.options.max_result_chars))
        return text


class _ThreadControl:
    """The engine-thread side: follows the tree token by token, pauses for tools, prunes (a
    SequenceController). Everything it reports goes to the event loop through `post`."""

    def __init__(self, vocab: list[bytes], options: ThreadOptions, stats: ThreadStats,
                 post: Callable[..., None], on_call: Callable[[SequenceHandle, TreeEvent], None]) -> None:
        self.vocab = vocab
        self.options = options
        self.stats = stats
        self.post = post
        self.on_call = on_call
        self.tracker = StructureTracker()
        self.tokens = TokenBytes()
        self.buffer = PruneBuffer(options.buffer) if options.pruning else None

    def on_tokens(self, seq: SequenceHandle, token_ids: list[int]) -> None:
        self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, seq.live_tokens)
        for t in token_ids:
            piece = self.vocab[t]
            self.tokens.add(len(piece))
            for ev in self.tracker.feed(piece):
                self._event(seq, ev)

    def _event(self, seq: SequenceHandle, ev: TreeEvent) -> None:
        self.post(ev)
        if ev.kind == "tool_call":
            seq.pause()
            self.on_call(seq, ev)
        elif ev.kind == "conclusion_start" and ev.data is not None:
            span = self.tokens.inside(*ev.data)
            self.stats.prunable.append(span)
            if self.buffer is None:
                return
            for start, end in self.buffer.push(span):
                info = seq.prune(start, end, max_recompute=self.options.max_recompute)
                self.stats.add(info)
                self.post(TreeEvent("prune", ev.offset, ev.path, {
                    "removed": info.removed, "recomputed": info.recomputed, "rerotated": info.rerotated,
                    "live_tokens": seq.live_tokens}))


_VOCABS: dict[str, list[bytes]] = {}


def _vocab(compiler) -> list[bytes]:
    """Each token's bytes (xgrammar's decoded vocabulary), once per tokenizer."""
    if compiler.fingerprint not in _VOCABS:
        _VOCABS[compiler.fingerprint] = [bytes(b) for b in compiler.info.decoded_vocab]
    return _VOCABS[compiler.fingerprint]


async def run_thread(model: Any, question: str, tools: ToolRegistry | Iterable[Any] = (), *,
                     options: ThreadOptions | None = None, answer_schema: dict | type | None = None,
                     params: SamplingParams | None = None, instructions: str | None = None,
                     executor=None, constraint: Any = None, on_event: EventCallback | None = None,
                     **schema_options: Any) -> ThreadResult:
    """Answer `question` with a reasoning tree; tools run inside the generation; finished subtasks pruned.

    `model`: an Engine, a LocalBackend, or any Backend (remote backends fall back to one request per tool
    call, without pruning, and say so in `notes`). `constraint`: decode under another grammar instead of
    the tree schema (it must still produce a tree, e.g. a forced shape for benchmarks). `on_event` gets
    the tracker's events plus `tool_end` (data: the ThreadToolCall) and `prune` (data: what was removed).
    `schema_options`: JsonSchema options for tool parameters and the answer. A tree cut short comes back
    with `complete` False; `raise_for_incomplete()` turns that into an error.
    """
    from agentrt.backends import LocalBackend, open_backend

    options = options or ThreadOptions()
    params = params or SamplingParams(max_tokens=2048)
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
    schema = ThreadSchema(registry, max_depth=options.max_depth, answer_schema=answer_schema,
                          require_tool=options.require_tool, max_items=options.max_items,
                          max_text_chars=options.max_text_chars,
                          **schema_options)
    backend = open_backend(model)
    caller = ToolCaller(registry, options, executor)
    if not isinstance(backend, LocalBackend):
        from agentrt.threads._remote import run_remote

        if constraint is not None:
            raise InvalidRequestError("constraint= needs the local engine; a remote backend decodes the tree "
                                      "schema", param="constraint")

        return await run_remote(backend, question, schema, registry, caller, params, instructions, on_event)
    engine = backend.engine
    compiled = await backend.compiler.compile_async(constraint if constraint is not None else schema)
    from agentrt.grammar import Matcher

    matcher = Matcher(compiled, stop_token_ids=sorted(engine.eos_token_ids))
    matcher.close_by(params.max_tokens)  # as every constrained path: open values close near the budget
    prompt_ids = engine.chat_prompt(thread_messages(question, schema, registry, instructions))
    stats = ThreadStats(pruning=options.pruning, prompt_tokens=len(prompt_ids))
    loop = asyncio.get_running_loop()
    events_send, events_recv = anyio.create_memory_object_stream[TreeEvent](math.inf)
    calls_send, calls_recv = anyio.create_memory_object_stream[tuple[SequenceHandle, TreeEvent]](math.inf)
    control = _ThreadControl(
        _vocab(backend.compiler), options, stats,
        post=lambda ev: loop.call_soon_threadsafe(_send_open, events_send, ev),
        on_call=lambda seq, ev: loop.call_soon_threadsafe(_send_open, calls_send, (seq, ev)))

    async def run_tools() -> None:
        async with calls_recv:
            async for seq, ev in calls_recv:
                call = await caller.call(ev.path, ev.data["tool_name"], ev.data["arguments"])
                # what the grammar still forces before the result (jump-forward stops short of a token
                # boundary the result could merge with), the result, and the "}" that closes tooluse: a
                # number result must not run on
                text = matcher.find_jump_forward_string() + caller.render(schema, call.result) + "}"
                ids = engine.tokenizer.encode(text, add_special_tokens=False)
                stats.injected_tokens += len(ids)
                seq.resume(ids)
                await events_send.send(TreeEvent("tool_end", ev.offset, ev.path, call))

    async def deliver() -> None:
        async with events_recv:
            async for ev in events_recv:
                if on_event is not None:
                    out = on_event(ev)
                    if inspect.isawaitable(out):
                        await out

    parts: list[str] = []
    finish, completion, first, last = "stop", 0, None, None
    async with anyio.create_task_group() as tg:
        tg.start_soon(deliver)
        try:
            async with anyio.create_task_group() as tools_tg:
                tools_tg.start_soon(run_tools)
                async for out in engine.stream(prompt_ids, params, matcher, control=control):
                    now = time.perf_counter()
                    first = first if first is not None or not out.token_ids else now
                    last = now if out.token_ids else last
                    parts.append(out.text)
                    finish, completion = out.finish_reason or finish, out.completion_tokens
                tools_tg.cancel_scope.cancel()  # the sequence ended: no call is waited for any more
        finally:
            calls_send.close()
            events_send.close()  # deliver() hands on what is queued, then ends
    stats.generated_tokens = completion
    stats.tool_calls = len(caller.calls)
    stats.decode_seconds = (last - first) if first is not None and last is not None else 0.0
    text = "".join(parts)
    result = ThreadResult(text, _tree(text, control.tracker), finish, caller.calls, stats,
                          max_tokens=params.max_tokens, max_context=engine.max_context)
    if not result.complete:
        result.cut_by = "max_tokens" if completion >= params.max_tokens else "context"
    return result


def _send_open(stream, item) -> None:
    """send_nowait unless the run already closed the stream (a late report from the engine thread)."""
    try:
        stream.send_nowait(item)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass


def _tree(text: str, tracker: StructureTracker) -> dict | None:
    if not tracker.finished:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        log.warning("a finished tree did not parse as JSON")
        return None
