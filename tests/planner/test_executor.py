from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from agentrt.errors import PlanError
from agentrt.planner import ExecutionState, Executor, Ref, Task, parse_plan
from agentrt.tools import ToolContext, ToolRegistry, tool

pytestmark = pytest.mark.anyio

GUARD = 10  # seconds: only a hang would ever reach this; no assertion depends on timing


def T(tid: int, tool_name: str, **args) -> Task:
    return Task(id=tid, tool=tool_name, args=args)


class Recorder:
    """Tools that log what happens to them, for ordering and overlap assertions."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.running = 0
        self.peak = 0
        self.events: dict[str, anyio.Event] = {}

    def event(self, name: str) -> anyio.Event:
        return self.events.setdefault(name, anyio.Event())

    def registry(self) -> ToolRegistry:
        rec = self

        @tool
        async def step(ctx: ToolContext, wait_for: str = "", signal: str = "", value: object = None) -> dict:
            """Log start/end; optionally wait for an event and set one."""
            rec.log.append(("start", ctx.task_id))
            rec.running += 1
            rec.peak = max(rec.peak, rec.running)
            try:
                if signal:
                    rec.event(signal).set()
                if wait_for:
                    await rec.event(wait_for).wait()
                await anyio.sleep(0)
                return {"id": ctx.task_id, "value": value, "items": [f"item{ctx.task_id}", "other"]}
            finally:
                rec.running -= 1
                rec.log.append(("end", ctx.task_id))

        @tool(max_concurrency=2)
        async def narrow(ctx: ToolContext) -> int:
            """At most two at once."""
            rec.running += 1
            rec.peak = max(rec.peak, rec.running)
            for _ in range(5):
                await anyio.sleep(0)
            rec.running -= 1
            return ctx.task_id

        @tool
        def blocking(wait_for: str) -> str:
            """A sync tool waiting on a threading.Event that an async task sets."""
            assert rec.thread_events[wait_for].wait(GUARD)
            return "unblocked"

        @tool
        async def release(name: str) -> str:
            """Set a threading event."""
            rec.thread_events[name].set()
            return "set"

        @tool
        async def fail() -> None:
            """Always raises."""
            raise RuntimeError("tool exploded")

        @tool(timeout=0.05)
        async def hang() -> None:
            """Never returns."""
            await anyio.sleep_forever()

        @tool
        def garbage() -> object:
            """Returns something that is not JSON."""
            return threading.Lock()

        self.thread_events: dict[str, threading.Event] = {"t": threading.Event()}
        return ToolRegistry([step, narrow, blocking, release, fail, hang, garbage])


async def test_independent_tasks_overlap_and_dependents_wait() -> None:
    rec = Recorder()
    ex = Executor(rec.registry())
    # 1 and 2 each wait for the other's signal: they can only finish if they run at the same time
    tasks = [T(1, "step", signal="a", wait_for="b"), T(2, "step", signal="b", wait_for="a"),
             Task(3, "step", {"value": [Ref(1, ("items", 0)), Ref(2, ("id",))]})]
    with anyio.fail_after(GUARD):
        state = await ex.run(tasks)
    assert {i: r.kind for i, r in state.results.items()} == {1: "ok", 2: "ok", 3: "ok"}
    assert state.results[3].value["value"] == ["item1", 2]  # structured values, not strings
    start3 = rec.log.index(("start", 3))
    assert rec.log.index(("end", 1)) < start3 and rec.log.index(("end", 2)) < start3


async def test_tasks_start_while_the_plan_is_still_streaming() -> None:
    rec = Recorder()
    ex = Executor(rec.registry())

    async def plan() -> AsyncIterator[Task]:
        yield T(1, "step", signal="first-started")
        await rec.event("first-started").wait()  # deadlocks unless task 1 already runs
        yield T(2, "step", value=Ref(1, ("id",)))

    with anyio.fail_after(GUARD):
        state = await ex.run(plan())
    assert state.results[2].value["value"] == 1


async def test_per_tool_and_global_concurrency_limits() -> None:
    rec = Recorder()
    reg = rec.registry()
    with anyio.fail_after(GUARD):
        await Executor(reg).run([T(i, "narrow") for i in range(1, 9)])
    assert rec.peak == 2
    rec.peak = 0
    with anyio.fail_after(GUARD):
        await Executor(reg, max_concurrency=3).run([T(i, "step") for i in range(1, 9)])
    assert rec.peak == 3
    rec.peak = 0
    with anyio.fail_after(GUARD):
        await Executor(reg, tool_limits={"step": 1}).run([T(i, "step") for i in range(1, 5)])
    assert rec.peak == 1


async def test_sync_tools_run_in_threads_without_blocking_the_loop() -> None:
    rec = Recorder()
    with anyio.fail_after(GUARD):
        state = await Executor(rec.registry()).run([T(1, "blocking", wait_for="t"), T(2, "release", name="t")])
    assert state.results[1].value == "unblocked"


async def test_failures_become_observations_and_never_stall() -> None:
    rec = Recorder()
    ex = Executor(rec.registry())
    plan = [
        T(1, "fail"), T(2, "hang"), T(3, "garbage"), T(4, "step"),
        Task(5, "step", {"value": Ref(1)}),          # depends on a failure
        Task(6, "step", {"value": Ref(2)}),          # depends on a timeout
        Task(7, "step", {"value": Ref(4, ("nope",))}),  # bad path into a good result
        T(8, "no_such_tool"), T(9, "step", bogus=1), Task(10, "step", {"value": Ref(99)}),
    ]
    with anyio.fail_after(GUARD):
        state = await ex.run(plan)
    kinds = {i: r.kind for i, r in state.results.items()}
    assert kinds == {1: "error", 2: "timeout", 3: "bad_result", 4: "ok", 5: "skipped", 6: "skipped",
                     7: "bad_reference", 8: "error", 9: "invalid_args", 10: "bad_reference"}
    assert "tool exploded" in state.results[1].error and "$1" in state.results[5].error
    assert "no key 'nope'" in state.results[7].error and "unknown tool" in state.results[8].error
    assert all(r.observation() for r in state.results.values())


async def test_retries_with_backoff_in_the_executor() -> None:
    calls = []

    @tool
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("again")
        return "fine"

    with anyio.fail_after(GUARD):
        state = await Executor(ToolRegistry([flaky]), retries=2, backoff=0.001).run([T(1, "flaky")])
    assert state.results[1].value == "fine" and state.results[1].attempts == 3
    assert state.trace.spans[1].attempts == 3


async def test_cancelling_the_run_cancels_every_tool_in_flight() -> None:
    started = {i: anyio.Event() for i in (1, 2, 3)}
    cleaned: list[int] = []
    thread_exited = threading.Event()

    @tool
    async def forever(ctx: ToolContext) -> None:
        started[ctx.task_id].set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append(ctx.task_id)

    @tool
    def sync_loop(ctx: ToolContext) -> None:
        anyio.from_thread.run_sync(started[ctx.task_id].set)  # anyio.Event is set from the loop
        ctx.cancelled.wait(GUARD)
        thread_exited.set()

    ex = Executor(ToolRegistry([forever, sync_loop]))
    before = set(asyncio.all_tasks())
    state = ExecutionState()
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ex.run, [T(1, "forever"), T(2, "forever"), T(3, "sync_loop"),
                                   Task(4, "forever", {}, deps=frozenset({1}))], state)
            for ev in started.values():
                await ev.wait()
            tg.cancel_scope.cancel()
    assert sorted(cleaned) == [1, 2]  # both async tools saw the cancellation and cleaned up
    assert 4 not in state.results  # its dependency never finished, so it never started
    assert await anyio.to_thread.run_sync(thread_exited.wait, GUARD)  # the sync tool was told to stop
    await anyio.sleep(0)
    assert set(asyncio.all_tasks()) == before  # nothing of the run is left running


async def test_side_effects_need_approval() -> None:
    done = []

    @tool(side_effects=True)
    async def delete(path: str) -> str:
        done.append(path)
        return "deleted"

    reg = ToolRegistry([delete])
    state = await Executor(reg).run([T(1, "delete", path="a")])
    assert state.results[1].kind == "refused" and done == []
    asked = []

    async def approve(t, args: dict, task: Task) -> bool:
        asked.append((task.id, t.name))
        return args["path"] == "ok"

    state = await Executor(reg, approve=approve).run([T(1, "delete", path="ok"), T(2, "delete", path="no")])
    assert state.results[1].ok and state.results[2].kind == "refused" and done == ["ok"]
    assert sorted(asked) == [(1, "delete"), (2, "delete")]


async def test_second_round_reuses_state_and_never_reruns_finished_calls() -> None:
    calls = []

    @tool
    async def lookup(q: str) -> dict:
        calls.append(q)
        return {"q": q, "n": len(q)}

    ex = Executor(ToolRegistry([lookup]))
    state = await ex.run(parse_plan('1. lookup({"q": "ab"})\n2. lookup({"q": "c"})').tasks)
    assert state.next_id == 3
    again = parse_plan('3. lookup({"q": "ab"})\n4. lookup({"q": "$1.q"})\n5. lookup({"q": "new"})',
                       first_id=3, known_ids={1, 2}).tasks
    await ex.run(again, state)
    assert calls == ["ab", "c", "new"]  # 3 and 4 repeat task 1's call: its result is reused
    assert state.results[3].value == state.results[4].value == {"q": "ab", "n": 2}
    with pytest.raises(PlanError, match="already used"):
        await ex.run([T(2, "lookup", q="x")], state)


async def test_trace_exports_chrome_trace_events(tmp_path) -> None:
    rec = Recorder()
    state = await Executor(rec.registry()).run(
        [T(1, "step"), T(2, "step"), Task(3, "step", {"value": Ref(1)}), T(4, "fail")]
    )
    path = tmp_path / "trace.json"
    state.trace.write_chrome(path)
    doc = json.loads(path.read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["args"]["task"] for e in spans) == [1, 2, 3, 4]
    by_task = {e["args"]["task"]: e for e in spans}
    assert by_task[4]["args"]["error"] == "RuntimeError: tool exploded" and by_task[4]["cat"] == "error"
    assert by_task[3]["args"]["args"] == {"value": {"id": 1, "value": None, "items": ["item1", "other"]}}
    assert by_task[1]["args"]["result_bytes"] > 0
    assert by_task[3]["ts"] >= by_task[1]["ts"] + by_task[1]["dur"]  # a dependent starts after its input
    lanes: dict[int, list[tuple[float, float]]] = {}
    for e in spans:
        lanes.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for intervals in lanes.values():  # spans in one lane never overlap
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:]))


async def test_a_failing_task_source_cancels_the_run_and_propagates() -> None:
    cleaned = []
    started = anyio.Event()

    @tool
    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append(True)

    async def plan() -> AsyncIterator[Task]:
        yield T(1, "forever")
        await started.wait()
        raise ValueError("the model stream broke")

    with anyio.fail_after(GUARD), pytest.raises(ValueError, match="stream broke"):
        await Executor(ToolRegistry([forever])).run(plan())
    assert cleaned == [True]
