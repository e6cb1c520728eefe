"""Grammar-constrained decoding for agentrt, built on XGrammar (Dong et al., 2024).

Constraints (JSON schema, regex, EBNF, Lark, choices, tool-call envelopes) compile per tokenizer
through a byte-bounded cache; `Matcher` is what the engine drives per step.
"""

from __future__ import annotations

from agentrt.grammar._compiler import CompileCache, CompiledConstraint, GrammarCompiler, tokenizer_info
from agentrt.grammar._constraints import Choice, Constraint, Ebnf, Json, JsonSchema, Lark, Regex
from agentrt.grammar._isolate import CompileRateLimitError, RestartBudget, compile_client
from agentrt.grammar._matcher import Matcher
from agentrt.grammar._schema import NormalizedSchema, normalize_schema
from agentrt.grammar._tools import (
    MAX_TOOL_CALLS,
    TOOL_ARGUMENT_CAPS,
    CallList,
    call_key,
    listed_names,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    ToolCalls,
    ToolSpec,
    parse_tool_calls,
    render_tool_call,
)

__all__ = [
    "Constraint",
    "JsonSchema",
    "Json",
    "Regex",
    "Ebnf",
    "Lark",
    "Choice",
    "ToolCalls",
    "CallList",
    "listed_names",
    "call_key",
    "MAX_TOOL_CALLS",
    "TOOL_ARGUMENT_CAPS",
    "ToolSpec",
    "render_tool_call",
    "parse_tool_calls",
    "TOOL_CALL_BEGIN",
    "TOOL_CALL_END",
    "normalize_schema",
    "NormalizedSchema",
    "GrammarCompiler",
    "CompiledConstraint",
    "CompileCache",
    "tokenizer_info",
    "compile_client",
    "CompileRateLimitError",
    "RestartBudget",
    "Matcher",
]
