"""`agentrt demo` runs headless: a real plan-mode run, rendered to a captured rich console."""

from __future__ import annotations

import anyio
from rich.console import Console

from agentrt.demo import demo_tools, run_demo


def test_demo_runs_a_plan_and_reports_timings(tiny_engine):
    console = Console(record=True, width=100)
    r = anyio.run(lambda: run_demo(tiny_engine, console, max_tokens=60))
    assert set(r) >= {"answer", "total_s", "tools_parallel_s", "tools_sequential_s", "tasks"}
    assert "plan being decoded" in console.export_text()
    assert tiny_engine.pool.num_in_use == 0


def test_demo_tools_answer_from_the_bundled_data():
    population, calculator = demo_tools(latency=0)
    assert anyio.run(population.invoke, {"city": "paris"}).value == 2102650
    missing = anyio.run(population.invoke, {"city": "Atlantis"})
    assert not missing.ok and "no population data" in missing.error
