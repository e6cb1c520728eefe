"""MCP tools: a real MCP server (mcp.server.mcpserver.MCPServer) started over stdio, its tools in a
registry, an Agent and the server's agent runs beside Python tools."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

pytest.importorskip("mcp", reason="the mcp package is a dependency: pip install 'mcp>=2'")

from agentrt.tools import MCPServerStdio, ToolRegistry, tool  # noqa: E402

SERVER = str(Path(__file__).with_name("mcp_server.py"))


def mcp_server(*extra: str, **kwargs) -> MCPServerStdio:
    return MCPServerStdio(sys.executable, [SERVER, *extra], **kwargs)


@pytest.fixture(scope="module")
def server():
    s = mcp_server(timeout=30)
    yield s
    s.close()


def test_tools_are_listed_on_first_use_with_their_schemas(server):
    registry = ToolRegistry([server])
    assert not server.running  # nothing starts until the registry is read
    assert set(registry.names) == {"add", "get_weather", "fail", "sleep"}
    assert server.running
    add = registry["add"]
    assert add.parameters["properties"]["a"]["type"] == "integer" and add.parameters["required"] == ["a", "b"]
    assert add.description == "Add two integers."
    assert registry["get_weather"].remote_name == "get-weather"  # not an identifier: renamed, called as is


def test_calls_results_and_errors_are_observations(server):
    registry = ToolRegistry([server])

    async def calls():
        return (await registry["add"].invoke({"a": 2, "b": 40}),
                await registry["get_weather"].invoke({"city": "Oslo"}),
                await registry["fail"].invoke({"reason": "no"}),
                await registry["add"].invoke({"a": "x", "b": 1}))

    ok, text, failed, invalid = anyio.run(calls)
    assert ok.ok and ok.value == 42
    assert text.ok and text.observation() == "sunny in Oslo"
    assert failed.kind == "error" and "refused: no" in failed.observation()  # is_error with the server's text
    assert invalid.kind == "error" and "a" in invalid.error  # the server validates its own arguments


def test_the_executor_timeout_cancels_a_slow_call(server):
    registry = ToolRegistry([server])

    async def slow():
        started = time.monotonic()
        result = await registry["sleep"].invoke({"seconds": 30}, timeout=0.5)
        return result, time.monotonic() - started, await registry["add"].invoke({"a": 1, "b": 1})

    result, seconds, after = anyio.run(slow)
    assert result.kind == "timeout" and seconds < 10
    assert after.ok and after.value == 2  # the session goes on


def test_python_tools_beside_mcp_tools_and_close_stops_the_process():
    @tool
    def shout(text: str) -> str:
        """Upper-case a text."""
        return text.upper()

    s = mcp_server("--only", "add")
    registry = ToolRegistry([shout, s])
    assert registry.names == ["shout", "add"]
    registry.close()
    assert not s.running
    assert "add" in registry.names and s.running  # a later use starts it again
    registry.close()


def test_a_bad_command_is_a_clear_error():
    from agentrt.errors import ToolError

    with pytest.raises(ToolError, match="did not start"):
        MCPServerStdio("/nonexistent/mcp-server").tools()
    with pytest.raises(ToolError, match="needs a command"):
        MCPServerStdio.from_command_line("   ")


def test_an_agent_calls_an_mcp_tool_and_close_stops_the_server(tiny_engine):
    """The named tool_choice forces a schema-valid call: it runs on the MCP server, and its result is
    the observation the agent records."""
    import agentrt

    s = agentrt.MCPServerStdio(sys.executable, [SERVER, "--only", "add"])
    agent = agentrt.Agent(tiny_engine, tools=[s], tool_choice="add", max_steps=2, max_tokens=96,
                          grammar_options={"max_number_digits": 4})
    result = agent.run_sync("Add 2 and 3.")
    calls = [c for c in result.tool_calls if c.name == "add"]
    assert calls and calls[0].ok
    args = json.loads(next(m for m in result.messages if m.get("tool_calls"))["tool_calls"][0]["function"]["arguments"])
    assert calls[0].value == args["a"] + args["b"]
    agent.close()
    assert not s.running


@pytest.mark.slow
def test_the_default_model_calls_an_mcp_tool(smol_engine):
    import agentrt

    with agentrt.Agent(smol_engine, tools=[mcp_server("--only", "add")], tool_choice="required",
                       max_steps=2) as agent:
        result = agent.run_sync("What is 17 plus 25? Use the add tool.")
    assert result.tool_calls and result.tool_calls[0].name == "add" and result.tool_calls[0].ok


@pytest.mark.slow
def test_agent_runs_on_the_server_use_mcp_tools(smol_engine):
    from agentrt.server import create_app

    app = create_app(smol_engine, model_names=["smollm2-135m"], tools=[mcp_server("--only", "add")])

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=300) as c:
            async with c.stream("POST", "/v1/agent/runs", json={"input": "Use the add tool: what is 12 + 7?",
                                                                 "max_replans": 0, "max_tokens": 120}) as r:
                return r.status_code, [json.loads(line[6:]) for line in
                                       [x async for x in r.aiter_lines() if x.startswith("data: {")]]

    status, events = anyio.run(go)
    assert status == 200
    ends = [e for e in events if e["type"] == "tool_end"]
    assert ends and all(e["tool"] == "add" for e in ends)
    args = {e["id"]: e["args"] for e in events if e["type"] == "task"}
    ran = [e for e in ends if e["ok"]]
    assert ran  # the MCP server answered (what the 135M model adds up is its own business)
    for e in ran:
        a, b = args[e["id"]]["a"], args[e["id"]]["b"]
        if isinstance(a, int) and isinstance(b, int):
            assert e["observation"] == str(a + b)


def test_agentrt_serve_mcp_starts_the_server_and_stops_it_on_exit(tmp_path):
    """`agentrt serve --mcp "CMD ARGS"`: the MCP server runs as the serve process's child while it
    serves, and is gone when serve exits."""
    psutil = pytest.importorskip("psutil")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "agentrt.cli", "serve", "--model", "tiny-random", "--port", str(port),
           "--mcp", f"{sys.executable} {SERVER} --only add"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        mcp_children = [c for c in children if SERVER in " ".join(c.cmdline())]
        assert mcp_children
        r = httpx.post(f"http://127.0.0.1:{port}/v1/agent/runs", timeout=120,
                       json={"input": "add 1 and 2", "mode": "react", "max_tokens": 32})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    _, alive = psutil.wait_procs(mcp_children, timeout=10)
    assert not alive
