"""JSON-schema → EBNF text with the layout agentrt enforces: compact separators, no free whitespace
(or a bounded amount), and optional caps on string and number length.

XGrammar converts the schema; we then rewrite its shared `basic_*` rules, which (in 0.2.8) keep
`", "` separators inside untyped values and admit unbounded strings and digit runs.
"""

from __future__ import annotations

import re
from typing import Any

import xgrammar as xgr

from agentrt.errors import GrammarError

__all__ = ["json_schema_ebnf"]


def json_schema_ebnf(
    schema: dict[str, Any],
    *,
    separators: tuple[str, str] = (",", ":"),
    max_whitespace: int | None = None,
    allow_undeclared: bool = False,
    max_string_length: int | None = None,
    max_number_digits: int | None = None,
) -> tuple[str, list[str]]:
    """EBNF text for a normalised schema, and warnings about caps that could not be applied.

    `max_whitespace=None` allows no whitespace beyond `separators`; an integer allows any
    whitespace between tokens, at most that many characters in a row.
    """
    any_ws = max_whitespace is not None and max_whitespace > 0
    try:
        grammar = xgr.Grammar.from_json_schema(
            schema,
            any_whitespace=any_ws,
            separators=None if any_ws else separators,
            strict_mode=not allow_undeclared,
            max_whitespace_cnt=max_whitespace if any_ws else None,
        )
    except RuntimeError as e:
        raise GrammarError(f"cannot compile the JSON schema: {_first_line(e)}", param="schema") from e
    text = str(grammar)
    rules = _Rules(text)
    comma, colon = separators
    if not any_ws:  # xgrammar keeps ", " in untyped arrays/objects whatever the separators
        rules.replace("basic_array_items", f"(({_lit(comma)} basic_any))")
        rules.replace("basic_object_properties", f"(({_lit(comma)} basic_string {_lit(colon)} basic_any))")
        first = f"basic_string {_lit(colon)} basic_any"
        rules.replace("basic_object", f'(("{{" {first} basic_object_properties{{0, -1}} "}}") | ("{{" "}}"))')
    if max_string_length is not None:
        n = max_string_length
        rules.replace("basic_string", f'(("\\"" basic_string_char{{0, {n}}} "\\""))')
        rules.add("basic_string_char", '(([^\\0-\\x1f\\"\\\\]) | ("\\\\" basic_escape))')
    if max_number_digits is not None:
        n = max_number_digits
        rules.replace("basic_integer", f'(("0") | (basic_integer_1 [1-9] [0-9]{{0, {n - 1}}}))')
        rules.replace("basic_number_2", f'(("0") | ([1-9] [0-9]{{0, {n - 1}}}))')
        rules.replace("basic_number_3", f'("" | ("." basic_number_digits{{1, {n}}}))')
        rules.replace("basic_number_5", f'("" | ([eE] basic_number_4 basic_number_digits{{1, {min(n, 3)}}}))')
    text = rules.text()
    if max_number_digits is not None:  # typed numbers get rules of their own: cap those digits too
        n = max_number_digits
        text = text.replace("[1-9] [0-9]*", f"[1-9] [0-9]{{0, {n - 1}}}")
        text = re.sub(r"(\w+_digits)\{1, -1\}", lambda m: f"{m.group(1)}{{1, {n}}}", text)
    return text, rules.missing


class _Rules:
    """The rule lines of an EBNF text, by name."""

    def __init__(self, text: str) -> None:
        self.lines = [ln for ln in text.splitlines() if ln.strip()]
        self.index = {m.group(1): i for i, ln in enumerate(self.lines) if (m := re.match(r"(\w+) ::= ", ln))}
        self.missing: list[str] = []

    def replace(self, name: str, body: str) -> None:
        if name in self.index:
            self.lines[self.index[name]] = f"{name} ::= {body}"
        else:  # xgrammar renamed its shared rules: say so rather than silently skip a cap
            self.missing.append(f"rule {name!r} not found; its layout or length cap is not applied")

    def add(self, name: str, body: str) -> None:
        if name not in self.index:
            self.index[name] = len(self.lines)
            self.lines.append(f"{name} ::= {body}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _lit(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+: ", "", msg)
