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
from rich.live import Live

from agentrt import planner
from agentrt.agent import Agent
from agentrt.backends import LocalBackend
from agentrt.events import Final
from agentrt.tools import Tool, calculator, tool
from agentrt.views import PlanBoard, plan_view

__all__ = ["QUESTION", "demo_tools", "run_demo"]

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


async def run_demo(engine, console, *, max_tokens: int = 160) -> dict:
    """Run the demo on `engine` as `Agent(mode="plan")` does, drawing its events on `console`; returns the
    answer and the timings."""
    tools = demo_tools()
    limits = planner.GrammarLimits(**DEMO_LIMITS_KW)
    agent = Agent(LocalBackend(engine), tools, mode="plan", max_tokens=max_tokens,
                  plan_options={"max_replans": 0, "limits": limits})
    board = PlanBoard()
    result: list = []

    async def follow() -> None:
        async for ev in agent.stream(QUESTION):
            board.add(ev)
            if isinstance(ev, Final):
                result.append(ev.result)

    with Live(plan_view(board), console=console, refresh_per_second=8) as live:
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            while not result:
                live.update(plan_view(board))
                await anyio.sleep(0.125)
        live.update(plan_view(board, call=0))  # the plan, not the joiner's answer
    total = time.perf_counter() - board.origin
    tools_parallel, _ = board.tool_seconds()

    # the same calls, one after another
    by_name = {t.name: t for t in tools}
    t0 = time.perf_counter()
    for task in board.tasks.values():
        if task.resolved is not None:
            await by_name[task.tool].invoke(task.resolved)
    tools_sequential = time.perf_counter() - t0
    return {"answer": result[0].text, "total_s": total, "tools_parallel_s": tools_parallel,
            "tools_sequential_s": tools_sequential, "tasks": len(board.tasks),
            "ok": sum(bool(t.ok) for t in board.tasks.values())}
