"""The executor: runs plan tasks as soon as their dependencies finish (LLMCompiler's executor, Kim et
al. 2024, rebuilt on anyio structured concurrency).

Dispatch is event-driven (a finishing task starts its ready dependents; nothing polls); tasks may
still be arriving from the streaming parser. Global and per-tool concurrency limits, per-task
timeouts and bounded retries apply; every failure becomes an observation (a ToolResult), never a
hang; cancelling the caller cancels every tool in flight.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from agentrt.errors import PlanError
from agentrt.planner._task import ReferenceResolutionError, Task, resolve
from agentrt.planner._trace import Trace
from agentrt.tools import Tool, ToolContext, ToolRegistry, ToolResult

__all__ = ["Executor", "ExecutionState", "Approver", "approve_in_terminal", "ask_approval", "refusal"]

log = logging.getLogger(__name__)

# approve(tool, resolved_args, call) -> bool (or an awaitable of it); call: the plan's Task, or the
# ToolCall in the SDK's chat mode
Approver = Callable[[Tool, Any, Any], "bool | Awaitable[bool]"]


async def ask_approval(approve: Approver | None, tool: Tool, args: Any, call: Any) -> bool:
    """Whether `tool` may run with `args`: `approve(tool, args, call)`, sync or async (`call` is
    the plan's Task, or the chat's ToolCall in the SDK). No approver, or one that fails, refuses."""
    if approve is None:
        return False
    try:
        verdict = approve(tool, args, call)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except Exception:
        log.warning("approval callback failed for %s; refusing", tool.name, exc_info=True)
        return False
    return bool(verdict)


def refusal(tool: Tool) -> ToolResult:
    """What the model sees when a tool with side effects was not approved."""
    return ToolResult("refused", error=f"{tool.name} has side effects and was not approved")


async def approve_in_terminal(tool: Tool, args: Any, task: Task) -> bool:
    """An Approver for interactive use (`agentrt chat`): asks y/N on the terminal. The server passes
    no approver, so tools with side effects are refused there."""
    question = f"agentrt: allow task ${task.id} {tool.name}({json.dumps(args, ensure_ascii=False)[:500]})? [y/N] "
    answer = await anyio.to_thread.run_sync(input, question)
    return answer.strip().lower() in ("y", "yes")



@dataclass
class ExecutionState:
    """Everything an agent run has executed so far; passed to each round so a replan sees earlier
    results and never re-runs a finished task."""

    tasks: dict[int, Task] = field(default_factory=dict)
    results: dict[int, ToolResult] = field(default_factory=dict)
    resolved_args: dict[int, Any] = field(default_factory=dict)
    trace: Trace = field(default_factory=Trace)
    calls: dict[str, int] = field(default_factory=dict)  # finished ok call (tool + args) -> task id

    @property
    def next_id(self) -> int:
        return max(self.tasks, default=0) + 1

    def values(self) -> Mapping[int, Any]:
        """A live view: task id -> value, for tasks that succeeded."""
        return _OkValues(self.results)


class _OkValues(Mapping[int, Any]):
    def __init__(self, results: dict[int, ToolResult]) -> None:
        self._results = results

    def __getitem__(self, tid: int) -> Any:
        r = self._results[tid]
        if not r.ok:
            raise KeyError(tid)
        return r.value

    def __contains__(self, tid: object) -> bool:
        r = self._results.get(tid)  # type: ignore[call-overload]
        return r is not None and r.ok

    def __iter__(self) -> Iterator[int]:
        return (i for i, r in self._results.items() if r.ok)

    def __len__(self) -> int:
        return sum(r.ok for r in self._results.values())


def _call_key(tool: str, args: Any) -> str | None:
    try:
        return tool + json.dumps(args, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return None


class Executor:
    """Runs tasks against a registry.

    Args:
        tools: the registry tasks call into.
        max_concurrency: tasks running at once, over all tools.
        max_threads: worker threads for synchronous tools.
        default_timeout: seconds per attempt for tools that set none (None: no limit).
        retries: overrides every tool's own `retries` when given.
        backoff: first retry delay in seconds; doubles per attempt.
        approve: called before a `side_effects=True` tool runs; without it such tools are refused.
        tool_limits: per-tool concurrency overrides {name: n}.
        context_state: shared dict handed to tools through `ToolContext.state`.

    Limiters are created on first use and belong to that event loop: use an Executor within one loop.
    """

    def __init__(
        self,
        tools: ToolRegistry,
        *,
        max_concurrency: int = 32,
        max_threads: int = 16,
        default_timeout: float | None = 60.0,
        retries: int | None = None,
        backoff: float = 0.05,
        approve: Approver | None = None,
        tool_limits: Mapping[str, int] | None = None,
        context_state: dict[str, Any] | None = None,
    ) -> None:
        self.tools = tools
        self.max_concurrency = max_concurrency
        self.max_threads = max_threads
        self.default_timeout = default_timeout
        self.retries = retries
        self.backoff = backoff
        self.approve = approve
        self.tool_limits = dict(tool_limits or {})
        self.context_state = context_state if context_state is not None else {}
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    def _limiter(self, key: str, tokens: int) -> anyio.CapacityLimiter:
        # created lazily: a limiter belongs to the running event loop
        if key not in self._limiters:
            self._limiters[key] = anyio.CapacityLimiter(tokens)
        return self._limiters[key]

    async def run(
        self, tasks: AsyncIterable[Task] | Iterable[Task], state: ExecutionState | None = None
    ) -> ExecutionState:
        """Execute `tasks` (possibly still streaming in) on top of `state`; returns the updated state
        once every task has a result. If `tasks` raises (or reuses a task id: PlanError), tools in flight
        are cancelled and that exception propagates; tool failures never raise."""
        state = state if state is not None else ExecutionState()
        run = _Run(self, state)
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            run.tg = tg
            try:
                if isinstance(tasks, AsyncIterable):
                    async for task in tasks:
                        run.arrive(task)
                else:
                    for task in tasks:
                        run.arrive(task)
            except Exception as e:  # the task source failed: stop everything, report it as itself
                failure = e
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        for tid in run.new_ids:
            r = state.results[tid]
            key = _call_key(state.tasks[tid].tool, state.resolved_args.get(tid))
            if r.ok and key is not None and tid in state.resolved_args:
                state.calls.setdefault(key, tid)
        return state


class _Run:
    """Bookkeeping of one `Executor.run`: who waits on whom."""

    def __init__(self, ex: Executor, state: ExecutionState) -> None:
        self.ex = ex
        self.state = state
        self.tg: anyio.abc.TaskGroup | None = None
        self.pending: set[int] = set()
        self.waiting: dict[int, list[Task]] = {}
        self.missing: dict[int, int] = {}
        self.new_ids: list[int] = []
        self.global_limit = ex._limiter("*", ex.max_concurrency)
        self.thread_limit = ex._limiter("*threads", ex.max_threads)

    def arrive(self, task: Task) -> None:
        if task.id in self.state.tasks:
            raise PlanError(f"task id {task.id} is already used in this run", task.line)
        self.state.tasks[task.id] = task
        self.new_ids.append(task.id)
        self.pending.add(task.id)
        span = self.state.trace.span(task.id, task.tool)
        span.status = "waiting"
        self.state.trace.notify("task", span)
        unknown = [d for d in task.deps if d not in self.state.results and d not in self.pending]
        if unknown:
            self.finish(task, ToolResult("bad_reference", error=f"refers to unknown task(s) {sorted(unknown)}"))
            return
        unfinished = [d for d in task.deps if d not in self.state.results]
        if not unfinished:
            self.dispatch(task)
            return
        self.missing[task.id] = len(unfinished)
        for d in unfinished:
            self.waiting.setdefault(d, []).append(task)

    def dispatch(self, task: Task) -> None:
        self.state.trace.spans[task.id].queued = self.state.trace.now()
        assert self.tg is not None
        self.tg.start_soon(self.execute, task, name=f"task ${task.id} {task.tool}")

    def finish(self, task: Task, result: ToolResult) -> None:
        span = self.state.trace.spans[task.id]
        span.end = self.state.trace.now()
        if span.start is None:
            span.start = span.end
        span.status, span.error, span.attempts = result.kind, result.error, result.attempts
        span.result_bytes = result.size()
        self.state.results[task.id] = result
        self.state.trace.notify("end", span)
        self.pending.discard(task.id)
        for dependent in self.waiting.pop(task.id, []):
            self.missing[dependent.id] -= 1
            if self.missing[dependent.id] == 0:
                del self.missing[dependent.id]
                self.dispatch(dependent)

    async def execute(self, task: Task) -> None:
        self.finish(task, await self._outcome(task))

    async def _outcome(self, task: Task) -> ToolResult:
        ex, state = self.ex, self.state
        failed = [d for d in sorted(task.deps) if not state.results[d].ok]
        if failed:
            why = "; ".join(f"${d}: {state.results[d].error}" for d in failed)
            return ToolResult("skipped", error=f"not run because a dependency failed ({why})")
        try:
            args = resolve(task.args, state.values())
        except ReferenceResolutionError as e:
            return ToolResult("bad_reference", error=str(e))
        state.resolved_args[task.id] = args
        state.trace.spans[task.id].args = args
        tool = ex.tools.get(task.tool)
        if tool is None:
            return ToolResult("error", error=f"unknown tool {task.tool!r}; available: {', '.join(ex.tools.names)}")
        key = _call_key(task.tool, args) if state.calls else None
        if key is not None and key in state.calls:
            earlier = state.calls[key]
            log.debug("task %d reuses the result of finished task %d", task.id, earlier)
            reused = state.results[earlier]
            return ToolResult(reused.kind, value=reused.value, error=reused.error, attempts=0)
        if tool.side_effects and not await self._approved(task, tool, args):
            return refusal(tool)
        tool_limit = ex.tool_limits.get(tool.name, tool.max_concurrency)
        per_tool = ex._limiter(tool.name, tool_limit) if tool_limit else None
        async with _Held(per_tool), _Held(self.global_limit):
            state.trace.spans[task.id].start = state.trace.now()
            state.trace.spans[task.id].status = "running"
            state.trace.notify("start", state.trace.spans[task.id])
            ctx = ToolContext(tool_name=tool.name, task_id=task.id, state=ex.context_state)
            return await tool.invoke(
                args, context=ctx,
                timeout=tool.timeout if tool.timeout is not None else ex.default_timeout,
                retries=ex.retries, backoff=ex.backoff, thread_limiter=self.thread_limit,
            )

    async def _approved(self, task: Task, tool: Tool, args: Any) -> bool:
        return await ask_approval(self.ex.approve, tool, args, task)



class _Held:
    """`async with _Held(limiter)`: take a token without a scheduling round-trip when one is free."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.limiter = limiter

    async def __aenter__(self) -> None:
        if self.limiter is not None:
            try:
                self.limiter.acquire_nowait()
            except anyio.WouldBlock:
                await self.limiter.acquire()

    async def __aexit__(self, *exc: object) -> None:
        if self.limiter is not None:
            self.limiter.release()
