"""The agent-runs extension's event streams: plan, dta, react and hogwild runs through Agent.stream, thread runs."""

from __future__ import annotations

import logging

from agentrt.agent import Agent
from agentrt.events import wire_event
from agentrt.engine.sampling import SamplingParams
from agentrt.server._http import sse_events
from agentrt.server._protocol import AgentRunRequest
from agentrt.threads import run_thread

log = logging.getLogger(__name__)


async def agent_events(backend, registry, body: AgentRunRequest):
    """SSE events of a plan, dta, react or hogwild run, as `Agent.stream` gives them (see
    agentrt.events.wire_event): task, tool_start, tool_end, plan and text deltas, final, then [DONE]."""
    plan = {"max_replans": body.max_replans} if body.mode == "plan" else None
    agent = Agent(backend, registry, mode=body.mode, max_tokens=body.max_tokens, temperature=body.temperature,
                  workers=body.workers, plan_options=plan)

    async def produce(send) -> None:
        tasks = 0
        async for ev in agent.stream(body.input):
            event = wire_event(ev)
            if event is not None:
                tasks += event["type"] == "task"
                if event["type"] == "final" and body.mode != "hogwild":
                    event["tasks"] = tasks
                await send.send(event)

    async for line in sse_events(produce):
        yield line


async def thread_events(backend, registry, question: str, options, params: SamplingParams):
    """SSE events of a thread run: task, tool_start, tool_end, prune, answer, then final (the whole tree
    and what was pruned), then [DONE]."""
    def event_of(ev) -> dict | None:
        path = list(ev.path)
        if ev.kind == "task":
            return {"type": "task", "path": path}
        if ev.kind == "tool_call":
            return {"type": "tool_start", "path": path, "tool": ev.data["tool_name"],
                    "args": ev.data["arguments"]}
        if ev.kind == "tool_end":
            r = ev.data.result
            return {"type": "tool_end", "path": path, "tool": ev.data.tool_name, "ok": r.ok,
                    "observation": r.observation(1000), "seconds": round(ev.data.seconds, 4)}
        if ev.kind == "prune":
            return {"type": "prune", "path": path, **ev.data}
        if ev.kind == "answer":
            return {"type": "answer", "answer": ev.data}
        return None

    async def produce(send) -> None:
        async def on_event(ev) -> None:
            event = event_of(ev)
            if event is not None:
                await send.send(event)

        result = await run_thread(backend, question, registry, options=options, params=params,
                                  on_event=on_event)
        result.raise_for_incomplete()
        await send.send({"type": "final", "answer": result.answer, "tree": result.tree,
                         "stats": result.stats.to_dict(), "notes": result.notes})

    async for line in sse_events(produce):
        yield line
