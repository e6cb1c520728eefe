"""agentrt: a runtime for language-model agents that call tools and produce structured output.

The public surface: `Agent` (the SDK), `tool` (make a function a tool), `Engine` (the local model
runner), `SamplingParams`, and `agentrt.errors`. Sub-packages: grammar, planner, tools, threads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Agent", "RunResult", "tool", "MCPServerStdio", "Engine", "SamplingParams", "errors"]

from agentrt import errors
from agentrt.engine.sampling import SamplingParams


def __getattr__(name: str) -> Any:  # heavy imports (torch, xgrammar) only when used
    if name in ("Agent", "RunResult"):
        from agentrt import agent

        return getattr(agent, name)
    if name == "tool":
        from agentrt.tools import tool

        return tool
    if name == "MCPServerStdio":
        from agentrt.tools import MCPServerStdio

        return MCPServerStdio
    if name == "Engine":
        from agentrt.engine import Engine

        return Engine
    raise AttributeError(f"module 'agentrt' has no attribute {name!r}")
