"""Trees of a fixed shape, as a grammar: every task's structure is forced, its texts are free characters of a
fixed length, and tool calls are forced. For measurements (the same tree with pruning off and on) and
tests; the model still samples every text character and the tool results are still real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from agentrt.grammar import Constraint, JsonSchema
from agentrt.threads._schema import TREE_SEPARATORS, namespaced

__all__ = ["ShapeTask", "TreeShape"]


@dataclass
class ShapeTask:
    """One task of a fixed tree: `chars` characters of thought and of conclusion, an optional forced tool
    call (name, parameters), and subtasks (None: `"subtasks": null`)."""

    chars: int = 8
    tool: tuple[str, dict[str, Any]] | None = None
    subtasks: list[ShapeTask] | None = None

    def count(self) -> int:
        return 1 + sum(t.count() for t in self.subtasks or [])


@dataclass
class TreeShape(Constraint):
    """A tree of exactly these tasks; texts drawn from `charset` (an EBNF character class). Digits are one
    token each in Llama-style tokenizers, so a text of n digits is n sampled tokens."""

    tasks: list[ShapeTask]
    answer_chars: int = 8
    charset: str = "[0-9]"
    separators: tuple[str, str] = TREE_SEPARATORS

    def _identity(self) -> Any:
        return [_shape_json(self.tasks), self.answer_chars, self.charset, list(self.separators)]

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        comma, colon = self.separators
        rules: dict[str, str] = {}
        shapes: dict[str, str] = {}  # one rule per distinct subtree
        result, _ = JsonSchema({}, separators=self.separators).ebnf()  # a tool result: any JSON

        def key(name: str, first: bool = False) -> str:
            return json.dumps(("{" if first else comma) + json.dumps(name) + colon)

        def text(n: int) -> str:
            rules[f"text_{n}"] = f'"\\"" {self.charset}{{{n}}} "\\""'
            return f"text_{n}"

        def task(t: ShapeTask) -> str:
            ident = json.dumps(_shape_json([t]))
            if ident in shapes:
                return shapes[ident]
            use = '"null"'
            if t.tool is not None:
                call = json.dumps({"tool_name": t.tool[0], "parameters": t.tool[1]},
                                  separators=self.separators)
                use = f'{json.dumps(call[:-1] + comma + json.dumps("tool_result") + colon)} res_root "}}"'
            subs = '"null"'
            if t.subtasks:
                subs = '"[" ' + f" {json.dumps(comma)} ".join(task(s) for s in t.subtasks) + ' "]"'
            name = shapes[ident] = f"task_{len(shapes)}"
            rules[name] = (f'{key("thought", first=True)} {text(t.chars)} {key("tooluse")} {use} '
                           f'{key("subtasks")} {subs} {key("conclusion")} {text(t.chars)} "}}"')
            return name

        body = f" {json.dumps(comma)} ".join(task(t) for t in self.tasks)
        root = (f'{json.dumps("{" + json.dumps("reasoning") + colon + "[")} {body} '
                f'{json.dumps("]" + comma + json.dumps("answer") + colon)} {text(self.answer_chars)} "}}"')
        lines = "\n".join(f"{k} ::= {v}" for k, v in rules.items())
        return xgr.Grammar.from_ebnf(f"root ::= {root}\n{lines}\n{namespaced(result, 'res_')}"), []


def _shape_json(tasks: list[ShapeTask] | None) -> Any:
    if tasks is None:
        return None
    return [[t.chars, t.tool, _shape_json(t.subtasks)] for t in tasks]
