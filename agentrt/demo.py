"""`agentrt demo`: a plan-mode agent (LLMCompiler) on the embedded model, with its DAG shown live.

The model writes a plan of tool calls under the plan grammar; each task starts the moment its line
is parsed, independent lookups run at the same time, a calculator combines them, and the joiner
answers (by reference to the calculator's result). The same calls are then run one after another to show
what the DAG saved.
"""

from __future__ import annotations

import json
import time
from importlib import resources

import anyio

from agentrt.tools import Tool, calculator, tool

__all__ = ["QUESTION", "demo_tools", "plan_view", "run_demo"]

QUESTION = "How many people live in Paris, Rome and Berlin together?"
# No fixed worked examples: the planner derives them from the tools (a sum and a difference over
# letter placeholders), the population tool's docstring grounds its city in the question, and the
# plan grammar makes the plan look up every city the question names before it combines them
# (planner.plan_grammar's `cover`) — the same path `Agent(mode="plan")` takes for any question.
LOOKUP_SECONDS = 3.0
# bounded thoughts and answers: a 135M model must still reach Finish(...) within max_tokens
DEMO_LIMITS_KW = dict(max_tasks=6, max_thought_chars=60, max_answer_chars=120)  # each lookup stands for a call to a slow service


def _knowledge() -> dict:
    return json.loads(resources.files("agentrt").joinpath("data/cities.json").read_text())


def demo_tools(latency: float = LOOKUP_SECONDS) -> list[Tool]:
    facts = {k.lower(): v for k, v in _knowledge()["population"].items()}

    @tool
    async def population(city: str) -> int:
        """Number of people living in a city (a lookup in the bundled city data).

        Args:
            city: A city named in the question.
        """
        await anyio.sleep(latency)
        key = city.strip().lower()
        if key not in facts:
            raise KeyError(f"no population data for {city!r}; known: {', '.join(sorted(facts))}")
        return facts[key]

    return [population, calculator]


def plan_view(plan_text: str, state, started: float):
    """A plan being decoded and its tasks (status, start, duration): shared with `agentrt chat`."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.spinner import Spinner
    from rich.table import Table

    table = Table(title="tasks (run as soon as their line is parsed)", expand=True)
    for col in ("#", "call", "deps", "status", "start s", "time s"):
        table.add_column(col)
    for tid, task in sorted(state.tasks.items()):
        span = state.trace.spans.get(tid)
        result = state.results.get(tid)
        if result is not None:
            status = "[green]ok[/] " + result.observation(40) if result.ok else f"[red]{result.kind}[/]"
        elif span is not None and span.start is not None:
            status = Spinner("dots", text="running")
        else:
            status = "waiting"
        args = json.dumps(task.to_json()["args"], ensure_ascii=False)
        start = f"{span.start:.2f}" if span is not None and span.start is not None else ""
        took = f"{span.duration:.2f}" if span is not None and span.end is not None else ""
        table.add_row(str(tid), f"{task.tool}({args})", ",".join(map(str, sorted(task.deps))) or "-", status,
                      start, took)
    plan = Panel(plan_text or "…", title=f"plan being decoded ({time.perf_counter() - started:.1f}s)")
    return Group(plan, table)


async def run_demo(engine, console, *, max_tokens: int = 160) -> dict:
    """Run the demo on `engine`, rendering to `console`; returns the timings."""
    from rich.live import Live

    from agentrt import planner
    from agentrt.backends import LocalBackend
    from agentrt.sampling import SamplingParams

    backend = LocalBackend(engine)
    tools = demo_tools()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    plan_text: list[str] = []

    async def llm(prompt: str, grammar: str | None):
        plan_text.clear()
        async for chunk in backend.text(prompt, grammar, params):
            plan_text.append(chunk)
            yield chunk

    DEMO_LIMITS = planner.GrammarLimits(**DEMO_LIMITS_KW)
    state = planner.ExecutionState()
    started = time.perf_counter()
    result: list = []

    async def go() -> None:
        result.append(await planner.run_plan(QUESTION, llm, tools, state=state, max_replans=0,
                                             limits=DEMO_LIMITS))

    with Live(plan_view("", state, started), console=console, refresh_per_second=8) as live:
        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            while not result:
                live.update(plan_view("".join(plan_text), state, started))
                await anyio.sleep(0.125)
        live.update(plan_view(result[0].outputs[0] if result[0].outputs else "", state, started))
    total = time.perf_counter() - started
    run = result[0]
    tools_parallel = state.trace.makespan()

    # the same calls, one after another
    by_name = {t.name: t for t in tools}
    t0 = time.perf_counter()
    for tid in sorted(state.tasks):
        if tid in state.resolved_args:
            await by_name[state.tasks[tid].tool].invoke(state.resolved_args[tid])
    tools_sequential = time.perf_counter() - t0
    return {"answer": run.answer, "total_s": total, "tools_parallel_s": tools_parallel,
            "tools_sequential_s": tools_sequential, "tasks": len(state.tasks),
            "ok": sum(r.ok for r in state.results.values())}
