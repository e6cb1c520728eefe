"""The reasoning-tree schema of thread mode (TIM, "Thread Inference Model", Subconscious Threads) as a
decoding grammar: `{"reasoning": [Task], "answer": ...}` with
`Task = {"thought", "tooluse": null | {"tool_name", "parameters", "tool_result"}, "subtasks": null | [Task],
"conclusion"}`, recursion unrolled to `max_depth`, each tool's parameter schema plugged into `tooluse`.

The grammar is composed in EBNF: the tree skeleton is written here, and each JSON part (a tool's
parameters, the answer, free text, a tool result) is the grammar package's own `JsonSchema` EBNF with its
rules renamed into a namespace of their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import xgrammar as xgr

from agentrt.errors import GrammarError, InvalidRequestError
from agentrt.grammar import TOOL_ARGUMENT_CAPS, Constraint, JsonSchema
from agentrt.tools import Tool, ToolRegistry

__all__ = ["ThreadSchema", "TREE_SEPARATORS"]

# The layout of the whole tree. One fixed space after ',' and ':' like agentrt's tool calls (small
# models follow the layout they were trained on; see agentrt.chat.TOOL_SEPARATORS).
TREE_SEPARATORS = (", ", ": ")

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z_][A-Za-z0-9_]*|.', re.DOTALL)


def namespaced(ebnf: str, prefix: str) -> str:
    """`ebnf` with every rule name (definitions and references) prefixed by `prefix`."""
    out = []
    for m in _TOKEN.finditer(ebnf):
        tok = m.group(0)
        out.append(prefix + tok if tok[0].isalpha() or tok[0] == "_" else tok)
    return "".join(out)


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=True)


class ThreadSchema(Constraint):
    """The thread-mode tree as a grammar constraint (compile it with `GrammarCompiler` like any other).

    Args:
        tools: the tools a task may call (a ToolRegistry, Tools, or plain functions); `tool_name` is an
            enum of their names and `parameters` follows the named tool's schema.
        max_depth: levels of tasks; tasks at the deepest level have `"subtasks": null`.
        answer_schema: JSON schema of `answer` (default: a string).
        require_tool: the first top-level task must call a tool (its `tooluse` is not null).
        max_items: most tasks in one list (`reasoning` or `subtasks`); None: ended by max_tokens. Weak
            models tend to repeat a task forever; a small bound ends them.
        max_text_chars: cap on `thought` / `conclusion` / string answers (None: ended by max_tokens;
            a cap costs compile time per character, keep it small, e.g. for random-model tests).
        separators: the tree's JSON layout; tool results are written in the same layout.
        schema_options: `JsonSchema` options for tool parameters and the answer (`max_string_length`, ...);
            tool parameters are capped by `TOOL_ARGUMENT_CAPS` unless these say otherwise, as in chat mode.
    """

    def __init__(self, tools: ToolRegistry | Iterable[Tool | Any] = (), *, max_depth: int = 3,
                 answer_schema: dict[str, Any] | type | None = None, require_tool: bool = False,
                 max_items: int | None = None, max_text_chars: int | None = None,
                 separators: tuple[str, str] = TREE_SEPARATORS,
                 **schema_options: Any) -> None:
        registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
        if not isinstance(max_depth, int) or max_depth < 1:
            raise InvalidRequestError(f"max_depth must be an integer >= 1, got {max_depth!r}",
                                      param="max_depth")
        if require_tool and not len(registry):
            raise InvalidRequestError("require_tool needs at least one tool", param="tools")
        if max_items is not None and max_items < 1:
            raise InvalidRequestError(f"max_items must be at least 1, got {max_items}", param="max_items")
        if max_text_chars is not None and max_text_chars < 1:
            raise InvalidRequestError(f"max_text_chars must be at least 1, got {max_text_chars}",
                                      param="max_text_chars")
        self.tools = [t.spec() for t in registry]
        self.max_depth = max_depth
        self.answer_schema = _schema_of(answer_schema)
        self.require_tool = require_tool
        self.max_items = max_items
        self.max_text_chars = max_text_chars
        self.separators = (separators[0], separators[1])
        self.schema_options = schema_options

    def _identity(self) -> Any:
        return [self.tools, self.max_depth, self.answer_schema, self.require_tool, self.max_items,
                self.max_text_chars, self.separators, sorted(self.schema_options.items())]

    @property
    def tool_names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    def render_result(self, value: Any) -> str:
        """A tool result as the tree's grammar accepts it after `"tool_result": `."""
        return json.dumps(value, separators=self.separators, ensure_ascii=False)

    # --- the grammar ---------------------------------------------------------------------------------
    def ebnf(self, *, resume_at: tuple[int, ...] | None = None) -> tuple[str, list[str]]:
        """The tree grammar as EBNF text (root rule `root`), with warnings about the embedded schemas.

        `resume_at=path`: instead, the rest of a tree from just after the `tool_result` value of the task
        at `path` (what a remote server is asked to continue after a tool ran between two requests)."""
        comma, colon = self.separators
        parts: list[str] = []
        warnings: list[str] = []

        def embed(prefix: str, schema: dict[str, Any], what: str, param: str, **options: Any) -> str:
            try:
                text, ws = JsonSchema(schema, separators=self.separators, **options).ebnf()
            except GrammarError as e:
                raise GrammarError(f"{what}: {e}", param=param) from e
            parts.append(namespaced(text, prefix))
            warnings.extend(f"{what}: {w}" for w in ws)
            return prefix + "root"

        def key(name: str, first: bool = False) -> str:  # the text before a property's value
            return ("{" if first else comma) + json.dumps(name) + colon

        caps = {"max_string_length": self.max_text_chars} if self.max_text_chars else {}
        text = embed("txt_", {"type": "string"}, "thought/conclusion text", "max_text_chars", **caps)
        answer_options = {**caps, **self.schema_options}
        answer = embed("ans_", self.answer_schema, "answer schema", "answer_schema", **answer_options)
        result = embed("res_", {}, "tool result", "tools")
        calls = []
        for i, tool in enumerate(self.tools):
            params = embed(f"t{i}_", tool["parameters"], f"tool {tool['name']!r}", "tools",
                           **{**TOOL_ARGUMENT_CAPS, **self.schema_options})
            head = _lit(json.dumps(tool["name"]) + key("parameters"))
            calls.append(f"{head} {params} {_lit(key('tool_result'))} {result}")


        def more(d: int, i: int) -> str:  # the rest of a depth-d list that holds i tasks so far
            return f"more_{d}" if self.max_items is None else f"more_{d}_{min(i, self.max_items)}"

        rules = {}
        if calls:
            rules["call"] = " | ".join(f"({c})" for c in calls)
            rules["tooluse_some"] = f'{_lit(key("tool_name", first=True))} call "}}"'
            rules["tooluse"] = '"null" | tooluse_some'
        else:
            rules["tooluse"] = '"null"'
        for d in range(1, self.max_depth + 1):
            sub = '"null"' if d == self.max_depth else f'"null" | "[" task_{d + 1} {more(d + 1, 1)}'
            rules[f"subtasks_{d}"] = sub
            for i in range(1, (self.max_items or 1) + 1):
                rules[more(d, i)] = f'"]" | {_lit(comma)} task_{d} {more(d, i + 1)}'
            if self.max_items is not None:
                rules[more(d, self.max_items)] = '"]"'
            for name, use in ((f"task_{d}", "tooluse"), ("task_first", "tooluse_some")):
                if name == "task_first" and not (d == 1 and self.require_tool):
                    continue
                rules[name] = (f'{_lit(key("thought", first=True))} {text} {_lit(key("tooluse"))} {use} '
                               f'{_lit(key("subtasks"))} subtasks_{d} {_lit(key("conclusion"))} {text} "}}"')
        first = "task_first" if self.require_tool else "task_1"
        rules["root"] = (f'{_lit(key("reasoning", first=True) + "[")} {first} {more(1, 1)} '
                         f'{_lit(key("answer"))} {answer} "}}"')
        if resume_at is not None:
            depth = len(resume_at)
            if not 1 <= depth <= self.max_depth:
                raise InvalidRequestError(f"resume_at must be a task path of 1..{self.max_depth} indices",
                                          param="resume_at")
            rules["root"] = f'"}}" {_lit(key("subtasks"))} subtasks_{depth} up_{depth}'
            for d in range(depth, 0, -1):  # close the task at depth d, its list, and go up a level
                up = f"up_{d - 1}" if d > 1 else f'{_lit(key("answer"))} {answer} "}}"'
                rest = more(d, resume_at[d - 1] + 1)
                rules[f"up_{d}"] = f'{_lit(key("conclusion"))} {text} "}}" {rest} {up}'
        skeleton = "\n".join(f"{name} ::= {body}" for name, body in rules.items())
        return skeleton + "\n" + "".join(parts), warnings

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        text, warnings = self.ebnf()
        try:
            return xgr.Grammar.from_ebnf(text), warnings
        except RuntimeError as e:
            raise GrammarError(f"cannot compile the thread grammar: {str(e).strip()[:300]}",
                               param="grammar") from e

    # --- the same tree as a JSON schema (documentation, validation) ---------------------------------
    def _max_items(self) -> dict[str, int]:
        return {} if self.max_items is None else {"maxItems": self.max_items}

    def json_schema(self) -> dict[str, Any]:
        """The tree as a JSON schema (draft 2020-12), e.g. to validate a finished tree."""
        uses: list[dict[str, Any]] = [{
            "type": "object",
            "properties": {"tool_name": {"const": t["name"]}, "parameters": t["parameters"],
                           "tool_result": {}},
            "required": ["tool_name", "parameters", "tool_result"], "additionalProperties": False,
        } for t in self.tools]
        defs: dict[str, Any] = {}
        for d in range(self.max_depth, 0, -1):
            sub: dict[str, Any] = {"type": "null"}
            if d < self.max_depth:
                items = {"$ref": f"#/$defs/task_{d + 1}"}
                sub = {"anyOf": [sub, {"type": "array", "minItems": 1, "items": items, **self._max_items()}]}
            defs[f"task_{d}"] = {
                "type": "object",
                "properties": {"thought": {"type": "string"}, "tooluse": {"anyOf": [{"type": "null"}, *uses]},
                               "subtasks": sub, "conclusion": {"type": "string"}},
                "required": ["thought", "tooluse", "subtasks", "conclusion"], "additionalProperties": False,
            }
        return {
            "type": "object",
            "properties": {"reasoning": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/task_1"},
                                         **self._max_items()},
                           "answer": self.answer_schema},
            "required": ["reasoning", "answer"], "additionalProperties": False, "$defs": defs,
        }


def _schema_of(answer: dict[str, Any] | type | None) -> dict[str, Any]:
    if answer is None or answer is str:
        return {"type": "string"}
    if isinstance(answer, type):
        from pydantic import TypeAdapter

        return TypeAdapter(answer).json_schema()
    if not isinstance(answer, dict):
        raise GrammarError(f"answer_schema must be a JSON schema dict or a type, got {answer!r:.80}",
                           param="answer_schema")
    return answer
