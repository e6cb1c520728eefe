"""agentrt.tools: `@tool`, the registry, Tool RAG (BM25) and built-in tools.

Tools follow LLMCompiler / TinyAgent: typed functions whose failures are observations for the model.
MCP servers' tools come in through `MCPServerStdio` (a stdio server's tools as agentrt tools).
"""

from __future__ import annotations

from agentrt.tools._calculator import calculator, evaluate
from agentrt.tools._http import http_get, make_http_get
from agentrt.tools._mcp import MCPServerStdio, MCPTool
from agentrt.tools._rag import Embedder, ScoredTool, ToolIndex, sentence_embedder
from agentrt.tools._registry import ToolRegistry
from agentrt.tools._tool import Tool, ToolContext, ToolResult, format_validation_error, to_result, tool
from agentrt.tools._workspace import workspace_tools

__all__ = [
    "tool",
    "Tool",
    "ToolContext",
    "ToolResult",
    "ToolRegistry",
    "ToolIndex",
    "ScoredTool",
    "Embedder",
    "sentence_embedder",
    "calculator",
    "evaluate",
    "http_get",
    "make_http_get",
    "workspace_tools",
    "MCPServerStdio",
    "MCPTool",
    "format_validation_error",
    "to_result",
]
