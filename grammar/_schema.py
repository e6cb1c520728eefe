"""JSON-schema normalisation before a schema becomes a grammar.

Maps BFCL-style types (`dict`, `float`, `tuple`, `any`, ...) and transformers' `nullable` to JSON
Schema, applies OpenAI `strict: true` semantics, merges simple `allOf`s, and reports every keyword
the grammar cannot enforce as a warning instead of silently loosening it (XGrammar's known trap);
under `strict` such a keyword is an error that names it. Schemas over MAX_SCHEMA_NODES are refused.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Any

import xgrammar as xgr

from agentrt.errors import GrammarError

__all__ = ["NormalizedSchema", "json_extent", "normalize_schema"]

# BFCL / Python / Java-ish type names → JSON Schema types (None: no type constraint).
_TYPE_ALIASES: dict[str, str | None] = {
    **dict.fromkeys(["dict", "object", "hashmap", "map"], "object"),
    **dict.fromkeys(["float", "double", "number"], "number"),
    **dict.fromkeys(["integer", "int", "long", "short", "byte"], "integer"),
    **dict.fromkeys(["tuple", "list", "array", "arraylist"], "array"),
    **dict.fromkeys(["string", "str", "char", "character"], "string"),
    **dict.fromkeys(["boolean", "bool"], "boolean"),
    **dict.fromkeys(["null", "none"], "null"),
    "any": None,
}

# Validation keywords the grammar does not enforce (xgrammar 0.2.8; tests/grammar checks each one
# really is let through). uniqueItems only matters when true.
_UNENFORCED = {
    "contains", "minContains", "maxContains", "dependentRequired", "dependencies", "dependentSchemas",
    "not", "if", "then", "else", "unevaluatedProperties", "unevaluatedItems",
}  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = (
    "items", "additionalProperties", "additionalItems", "propertyNames", "not", "if", "then", "else",
    "contains", "unevaluatedProperties", "unevaluatedItems",
)  # fmt: skip
_ANNOTATIONS = {
    "title", "description", "default", "examples", "$comment", "readOnly", "writeOnly", "deprecated",
    "$schema", "$id", "id",
}  # fmt: skip
_RANGE_KEYS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_LOOKAROUND = re.compile(r"\(\?<?[=!]")
# 4x the largest MaskBench schema; 2,000 optional properties take ~25 s to compile on 2 cores
MAX_SCHEMA_NODES = 2000
MAX_SCHEMA_DEPTH = 64  # nested objects and lists; deeper ones would exhaust Python's recursion limit
_LOWER_BOUNDS = {"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"}
_UPPER_BOUNDS = {"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"}


@dataclass
class NormalizedSchema:
    schema: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    loosened: list[str] = field(default_factory=list)  # the warnings about keywords xgrammar's grammar drops


def normalize_schema(
    schema: dict[str, Any] | bool,
    *,
    strict: bool | None = None,
    allow_undeclared: bool = False,
    max_integer_digits: int | None = None,
    max_string_length: int | None = None,
    collect: bool = False,
    rewrite: bool = True,
) -> NormalizedSchema:
    """Return a copy of `schema` the grammar compiler understands, plus warnings.

    `strict` applies OpenAI structured-output semantics to every object (all properties required,
    no others); None reads `strict` from the schema itself. `allow_undeclared` says whether objects
    may carry properties their schema does not name when it does not say (JSON Schema's default);
    `max_integer_digits` bounds integers without bounds of their own, `max_string_length` strings
    that have a `minLength` but no `maxLength` (other strings are capped in the grammar itself).
    `collect=True` records keywords the grammar would loosen (`loosened`) instead of refusing them
    under `strict`; `rewrite=False` skips the rewrites only xgrammar's grammar needs (patterns anchored
    to the whole string, forbidden `false` properties dropped), for a backend that reads JSON Schema
    itself (llguidance).
    """
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object or true, got {schema!r}", param="schema")
    nodes, depth = json_extent(schema, MAX_SCHEMA_NODES)
    if nodes > MAX_SCHEMA_NODES:
        raise GrammarError(f"the JSON schema is too large: more than {MAX_SCHEMA_NODES} subschemas; simplify it",
                           param="schema")
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the JSON schema is nested {depth} levels deep, more than the limit of "
                           f"{MAX_SCHEMA_DEPTH}; flatten it (a $ref can name a shared part)", param="schema")
    out = copy.deepcopy(schema)
    if strict is None:
        strict = out.get("strict") is True
    out.pop("strict", None)
    norm = _Normalizer(
        strict=strict,
        allow_undeclared=allow_undeclared,
        max_integer_digits=max_integer_digits,
        max_string_length=max_string_length,
        collect=collect,
        rewrite=rewrite,
    )
    out = norm.walk(out, "")
    return NormalizedSchema(out, norm.warnings, norm.loosened)


class _Normalizer:
    def __init__(
        self,
        *,
        strict: bool,
        allow_undeclared: bool,
        max_integer_digits: int | None,
        max_string_length: int | None,
        collect: bool = False,
        rewrite: bool = True,
    ) -> None:
        self.collect, self.rewrite = collect, rewrite
        self.loosened: list[str] = []
        self.max_string_length = max_string_length
        self.strict = strict
        self.allow_undeclared = allow_undeclared
        self.max_integer_digits = max_integer_digits
        self.warnings: list[str] = []

    def warn(self, path: str, msg: str, *, loosens: bool = True) -> None:
        """Record what the grammar does differently; under `strict`, a keyword it loosens is an error
        (unless `collect`)."""
        if loosens:
            self.loosened.append(f"{path or '/'}: {msg}")
        if loosens and self.strict and not self.collect:
            raise GrammarError(f"{path or '/'}: {msg}; strict mode requires every keyword to be enforced: remove "
                               "it or drop strict", param="schema")
        self.warnings.append(f"{path or '/'}: {msg}")

    def walk(self, s: Any, path: str) -> Any:
        if s is True:
            return {}
        if not isinstance(s, dict):
            return s
        self._types(s, path)
        if s.pop("nullable", False) is True:
            s = self._nullable(s)
        if "allOf" in s:
            s = self._merge_all_of(s, path)
        if (
            _types_of(s) == {"array"}
            and isinstance(s.get("enum"), list)
            and s["enum"]
            and not any(isinstance(v, (list, dict)) for v in s["enum"])
        ):  # BFCL writes the items' enum on the array itself
            items = s.get("items") if isinstance(s.get("items"), dict) else {}
            items.setdefault("enum", s.pop("enum"))
            s["items"] = items
            self.warn(path, "'enum' of scalars on an array was moved to its items", loosens=False)
        if isinstance(s.get("items"), list):  # draft-4 tuple form
            s["prefixItems"] = s.pop("items")
            extra = s.pop("additionalItems", None)
            if extra is not None:
                s["items"] = extra
        for key in sorted(_UNENFORCED & s.keys()) + (["uniqueItems"] if s.get("uniqueItems") is True else []):
            self.warn(path, f"'{key}' is not enforced by the grammar; outputs may violate it")
        for key in ("anyOf", "oneOf"):
            if isinstance(s.get(key), list) and ("properties" in s or "required" in s):
                self.warn(
                    path,
                    f"'{key}' next to 'properties'/'required' in the same schema is only partly enforced",
                )
        if isinstance(s.get("oneOf"), list) and len(s["oneOf"]) > 1 and not _disjoint_types(s["oneOf"]):
            self.warn(
                path, "'oneOf' branches may overlap; the grammar enforces 'anyOf' (at least one branch)"
            )
        if "multipleOf" in s and _types_of(s) != {"integer"}:
            self.warn(path, "'multipleOf' on non-integers is not enforced by the grammar")
        if "format" in s and not _format_supported(str(s["format"])):
            self.warn(path, f"format {s['format']!r} is not enforced by the grammar")
        if "pattern" in s and "format" in s:
            self.warn(path, "'pattern' next to 'format' is not enforced by the grammar (only 'format' is)")
        if isinstance(s.get("patternProperties"), dict) and s["patternProperties"]:
            self.warn(path, "'patternProperties' keys are not checked for uniqueness by the grammar")
        if ("pattern" in s or "format" in s) and ("minLength" in s or "maxLength" in s):
            self.warn(
                path, "'minLength'/'maxLength' next to 'pattern' or 'format' are not enforced by the grammar"
            )
        if "multipleOf" in s and _types_of(s) == {"integer"} and _RANGE_KEYS & s.keys():
            self.warn(path, "'multipleOf' together with a range is not enforced by the grammar")
        if isinstance(s.get("pattern"), str):
            if _LOOKAROUND.search(s["pattern"]):
                self.warn(path, "lookaround assertions in 'pattern' are ignored by the grammar")
            if self.rewrite:
                s["pattern"] = _anchor(s["pattern"])
        for key in _SUBSCHEMA_MAPS:
            if isinstance(s.get(key), dict):
                s[key] = {k: self.walk(v, f"{path}/{key}/{k}") for k, v in s[key].items()}
        for key in ("anyOf", "oneOf"):  # sibling `items` apply to every array branch too
            if isinstance(s.get(key), list) and "items" in s:
                for branch in s[key]:
                    if isinstance(branch, dict) and "array" in _types_of(branch):
                        branch.setdefault("items", s["items"])
        for key in _SUBSCHEMA_LISTS:
            if isinstance(s.get(key), list):
                s[key] = [self.walk(v, f"{path}/{key}/{i}") for i, v in enumerate(s[key])]
        for key in _SUBSCHEMA_ONE:
            if isinstance(s.get(key), dict):
                s[key] = self.walk(s[key], f"{path}/{key}")
        if isinstance(s.get("properties"), dict) and self.rewrite:
            self._forbidden_properties(s, path)
        if "object" in _types_of(s) or "properties" in s:
            self._object_rules(s)
        if "array" in _types_of(s) and "items" not in s and "prefixItems" not in s:
            s["items"] = {}  # xgrammar's closed mode would otherwise allow only []
        if (
            self.max_integer_digits
            and _types_of(s) == {"integer"}
            and not {"enum", "const", "multipleOf"} & s.keys()
        ):
            bound = 10**self.max_integer_digits - 1
            s.setdefault("minimum", -bound)
            s.setdefault("maximum", bound)
        if (
            self.max_string_length
            and "minLength" in s
            and "maxLength" not in s
            and _types_of(s) == {"string"}
        ):
            s["maxLength"] = max(self.max_string_length, s["minLength"])
        return s

    def _types(self, s: dict[str, Any], path: str) -> None:
        t = s.get("type")
        if t is None:
            return
        names = t if isinstance(t, list) else [t]
        mapped: list[str] = []
        for name in names:
            if not isinstance(name, str) or name.lower() not in _TYPE_ALIASES:
                raise GrammarError(f"{path or '/'}: unknown schema type {name!r}", param="schema")
            m = _TYPE_ALIASES[name.lower()]
            if m is None:  # `any` anywhere in the list means no type constraint
                s.pop("type")
                return
            if m not in mapped:
                mapped.append(m)
        s["type"] = mapped[0] if len(mapped) == 1 else mapped
        if isinstance(s.get("enum"), list):  # an enum value of another type can never validate
            kept = [v for v in s["enum"] if _json_type(v) in mapped or (_json_type(v) == "integer"
                                                                        and "number" in mapped)]
            if len(kept) < len(s["enum"]):
                if not kept:  # unsatisfiable: the grammar cannot say "nothing", so it follows the enum
                    self.warn(path, f"no 'enum' value is of type {t!r}: nothing can match, the grammar "
                                    "follows the enum")
                else:
                    self.warn(path, f"'enum' values not of type {t!r} were dropped", loosens=False)
                    s["enum"] = kept

    def _nullable(self, s: dict[str, Any]) -> dict[str, Any]:
        if "enum" in s and None not in s["enum"]:
            s["enum"] = [*s["enum"], None]
        t = s.get("type")
        if isinstance(t, str):
            s["type"] = [t, "null"]
            return s
        if isinstance(t, list):
            s["type"] = t if "null" in t else [*t, "null"]
            return s
        if "enum" in s or "const" in s:
            return s if "enum" in s else {"anyOf": [s, {"type": "null"}]}
        return {"anyOf": [s, {"type": "null"}]} if s else s

    def _object_rules(self, s: dict[str, Any]) -> None:
        props = s.get("properties")
        if isinstance(props, dict):  # required but undeclared: a closed object must still admit it
            for name in s.get("required", []):
                props.setdefault(name, {})
        if self.strict:
            props = s.get("properties") or {}
            s["required"] = list(props)
            s["additionalProperties"] = False
        elif (
            "additionalProperties" not in s
            and "unevaluatedProperties" not in s
            and (self.allow_undeclared or not (s.get("properties") or s.get("patternProperties")))
        ):  # closed by default only where the schema names properties; `{"type": "object"}` stays open
            s["additionalProperties"] = True

    def _forbidden_properties(self, s: dict[str, Any], path: str) -> None:
        # {"properties": {"x": false}}: the grammar cannot express `false`; drop it and say so
        for name, sub in list(s["properties"].items()):
            if sub is False:
                del s["properties"][name]
                if name in s.get("required", []):
                    raise GrammarError(
                        f"{path}/properties/{name}: required but forbidden (false)", param="schema"
                    )
                if not self.strict and s.get("additionalProperties", self.allow_undeclared) is not False:
                    self.warn(
                        path, f"property {name!r} is forbidden (false) but may still appear as an extra"
                    )

    def _merge_all_of(self, s: dict[str, Any], path: str) -> dict[str, Any]:
        branches = s.pop("allOf")
        merged: dict[str, Any] = s
        rest: list[Any] = []
        for b in branches:
            if b is True or b == {}:
                continue
            if isinstance(b, dict):
                b = copy.deepcopy(b)
                self._types(b, path)
            if not isinstance(b, dict) or "$ref" in b or not _merge_into(merged, b):
                rest.append(b)
        if rest:
            self.warn(path, "'allOf' with references or conflicting keywords is only partly enforced")
            merged["allOf"] = rest
        return merged


def json_extent(x: Any, limit: int) -> tuple[int, int]:
    """(objects, nesting depth of objects and lists) of a JSON value, counting no further than just
    past `limit` objects; without recursion, so any depth is safe to measure."""
    n, deepest, stack = 0, 0, [(x, 1)]
    while stack and n <= limit:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, depth)
            n += isinstance(v, dict)
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return n, deepest


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(v), "?")


def _types_of(s: dict[str, Any]) -> set[str]:
    t = s.get("type")
    return {t} if isinstance(t, str) else set(t or ())


def _disjoint_types(branches: list[Any]) -> bool:
    seen: set[str] = set()
    for b in branches:
        t = _types_of(b) if isinstance(b, dict) else set()
        if not t or t & seen or ({"integer", "number"} <= (t | seen)):
            return False
        seen |= t
    return True


def _merge_into(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Merge schema `b` into `a` (both must hold); False, with `a` untouched, on a conflict."""
    trial = dict(a)
    for k, v in b.items():
        if k not in trial or k in _ANNOTATIONS:
            trial.setdefault(k, v)
        elif k == "properties":
            props = dict(trial[k])
            for name, sub in v.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            trial[k] = props
        elif k == "required":
            trial[k] = list(dict.fromkeys([*trial[k], *v]))
        elif k == "type":
            ta = set(trial[k]) if isinstance(trial[k], list) else {trial[k]}
            tb = set(v) if isinstance(v, list) else {v}
            both = ta & tb | (
                {"integer"}
                if ("number" in ta and "integer" in tb) or ("integer" in ta and "number" in tb)
                else set()
            )
            if not both:
                return False
            trial[k] = sorted(both) if len(both) > 1 else both.pop()
        elif k in _LOWER_BOUNDS and isinstance(v, (int, float)):
            trial[k] = max(trial[k], v)
        elif k in _UPPER_BOUNDS and isinstance(v, (int, float)):
            trial[k] = min(trial[k], v)
        elif trial[k] != v:
            return False
    a.clear()
    a.update(trial)
    return True


def _anchor(pattern: str) -> str:
    """JSON Schema patterns match anywhere in the string; xgrammar matches the whole string."""
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    if start and end:
        return pattern[1:-1]
    core = pattern[1 if start else 0 : len(pattern) - 1 if end else len(pattern)]
    return ("" if start else ".*") + f"(?:{core})" + ("" if end else ".*")


@functools.cache
def _format_supported(fmt: str) -> bool:
    # a format xgrammar ignores compiles to the same grammar as a plain string
    def text(schema: dict[str, Any]) -> str:
        return str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))

    try:
        return text({"type": "string", "format": fmt}) != text(
            {"type": "string", "format": "-no-such-format-"}
        )
    except RuntimeError:
        return False
