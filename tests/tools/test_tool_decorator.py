from __future__ import annotations

import threading
from typing import Annotated, Literal

import anyio
import pytest
from pydantic import BaseModel, Field

from agentrt.errors import ToolError
from agentrt.tools import Tool, ToolContext, ToolRegistry, tool

pytestmark = pytest.mark.anyio


class Forecast(BaseModel):
    city: str
    temp_c: float


@tool
def weather(city: str, days: Annotated[int, Field(ge=1, le=7)] = 1, unit: Literal["c", "f"] = "c") -> Forecast:
    """Get the weather forecast for a city.

    Longer explanation that belongs to the description.

    Args:
        city: the city name, e.g. "Paris".
        days: how many days ahead,
            counted from today.
        unit: temperature unit.

    Returns:
        The forecast.
    """
    return Forecast(city=city, temp_c=20.5 + days)


@tool(name="lookup", timeout=5, max_concurrency=2, retries=3, side_effects=True, description="Look a key up.")
async def _lookup(ctx: ToolContext, key: str) -> dict[str, str]:
    """Ignored docstring summary.

    Args:
        key: the key.
    """
    return {"key": key, "tool": ctx.tool_name, "task": str(ctx.task_id)}


def test_bare_decorator_reads_docstring_and_schema() -> None:
    assert isinstance(weather, Tool)
    assert weather.name == "weather"
    assert weather.description == "Get the weather forecast for a city. Longer explanation that belongs to the description."
    props = weather.parameters["properties"]
    assert props["city"] == {"type": "string", "description": 'the city name, e.g. "Paris".'}
    assert props["days"]["description"] == "how many days ahead, counted from today."
    assert props["days"]["minimum"] == 1 and props["days"]["maximum"] == 7 and props["days"]["default"] == 1
    assert props["unit"]["enum"] == ["c", "f"]
    assert weather.parameters["required"] == ["city"]
    assert "title" not in weather.parameters and "title" not in props["city"]
    assert weather.spec()["name"] == "weather"
    # the decorated object still calls the function directly
    assert weather("Oslo").city == "Oslo"


def test_options_and_context_parameter() -> None:
    assert _lookup.name == "lookup"
    assert _lookup.description == "Look a key up."
    assert (_lookup.timeout, _lookup.max_concurrency, _lookup.retries, _lookup.side_effects) == (5, 2, 3, True)
    assert _lookup.takes_context
    assert list(_lookup.parameters["properties"]) == ["key"]  # the context is not an argument


async def test_invoke_sync_returns_jsonable_pydantic_result() -> None:
    result = await weather.invoke({"city": "Oslo", "days": 2})
    assert result.ok and result.value == {"city": "Oslo", "temp_c": 22.5}
    assert result.attempts == 1


async def test_invoke_async_with_context() -> None:
    result = await _lookup.invoke({"key": "k"}, context=ToolContext(task_id=7))
    assert result.value == {"key": "k", "tool": "lookup", "task": "7"}


async def test_validation_errors_are_observations_not_exceptions() -> None:
    calls = []

    @tool
    def f(n: Annotated[int, Field(ge=0)]) -> int:
        calls.append(n)
        return n

    for bad in ({"n": -1}, {}, {"n": "x"}, {"n": 1, "extra": 2}):
        result = await f.invoke(bad)
        assert result.kind == "invalid_args" and "invalid arguments for f" in result.error
    assert "greater than or equal to 0" in (await f.invoke({"n": -1})).error
    assert calls == []
    assert "Error (invalid_args)" in (await f.invoke({})).observation()


async def test_exception_becomes_error_result() -> None:
    @tool
    async def boom() -> None:
        raise RuntimeError("disk on fire")

    result = await boom.invoke({})
    assert result.kind == "error" and result.error == "RuntimeError: disk on fire"


async def test_garbage_result_becomes_bad_result() -> None:
    @tool
    def garbage() -> object:
        return object()

    @tool
    def nan() -> float:
        return float("nan")

    assert (await garbage.invoke({})).kind == "bad_result"
    assert (await nan.invoke({})).kind == "bad_result"


async def test_timeout_async_and_sync() -> None:
    @tool(timeout=0.05)
    async def hang() -> None:
        await anyio.sleep_forever()

    stopped = threading.Event()

    @tool(timeout=0.05)
    def spin(ctx: ToolContext) -> None:
        ctx.cancelled.wait(10)  # a cooperative sync tool watches its context
        stopped.set()

    assert (await hang.invoke({})).kind == "timeout"
    result = await spin.invoke({})
    assert result.kind == "timeout" and "0.05" in result.error
    assert await anyio.to_thread.run_sync(stopped.wait, 5)  # the worker thread was told to stop, and did


async def test_retries_with_backoff_then_success() -> None:
    attempts = []

    @tool(retries=2)
    def flaky(ctx: ToolContext) -> str:
        attempts.append(ctx.attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    result = await flaky.invoke({}, backoff=0.001)
    assert result.ok and result.value == "ok" and result.attempts == 3 and attempts == [1, 2, 3]


async def test_retries_are_bounded() -> None:
    count = 0

    @tool(retries=1)
    async def always() -> None:
        nonlocal count
        count += 1
        raise ValueError("no")

    result = await always.invoke({}, backoff=0.001)
    assert result.kind == "error" and result.attempts == 2 and count == 2


def test_bad_definitions_raise_tool_error() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolError, match="type annotation"):
        tool(untyped)
    with pytest.raises(ToolError, match="identifier"):
        tool(name="bad name")(lambda: 1)

    def star(*args: int) -> int:
        return 0

    with pytest.raises(ToolError, match="plain or keyword"):
        tool(star)


def test_registry() -> None:
    reg = ToolRegistry([weather, _lookup])
    assert reg.names == ["weather", "lookup"] and "weather" in reg and len(reg) == 2
    with pytest.raises(ToolError, match="already registered"):
        reg.add(weather)

    def plain(x: int) -> int:
        """Plain function."""
        return x

    assert reg.add(plain).name == "plain"
    with pytest.raises(KeyError, match="registered: weather, lookup, plain"):
        reg["nope"]
    assert [s["name"] for s in reg.specs()] == ["weather", "lookup", "plain"]


async def test_a_tool_raising_timeout_error_itself_is_an_error_not_our_timeout() -> None:
    @tool(timeout=5)
    async def upstream() -> None:
        raise TimeoutError("upstream API timed out")

    result = await upstream.invoke({})
    assert result.kind == "error" and "upstream API timed out" in result.error
