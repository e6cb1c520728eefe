from __future__ import annotations

import math

import httpx
import pytest

from agentrt.tools import ToolIndex, ToolRegistry, calculator, make_http_get, tool, workspace_tools
from agentrt.tools._calculator import evaluate

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "expr, value",
    [("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 10", 1024), ("2^3", 8), ("7 // 2", 3), ("-3 % 5", 2),
     ("sqrt(16) + abs(-2)", 6.0), ("max(1, 5, 3)", 5), ("pi", math.pi), ("1e3 / 4", 250.0)],
)
def test_calculator_arithmetic(expr: str, value: float) -> None:
    assert evaluate(expr) == pytest.approx(value)


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('true')", "open('x')", "x + 1", "(1).__class__", "[1, 2]", "lambda: 1",
     "9 ** 9 ** 9", "'a' * 3", "sqrt(x=4)"],
)
def test_calculator_refuses_anything_but_arithmetic(expr: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expr)


async def test_calculator_tool_errors_are_observations() -> None:
    assert (await calculator.invoke({"expression": "6 * 7"})).value == 42
    assert (await calculator.invoke({"expression": "1 / 0"})).kind == "error"
    assert (await calculator.invoke({"expression": "import os"})).kind == "error"


def _transport(body: bytes = b"hello world") -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body, headers={"content-type": "text/plain"}))


async def test_http_get_fetches_and_caps_size() -> None:
    get = make_http_get(allow_private=True, max_bytes=5, transport=_transport())
    result = await get.invoke({"url": "http://example.test/a"})
    assert result.ok
    assert result.value["status"] == 200 and result.value["text"] == "hello" and result.value["truncated"] is True


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/", "http://localhost:8000/x", "http://10.1.2.3/", "http://[::1]/", "http://169.254.169.254/",
            # the same addresses inside IPv6 forms: compatible, mapped, NAT64, 6to4, and multicast
            "http://[::169.254.169.254]/", "http://[::ffff:10.0.0.1]/", "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:a9fe:a9fe::]/", "http://[ff0e::1]/", "http://224.0.0.251/"]
)
async def test_http_get_refuses_private_and_loopback(url: str) -> None:
    get = make_http_get(transport=_transport())
    result = await get.invoke({"url": url})
    assert result.kind == "error" and "non-public address" in result.error


async def test_http_get_refuses_other_schemes() -> None:
    result = await make_http_get(transport=_transport()).invoke({"url": "file:///etc/passwd"})
    assert result.kind == "error" and "only http" in result.error


async def test_workspace_tools_are_confined(tmp_path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    read_file, list_dir, write_file = workspace_tools(root)
    assert write_file.side_effects and not read_file.side_effects
    assert (await write_file.invoke({"path": "sub/a.txt", "content": "hi"})).value == {"path": "sub/a.txt", "bytes": 2}
    assert (await read_file.invoke({"path": "sub/a.txt"})).value == "hi"
    listing = (await list_dir.invoke({})).value
    assert {e["name"] for e in listing} == {"sub", "link"}
    for path in ("../secret.txt", "/etc/passwd", "link", "sub/../../secret.txt"):
        result = await read_file.invoke({"path": path})
        assert result.kind == "error" and "outside the workspace" in result.error
    assert (await write_file.invoke({"path": "../x", "content": "no"})).kind == "error"
    assert not (tmp_path / "x").exists()
    assert [t.name for t in workspace_tools(root, allow_write=False)] == ["read_file", "list_dir"]


def _make_registry() -> ToolRegistry:
    def make(name: str, doc: str):
        def fn(query: str) -> str:
            return query

        fn.__name__ = name
        fn.__doc__ = doc
        return tool(fn)

    reg = ToolRegistry([calculator, make_http_get(), *workspace_tools(".")])
    reg.add(make("get_weather", "Weather forecast (temperature, rain) for a city.\n\nArgs:\n    query: city name"))
    reg.add(make("send_email", "Send an email message to a recipient."))
    reg.add(make("stock_price", "Latest stock price of a company ticker symbol."))
    reg.add(make("translate_text", "Translate text into another language."))
    return reg


def test_tool_rag_finds_the_relevant_tools() -> None:
    reg = _make_registry()
    assert reg.select("what will the temperature be in Paris tomorrow?", k=1).names == ["get_weather"]
    assert reg.select("compute 17 * 23 arithmetic", k=1).names == ["calculator"]
    assert "read_file" in reg.select("read the file notes.txt", k=2).names
    assert reg.select("stock prices of AAPL", k=3).names[0] == "stock_price"


def test_tool_rag_floor_and_k() -> None:
    reg = _make_registry()
    assert len(reg.select("zzz qqq", k=5)) == 0  # nothing shares a word: the floor drops everything
    assert len(reg.select("text file email weather price", k=3)) == 3
    index = ToolIndex(list(reg))
    scored = index.search("email", k=10, min_score=0.0)
    assert scored[0].tool.name == "send_email" and scored[0].score > scored[1].score
