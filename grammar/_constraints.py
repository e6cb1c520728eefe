"""The constraint kinds a generation can be decoded under: JSON schema (dict or pydantic model), any
JSON, regex, EBNF, Lark and a fixed choice of strings. Each turns into an xgrammar `Grammar` plus
the warnings a caller should see; `key` identifies it for the compile cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import xgrammar as xgr

from agentrt.errors import GrammarError
from agentrt.grammar._json import first_line, json_schema_ebnf
from agentrt.grammar._schema import NormalizedSchema, normalize_schema

__all__ = ["Choice", "Constraint", "Ebnf", "Json", "JsonSchema", "Lark", "Regex"]


class Constraint(ABC):
    """A description of the outputs allowed; compiled per tokenizer by `GrammarCompiler`."""

    @abstractmethod
    def _identity(self) -> Any:
        """A JSON-serialisable value that determines the grammar."""

    @abstractmethod
    def build(self) -> tuple[xgr.Grammar, list[str]]:
        """The grammar and the warnings about what it does not enforce."""

    @property
    def key(self) -> str:
        blob = json.dumps([type(self).__name__, self._identity()], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        text = json.dumps(self._identity(), default=str)
        return f"{type(self).__name__}({text[:80]}{'...' if len(text) > 80 else ''})"


class JsonSchema(Constraint):
    """Outputs that validate against a JSON schema (a dict, JSON text, or a pydantic model class).

    Defaults guard against weak models: compact separators and no free whitespace, objects limited
    to the properties they name. `max_whitespace=N` allows up to N whitespace characters in a row
    instead; `allow_undeclared=True` follows JSON Schema's default of admitting extra properties;
    `strict=True` applies OpenAI strict semantics; `max_string_length` / `max_number_digits` /
    `max_array_items` / `max_object_entries` cap every string, number, array and open object
    (`{"type": "object"}` with no properties) so a weak model cannot stay inside one value forever;
    `max_untyped_depth` caps how deep untyped values (`{}`, free-form objects and arrays) nest.
    A string cap costs ~10 ms of compile time a character (once per grammar; masks stay fast).
    """

    def __init__(
        self,
        schema: dict[str, Any] | str | type,
        *,
        separators: tuple[str, str] = (",", ":"),
        max_whitespace: int | None = None,
        allow_undeclared: bool = False,
        strict: bool | None = None,
        max_string_length: int | None = None,
        max_number_digits: int | None = None,
        max_array_items: int | None = None,
        max_object_entries: int | None = None,
        max_untyped_depth: int | None = None,
    ) -> None:
        self.schema = _schema_dict(schema)
        self.separators = (separators[0], separators[1])
        self.max_whitespace = max_whitespace
        self.allow_undeclared = allow_undeclared
        self.strict = strict
        caps = {"max_string_length": max_string_length, "max_number_digits": max_number_digits,
                "max_array_items": max_array_items, "max_object_entries": max_object_entries,
                "max_untyped_depth": max_untyped_depth}
        for name, cap in caps.items():
            if cap is not None and (not isinstance(cap, int) or cap < 1):
                raise GrammarError(f"{name} must be a positive integer or None, got {cap!r}", param=name)
        self.max_string_length = max_string_length
        self.max_number_digits = max_number_digits
        self.max_array_items = max_array_items
        self.max_object_entries = max_object_entries
        self.max_untyped_depth = max_untyped_depth

    def _identity(self) -> Any:
        return [
            self.schema,
            self.separators,
            self.max_whitespace,
            self.allow_undeclared,
            self.strict,
            self.max_string_length,
            self.max_number_digits,
            self.max_array_items,
            self.max_object_entries,
            self.max_untyped_depth,
        ]

    def normalized(self, *, collect: bool = False, rewrite: bool = True) -> NormalizedSchema:
        """The schema normalised with this constraint's options (see `normalize_schema`)."""
        return normalize_schema(
            self.schema,
            strict=self.strict,
            allow_undeclared=self.allow_undeclared,
            max_integer_digits=self.max_number_digits,
            max_string_length=self.max_string_length,
            collect=collect,
            rewrite=rewrite,
        )

    def ebnf(self, *, collect: bool = False) -> tuple[str, list[str]]:
        """The grammar as EBNF text (what `ToolCalls` embeds), with warnings; `collect=True` builds
        it even where `strict` would refuse a keyword it drops (to check the rest of the grammar)."""
        norm = self.normalized(collect=collect)
        text, missing = json_schema_ebnf(
            norm.schema,
            separators=self.separators,
            max_whitespace=self.max_whitespace,
            allow_undeclared=self.allow_undeclared,
            max_string_length=self.max_string_length,
            max_number_digits=self.max_number_digits,
            max_array_items=self.max_array_items,
            max_object_entries=self.max_object_entries,
            max_untyped_depth=self.max_untyped_depth,
        )
        return text, norm.warnings + missing

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        text, warnings = self.ebnf()
        return _from_ebnf(text, "schema"), warnings


class Json(JsonSchema):
    """Any JSON value, laid out like `JsonSchema` (compact, optional length caps)."""

    def __init__(self, **options: Any) -> None:
        super().__init__({}, **options)


class Regex(Constraint):
    """Outputs that fully match a regular expression (xgrammar's regex dialect)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def _identity(self) -> Any:
        return self.pattern

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        try:
            return xgr.Grammar.from_regex(self.pattern), []
        except RuntimeError as e:
            raise GrammarError(
                f"cannot compile regex {self.pattern!r}: {first_line(e)}", param="regex"
            ) from e


class Ebnf(Constraint):
    """A GBNF/EBNF grammar in xgrammar's syntax (`root ::= ...`); `root` names the start rule."""

    def __init__(self, text: str | Path, *, root: str = "root") -> None:
        self.text = _read_if_path(text, ".ebnf", ".gbnf")
        self.root = root

    def _identity(self) -> Any:
        return [self.text, self.root]

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        return _from_ebnf(self.text, "grammar", root=self.root), []


class Lark(Constraint):
    """A grammar in Lark syntax (text, or a path to a `.lark` file); `start` names the start rule,
    as Lark's own `start=` option does.

    Rule and terminal priorities (`rule.2:`) only steer Lark's parser, not the language, so they
    are dropped; templates are not supported by xgrammar and are reported as an error.
    """

    def __init__(self, text: str | Path, *, start: str = "start") -> None:
        self.text = _read_if_path(text, ".lark")
        self.start = start

    def _identity(self) -> Any:
        return [self.text, self.start]

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        text = re.sub(r"(?m)^(\s*[?!]?[A-Za-z_]\w*)\.-?\d+(\s*:)", r"\1\2", self.text)
        if self.start != "start":
            if re.search(r"(?m)^\s*[?!]?start\s*:", text):
                raise GrammarError(
                    f"the grammar defines `start` but start={self.start!r} was asked for", param="grammar"
                )
            text += f"\nstart: {self.start}\n"
        try:
            return xgr.Grammar.from_lark(text), []
        except RuntimeError as e:
            raise GrammarError(f"cannot compile the Lark grammar: {first_line(e)}", param="grammar") from e


class Choice(Constraint):
    """Exactly one of a fixed list of strings."""

    def __init__(self, options: list[str]) -> None:
        if not options or not all(isinstance(o, str) for o in options):
            raise GrammarError("Choice needs a non-empty list of strings", param="choices")
        self.options = list(dict.fromkeys(options))

    def _identity(self) -> Any:
        return self.options

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        body = " | ".join(f"({ebnf_literal(o)})" if o else '("")' for o in self.options)
        return _from_ebnf(f"root ::= {body}\n", "choices"), []


def ebnf_literal(s: str) -> str:
    """`s` as an EBNF string literal."""
    return json.dumps(s, ensure_ascii=False)


def _from_ebnf(text: str, param: str, root: str = "root") -> xgr.Grammar:
    try:
        return xgr.Grammar.from_ebnf(text, root_rule_name=root)
    except RuntimeError as e:
        raise GrammarError(f"cannot compile the grammar: {first_line(e)}", param=param) from e


def _schema_dict(schema: dict[str, Any] | str | type) -> dict[str, Any]:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}", param="schema") from e
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise GrammarError(
            "a JSON schema must be a dict, JSON text or a pydantic model class", param="schema"
        )
    return schema


def _read_if_path(text: str | Path, *suffixes: str) -> str:
    if isinstance(text, Path) or (isinstance(text, str) and "\n" not in text and text.endswith(suffixes)):
        path = Path(text)
        try:
            return path.read_text()
        except OSError as e:
            raise GrammarError(f"cannot read grammar file {path}: {e.strerror}", param="grammar") from e
    return text
