"""The SDK: Agent in chat mode on the local engine and through a remote OpenAI-compatible server."""

from __future__ import annotations

import re
from typing import Annotated

import anyio
import pytest
from pydantic import BaseModel, Field

import agentrt
from agentrt.agent import Final, TextDelta, ToolEnd, ToolStart
from agentrt.backends import LocalBackend
from agentrt.errors import InvalidRequestError, RunTimeoutError

CALLS: list[dict] = []


@agentrt.tool
def lookup(key: str) -> dict:
    """Look a key up in the store.

    Args:
        key: What to look up.
    """
    CALLS.append({"key": key})
    return {"key": key, "value": len(key)}


def test_required_first_turn_calls_a_real_tool_and_feeds_back_the_result(tiny_engine):
    CALLS.clear()
    # the string cap lets a random model finish its call
    agent = agentrt.Agent(LocalBackend(tiny_engine), tools=[lookup], tool_choice="required", max_steps=2,
                          max_tokens=60, grammar_options={"max_string_length": 6})

    async def collect():
        return [ev async for ev in agent.stream("look something up")]

    events = anyio.run(collect)
    starts = [e for e in events if isinstance(e, ToolStart)]
    ends = [e for e in events if isinstance(e, ToolEnd)]
    assert starts and len(starts) == len(ends) and all(e.name == "lookup" for e in ends)
    assert isinstance(events[-1], Final)
    result = events[-1].result
    # every call either ran (and the tool saw its arguments) or became an observation for the model
    assert len(CALLS) == sum(e.ok for e in ends)
    tool_msgs = [m for m in result.messages if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs] == [e.observation for e in ends]
    assert result.steps == 2
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).endswith(result.text)
    assert tiny_engine.pool.num_in_use == 0


def test_timeout_is_a_clear_error(tiny_engine):
    agent = agentrt.Agent(LocalBackend(tiny_engine), timeout=0.05, max_tokens=2000)
    with pytest.raises(RunTimeoutError, match="timeout"):
        agent.run_sync("write forever")
    for _ in range(200):
        if tiny_engine.num_active == 0:
            break
        anyio.run(anyio.sleep, 0.01)
    assert tiny_engine.pool.num_in_use == 0


@pytest.mark.parametrize("kwargs,param", [({"mode": "bogus"}, "mode"), ({"mode": "thread"}, "mode"),
                                          ({"tool_choice": "never"}, "tool_choice"), ({"workers": 0}, "workers")])
def test_bad_options_are_rejected(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        agentrt.Agent("tiny-random", **kwargs)
    assert err.value.param == param


@agentrt.tool
def pick(n: Annotated[int, Field(ge=0, le=9)]) -> int:
    """Pick a digit.

    Args:
        n: The digit.
    """
    return n * 2


class City(BaseModel):
    name: str
    country: str


@pytest.mark.slow
def test_output_type_gives_a_validated_value(smol_engine):
    agent = agentrt.Agent(LocalBackend(smol_engine), output_type=City, max_tokens=60)
    result = agent.run_sync("Which city is the capital of France?")
    assert isinstance(result.output, City) and result.output.name == "Paris"


def test_remote_backend_talks_to_an_openai_compatible_server(tiny_engine):
    from agentrt.testing import LiveServer

    from agentrt.server import create_app

    live = LiveServer(create_app(tiny_engine, model_names=["tiny-random"]))
    try:
        # a bounded integer argument: even a random model finishes the call
        agent = agentrt.Agent(f"openai:{live.base_url}#tiny-random", tools=[pick], tool_choice="required",
                              max_steps=2, max_tokens=60)
        result = agent.run_sync("pick a digit")
        assert result.tool_calls and all(c.name == "pick" and c.ok for c in result.tool_calls)
        assert all(c.value % 2 == 0 and c.value <= 18 for c in result.tool_calls)

        async def plan_text():
            backend = agent.backend
            grammar = 'root ::= "1. pick(" [a-z] [a-z]? [a-z]? ")"'
            return "".join([t async for t in backend.text("make a plan", grammar, agent.params)])

        text = anyio.run(plan_text)
        assert re.fullmatch(r"1\. pick\([a-z]{1,3}\)", text), text
        anyio.run(agent.aclose)
    finally:
        live.stop()


def test_hogwild_mode_runs_workers_over_the_shared_cache(tiny_engine):
    agent = agentrt.Agent(LocalBackend(tiny_engine), mode="hogwild", workers=3, max_tokens=24, temperature=1.0)
    result = agent.run_sync("count to ten")
    assert result.mode == "hogwild" and len(result.messages) == 3  # one transcript per worker
    assert result.steps >= 1 and isinstance(result.output, str)
    assert tiny_engine.pool.num_in_use == 0
