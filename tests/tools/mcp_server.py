"""A real MCP server over stdio for the tests (run as a script): arithmetic, a tool whose name is not an
identifier, a failing tool and a slow one. `--only add,fail` serves just those."""

from __future__ import annotations

import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def fail(reason: str) -> str:
    """Always fails with the reason given."""
    raise ToolError(f"refused: {reason}")  # its text reaches the client as is_error


def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return "slept"


TOOLS = {"add": add, "get-weather": weather, "fail": fail, "sleep": sleep}


if __name__ == "__main__":
    keep = set(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else set(TOOLS)
    server = MCPServer("agentrt-test", log_level="ERROR")
    for name, fn in TOOLS.items():
        if name in keep:
            server.tool(name=name)(fn)
    server.run("stdio")
