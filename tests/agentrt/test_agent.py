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
    # calls of one turn run concurrently: ToolEnd events come in finishing order, messages in call order
    assert {m["tool_call_id"]: m["content"] for m in tool_msgs} == {e.call_id: e.observation for e in ends}
    assert len(tool_msgs) == len(ends)
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


@pytest.mark.parametrize("kwargs,param", [({"mode": "bogus"}, "mode"), ({"tool_choice": "never"}, "tool_choice"),
                                          ({"workers": 0}, "workers"), ({"thread_options": {"buffer": -1}}, "buffer"),
                                          ({"thread_options": {"depth": 2}}, "thread_options"),
                                          ({"top_logprobs": 21}, "top_logprobs"),
                                          ({"presence_penalty": 3.0}, "presence_penalty"),
                                          ({"mode": "plan", "frequency_penalty": 1.0}, "frequency_penalty"),
                                          ({"mode": "thread", "logprobs": True}, "logprobs")])
def test_bad_options_are_rejected(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        agentrt.Agent("tiny-random", **kwargs)
    assert err.value.param == param


def test_chat_mode_takes_logprobs_and_penalties(tiny_engine):
    def turns(**kwargs):
        agent = agentrt.Agent(LocalBackend(tiny_engine), max_tokens=12, logprobs=True, **kwargs)
        return agent.run_sync("the the the the").stats["logprobs"]

    greedy = turns(top_logprobs=2)
    assert len(greedy) == 1 and 1 <= len(greedy[0]) <= 12  # one model turn, its tokens
    for entry in greedy[0]:
        alts = [a["logprob"] for a in entry["top_logprobs"]]
        assert len(alts) == 2 and alts == sorted(alts, reverse=True)
        assert entry["token"] == entry["top_logprobs"][0]["token"] and entry["logprob"] == pytest.approx(alts[0])
    tokens = [e["token"] for e in greedy[0]]
    assert len(set(tokens)) < len(tokens), "precondition: tiny-random's greedy output repeats a token"
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert [e["token"] for e in turns(**penalty)[0]] != tokens, penalty
    assert "logprobs" not in agentrt.Agent(LocalBackend(tiny_engine), max_tokens=2).run_sync("hi").stats
    assert tiny_engine.pool.num_in_use == 0


def test_a_remote_server_is_refused_a_penalty_its_dialect_has_no_field_for():
    from agentrt.errors import BackendCapabilityError
    from agentrt.remote import RemoteBackend

    backend = RemoteBackend("http://127.0.0.1:9/v1", "m", dialect="openai")  # nothing listens: nothing is sent
    with pytest.raises(BackendCapabilityError, match="repetition_penalty"):
        agentrt.Agent(backend, repetition_penalty=1.2).run_sync("hi")


def test_logprobs_and_penalties_through_a_remote_agentrt_server_are_the_local_engines(tiny_engine):
    from agentrt.server import create_app
    from agentrt.testing import LiveServer

    options = dict(max_tokens=8, logprobs=True, top_logprobs=2, frequency_penalty=1.5)
    with LiveServer(create_app(tiny_engine, model_names=["tiny-random"])) as live:
        with agentrt.Agent(f"openai:{live.base_url}#tiny-random", **options) as agent:
            there = agent.run_sync("Tell me a story.")
    here = agentrt.Agent(LocalBackend(tiny_engine), **options).run_sync("Tell me a story.")
    assert there.text == here.text
    (turn,) = there.stats["logprobs"]
    assert [e["token"] for e in turn] == [e["token"] for e in here.stats["logprobs"][0]] and len(turn) == 8
    assert all(len(e["top_logprobs"]) == 2 for e in turn)


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
def test_output_type_gives_a_validated_value(smol_engine, smol_knows_trivia):
    agent = agentrt.Agent(LocalBackend(smol_engine), output_type=City, max_tokens=60)
    result = agent.run_sync("Which city is the capital of France?")
    assert isinstance(result.output, City) and result.output.name
    assert result.output.name == "Paris" or not smol_knows_trivia


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


class Sum(BaseModel):
    total: Annotated[int, Field(ge=0, le=999)]


def test_thread_mode_returns_the_tree_its_tool_calls_and_a_typed_answer(tiny_engine):
    from agentrt.threads import ThreadSchema

    agent = agentrt.Agent(LocalBackend(tiny_engine), tools=[pick], mode="thread", tool_choice="required",
                          output_type=Sum, max_tokens=800, thread_options={"max_depth": 2, "max_text_chars": 3})

    async def collect():
        return [ev async for ev in agent.stream("pick a digit and double it")]

    events = anyio.run(collect)
    result = events[-1].result
    assert result.mode == "thread" and isinstance(result.output, Sum)
    assert result.tree["answer"] == result.output.model_dump()
    first = result.tree["reasoning"][0]["tooluse"]  # tool_choice="required": the first task calls a tool
    assert first["tool_name"] == "pick" and first["tool_result"] == first["parameters"]["n"] * 2
    starts = [e for e in events if isinstance(e, ToolStart)]
    ends = [e for e in events if isinstance(e, ToolEnd)]
    assert [e.call_id for e in starts] == [e.call_id for e in ends] == [c.call_id for c in result.tool_calls]
    assert result.tool_calls[0].value == first["tool_result"]
    import jsonschema

    jsonschema.validate(result.tree, ThreadSchema([pick], max_depth=2, answer_schema=Sum).json_schema())
    assert tiny_engine.pool.num_in_use == 0


@pytest.mark.slow
def test_thread_mode_on_smollm2_puts_a_real_calculator_result_into_the_tree(smol_engine):
    from agentrt.tools import calculator
    from agentrt.tools._calculator import evaluate

    agent = agentrt.Agent(LocalBackend(smol_engine), tools=[calculator], mode="thread", tool_choice="required",
                          max_tokens=300, thread_options={"max_depth": 2, "max_text_chars": 48, "max_items": 2})
    result = agent.run_sync("Use the calculator: what is 12 * 7?")
    use = result.tree["reasoning"][0]["tooluse"]
    assert use["tool_name"] == "calculator"
    assert use["tool_result"] == evaluate(use["parameters"]["expression"])
    assert result.tool_calls and result.tool_calls[0].ok


DELETED: list[int] = []


@agentrt.tool(side_effects=True)
def delete(n: Annotated[int, Field(ge=0, le=9)]) -> str:
    """Delete record n.

    Args:
        n: The record.
    """
    DELETED.append(n)
    return f"deleted {n}"


def _delete_run(tiny_engine, **kwargs):
    DELETED.clear()
    agent = agentrt.Agent(LocalBackend(tiny_engine), tools=[delete], tool_choice="required", max_steps=2,
                          max_tokens=32, **kwargs)
    return agent.run_sync("delete a record")


def test_an_approved_side_effect_runs_and_the_approver_sees_the_call(tiny_engine):
    asked = []

    def approve(tool, args, call):
        asked.append((tool.name, args, call.name, call.id))
        return True

    result = _delete_run(tiny_engine, approve=approve)
    assert result.tool_calls and all(c.ok for c in result.tool_calls)
    assert sorted(DELETED) == sorted(args["n"] for _, args, _, _ in asked)  # each asked call ran, once
    assert {call_id for *_, call_id in asked} == {c.call_id for c in result.tool_calls}
    assert all(tool_name == call_name == "delete" for tool_name, _, call_name, _ in asked)


@pytest.mark.parametrize("approver", ["refuses", "async refuses", "none"])
def test_a_side_effect_not_approved_does_not_run_and_the_model_hears_why(tiny_engine, approver):
    async def no(tool, args, call):
        return False

    kwargs = {"refuses": {"approve": lambda tool, args, call: False}, "async refuses": {"approve": no},
              "none": {}}[approver]
    result = _delete_run(tiny_engine, **kwargs)
    assert DELETED == []
    assert result.tool_calls and not any(c.ok for c in result.tool_calls)
    refusals = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert refusals == ["Error (refused): delete has side effects and was not approved"] * len(result.tool_calls)


@pytest.mark.parametrize("choice", ["pick", {"type": "function", "function": {"name": "pick"}}])
def test_a_named_tool_choice_makes_the_first_turn_call_that_tool(tiny_engine, choice):
    agent = agentrt.Agent(LocalBackend(tiny_engine), tools=[lookup, pick], tool_choice=choice, max_steps=2,
                          max_tokens=60, grammar_options={"max_string_length": 6})
    assert agent.tool_choice == {"type": "function", "function": {"name": "pick"}}
    result = agent.run_sync("do something")
    assert result.tool_calls and all(c.name == "pick" for c in result.tool_calls)


@pytest.mark.parametrize("choice", ["nosuch", {"type": "function", "function": {"name": "nosuch"}},
                                    {"type": "function"}, {"name": "pick"}, 3])
def test_an_unknown_or_malformed_tool_choice_is_a_clear_error(choice):
    with pytest.raises(InvalidRequestError) as err:
        agentrt.Agent("tiny-random", tools=[pick], tool_choice=choice)
    assert err.value.param == "tool_choice"
    assert "pick" in str(err.value) or "function" in str(err.value)


def test_a_named_tool_is_offered_even_when_tool_top_k_would_drop_it():
    agent = agentrt.Agent("tiny-random", tools=[lookup, pick], tool_choice="pick", tool_top_k=1)
    agent.registry.select = lambda prompt, k: agentrt.tools.ToolRegistry([lookup])  # relevance picks lookup
    assert sorted(t["function"]["name"] for t in agent._offered("look a key up")) == ["lookup", "pick"]


class _Scripted:
    """A backend that answers every chat turn with the same text (no tool call, whatever was asked)."""

    name, kv_features = "scripted", False

    def __init__(self, content: str, finish_reason: str = "stop") -> None:
        self.content, self.finish_reason, self.requests = content, finish_reason, []

    async def chat(self, messages, options, params):
        from agentrt.chat import ChatResult

        self.requests.append((messages, options))
        yield ChatResult(self.content, [], self.finish_reason, 0, 0)

    async def text(self, prompt, grammar, params):
        yield self.content

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("choice", ["required", "pick"])
def test_a_forced_turn_that_comes_back_without_the_call_is_an_error_not_an_answer(choice):
    from agentrt.errors import BackendCapabilityError

    agent = agentrt.Agent(_Scripted("I would rather chat."), tools=[pick], tool_choice=choice)
    with pytest.raises(BackendCapabilityError, match="tool_choice asked for") as err:
        agent.run_sync("pick a digit")
    assert err.value.feature == "tool_choice"
    cut = agentrt.Agent(_Scripted("", finish_reason="length"), tools=[pick], tool_choice=choice)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        cut.run_sync("pick a digit")


def test_an_output_that_does_not_validate_is_retried_once_with_the_error_then_refused():
    from agentrt.errors import BackendCapabilityError

    backend = _Scripted('{"name": "Paris"}')  # no country: City does not validate
    agent = agentrt.Agent(backend, output_type=City)
    with pytest.raises(BackendCapabilityError, match="country") as err:
        agent.run_sync("capital of France?")
    assert err.value.feature == "response_format"
    retry = backend.requests[-1][0]
    assert len(backend.requests) == 3  # the answer, the JSON, the JSON once more
    assert retry[-2] == {"role": "assistant", "content": '{"name": "Paris"}'}
    assert "country" in retry[-1]["content"] and retry[-1]["role"] == "user"
    backend.content = '{"name": "Paris", "country": "France"}'
    assert agent.run_sync("capital of France?").output == City(name="Paris", country="France")


def test_close_after_run_sync_and_the_agent_as_a_context_manager(tiny_engine):
    from agentrt.server import create_app
    from agentrt.testing import LiveServer

    live = LiveServer(create_app(tiny_engine, model_names=["tiny-random"]))
    try:
        with agentrt.Agent(f"openai:{live.base_url}#tiny-random", max_tokens=4) as agent:
            agent.run_sync("hello")
            agent.run_sync("hello again")  # a second loop: the first loop's connections are not reused
        agent.close()  # closing twice is harmless

        async def in_a_loop():
            async with agentrt.Agent(f"openai:{live.base_url}#tiny-random", max_tokens=4) as agent:
                await agent.run("hello")
                return agent.backend

        backend = anyio.run(in_a_loop)
        assert backend._http is None  # closed on exit
    finally:
        live.stop()
