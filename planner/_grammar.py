"""Decoding grammars (xgrammar EBNF) for plans, ReAct steps and the joiner.

The plan language of plan.lark, specialised per request (XGrammar, Dong et al. 2024, compiles it):
only registered tool names, each tool's arguments following its JSON schema, and in task N only
references to tasks that exist before N — so an invalid plan cannot be decoded. Value positions
accept `$K.path` (bare or quoted) for allowed K; rules are emitted once per distinct set of allowed K.
Strings, numbers, arrays and whitespace are bounded so a weak model cannot run away.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrt.errors import PlanError
from agentrt.planner._ground import grounded_params
from agentrt.tools import Tool, ToolRegistry

__all__ = ["GrammarLimits", "plan_grammar", "react_grammar", "joiner_grammar", "answer_numbers", "expression_numbers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds that keep decoding finite: a random or weak model must still reach `join()`.

    Free text (thoughts, strings, answers) is unbounded by default and ended by max_tokens: a
    bound compiles to a chain of one rule per character (~10 ms of compile time each with
    xgrammar 0.2.8), so set the `*_chars` bounds small when you need them (random-model tests).
    A string's own `maxLength` is enforced when it is at most 64.
    """

    max_tasks: int = 20
    max_thought_chars: int | None = None
    max_string_chars: int | None = None
    max_int_digits: int = 15
    max_array_items: int = 32
    max_object_entries: int = 16
    max_path_segments: int = 4
    max_answer_chars: int | None = None


# Bounded repetitions repeat a rule with an alternation (`tchar`, `digit`, ...): xgrammar 0.2.8
# inlines a rule that is a bare character class, and compiling `[^\n]{0,1000}` then takes seconds;
# with the (redundant) second alternative it takes milliseconds. Likewise `maybe_thought` rather
# than `thought?` in every task rule: the optional got inlined per task (80 ms each).
# `uhex` leaves out surrogate escapes (\ud800-\udfff): a lone one is not valid Unicode.
_LINE_CHAR = r"[^\n\r]"
# An answer ends at its first unbalanced ")" (one level of parentheses inside is fine): a weak
# model cannot wander on past a finished Finish(...).
_ANSWER_CHARS = [r"[^\n\r()]", '"(" paren']
_PAREN = r'")" | [^\n\r()] paren'

_JCHARS = [r'[^"\\$\0-\x1f]', "esc", r'"$" [^"\\$0-9\0-\x1f]']  # a string character (no `$N`)
_COMMON = r"""
ws ::= [ ]?
sep ::= ws "," ws
colon ::= ws ":" ws
digit ::= [0-9] | "0"
idchar ::= [A-Za-z0-9_] | "_"
maybe_thought ::= "" | thought
esc ::= "\\" (["\\/bfnrt] | "u" uhex)
uhex ::= [0-9a-cA-Ce-fE-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] | [dD] [0-7] [0-9a-fA-F] [0-9a-fA-F]
jstring ::= "\"" jsub
jsub ::= "\"" | [^"\\$\0-\x1f] jsub | esc jsub | "$" [^"\\$0-9\0-\x1f] jsub
jint ::= "-"? jnat
jnat ::= "0" | [1-9] digit{0,%(digits)d}
jnumber ::= jint ("." digit{1,%(digits)d})? ([eE] [+-]? digit{1,3})?
jbool ::= "true" | "false"
path ::= pathseg{0,%(segs)d}
pathseg ::= "." [A-Za-z_] idchar{0,31} | "[" digit{1,3} "]"
"""


def _then(first: list[str], chars: list[str], rest: str) -> str:
    """`first[0] | ... | c1 rest | c2 rest | ...`: flat alternatives compile fastest in xgrammar."""
    return " | ".join(first + [f"{c} {rest}" for c in chars])


def _lit(text: str) -> str:
    """An EBNF string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=True)


def _json_lit(value: Any) -> str:
    """An EBNF literal matching the compact JSON encoding of `value`."""
    return _lit(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


# numbers an expression may always use (halves, percentages, ...), and the calculator's functions
_CONSTANTS = [str(n) for n in range(11)] + ["100", "1000"]
_ARITH_DEPTH, _ARITH_TERMS = 3, 24  # parentheses nested, terms at each level
_FUNCTIONS = ["sqrt", "abs", "round", "min", "max", "log10", "log", "exp", "sin", "cos", "tan", "floor", "ceil"]


@dataclass
class _Builder:
    limits: GrammarLimits
    numbers: Sequence[str] | None = None  # see arithmetic_rule
    rules: dict[str, str] = field(default_factory=dict)
    _variants: dict[frozenset[int], int] = field(default_factory=dict)
    _counter: int = 0

    def rule(self, name: str, body: str) -> str:
        self.rules[name] = body
        return name

    def fresh(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    def ref_rule(self, allowed: frozenset[int]) -> str | None:
        """Rule for `$K.path` / `"$K.path"` with K in `allowed` (None when nothing may be referenced)."""
        if not allowed:
            return None
        v = self.variant(allowed)
        name = f"ref_v{v}"
        if name not in self.rules:
            ids = " | ".join(_lit(str(k)) for k in sorted(allowed))
            self.rule(f"refid_v{v}", ids)
            self.rule(name, f'"$" refid_v{v} path | "\\"$" refid_v{v} path "\\""')
        return name

    def text_rule(self, stem: str, chars: list[str], end: str, hi: int | None) -> str:
        """Characters (alternatives `chars`) then `end`, right-recursive so the rule ends inside
        itself (fast masks, see `string_rule`); with `hi`, a chain of hi + 1 rules allows at most
        hi characters."""
        if hi is None:
            return self.rule(stem, _then([end], chars, stem))
        for i in range(hi + 1):
            self.rule(f"{stem}_{i}", end if i == hi else _then([end], chars, f"{stem}_{i + 1}"))
        return f"{stem}_0"

    def answer_rule(self, numbers: Iterable[str] | None = None, refs: frozenset[int] = frozenset()) -> str:
        """An answer's text up to its closing ")" (one level of parentheses inside). With `numbers`,
        digits come only inside one of `numbers` or a reference `$K` (K in `refs`): an answer cannot
        hold a number that neither the question nor a result gave (a small model copying digits into
        its answer gets them wrong; a reference or a grounded number cannot be wrong that way)."""
        if numbers is None:
            self.rule("paren", _PAREN)
            return self.text_rule("ftext", _ANSWER_CHARS, _lit(")"), self.limits.max_answer_chars)
        pieces = [r"[^\n\r()0-9$]"]
        if numbers := sorted(set(numbers)):
            pieces.append(self.rule("gnum", " | ".join(_lit(n) for n in numbers)))
        if ref := self.ref_rule(refs):
            pieces.append(ref)
        self.rule("gparen", _then(['")"'], pieces, "gparen"))
        return self.text_rule("gtext", pieces + ['"(" gparen'], _lit(")"), self.limits.max_answer_chars)

    def string_rule(self, allowed: frozenset[int], hi: int | None = None, nonempty: bool = False) -> str:
        """A JSON string (`_string_rule`); `nonempty` (a schema's minLength >= 1): at least one
        character or reference — a longer minLength is checked when the tool runs."""
        name = self._string_rule(allowed, hi)
        if allowed:  # references: only the global bound applies (`_string_rule`)
            v, hi = self.variant(allowed), self.limits.max_string_chars
            sub, ref = f"jsub_v{v}{'' if hi is None else '_1'}", f" | interp_v{v} jtail_v{v}{'' if hi is None else '_1'}"
        else:
            hi = self.limits.max_string_chars if hi is None else hi
            sub, ref = ("jsub" if hi is None else f"jchars_{hi}_1"), ""
        if not nonempty or hi == 0:
            return name
        return self.rule(f"{name}_ne", '"\\"" (' + " | ".join(f"{c} {sub}" for c in _JCHARS) + ref + ")")

    def _string_rule(self, allowed: frozenset[int], hi: int | None = None) -> str:
        """A JSON string; with references allowed, `$K.path` may be interpolated ("$1.n items") —
        never followed by a digit, so "$1" then "2" cannot read as "$12".

        Strings are right-recursive rules that end inside themselves (`s ::= "\"" | c s`): with
        xgrammar 0.2.8 that keeps the token mask cache effective (~5 us a token), where `c*` or a
        bounded `c{lo,hi}` costs 20-250 ms. Length bounds (`lo`, `hi`: minLength / maxLength) are
        therefore not in the grammar; the tool's argument validation checks them and a violation
        becomes an observation for the joiner (`string_rule` adds minLength 1: a first character).
        """
        hi = self.limits.max_string_chars if hi is None else hi
        if not allowed:
            if hi is None:
                return "jstring"
            name = f"jstring_{hi}"
            if name not in self.rules:
                chars = self.text_rule(f"jchars_{hi}", _JCHARS, _lit('"'), hi)
                self.rule(name, f'"\\"" {chars}')
            return name
        # With references allowed there is one string rule per set of visible ids: a schema's
        # maxLength chain for each would multiply compile time, so only the global bound applies.
        hi = self.limits.max_string_chars
        v = self.variant(allowed)
        name = f"jstring_v{v}" if hi is None else f"jstring_v{v}_{hi}"
        if name not in self.rules:
            self.rule(f"interp_v{v}", f'"$" refid_v{v} path')
            steps = [None] if hi is None else list(range(hi + 1))  # a reference counts as one character
            for i in steps:
                at = "" if i is None else f"_{i}"
                nxt = "" if i is None else f"_{i + 1}"
                sub, tail = f"jsub_v{v}{at}", f"jtail_v{v}{at}"
                if i == hi and i is not None:
                    self.rule(sub, _lit('"'))
                    self.rule(tail, _lit('"'))
                    continue
                self.rule(sub, _then(['"\\""'], _JCHARS, f"jsub_v{v}{nxt}") + f" | interp_v{v} jtail_v{v}{nxt}")
                # after a reference no digit may follow: "$1" then "2" must not read as "$12"
                self.rule(tail, _then(['"\\""'], [r'[^"\\$0-9\0-\x1f]', "esc"], f"jsub_v{v}{nxt}"))
            self.rule(name, f'"\\"" jsub_v{v}{"" if hi is None else "_0"}')
        return name

    def variant(self, allowed: frozenset[int]) -> int:
        return self._variants.setdefault(allowed, len(self._variants))

    def arithmetic_rule(self, allowed: frozenset[int]) -> str:
        """The calculator's `expression` as a JSON string of arithmetic it evaluates: numbers,
        references `$K`, operators, parentheses and its functions, bounded (`_ARITH_DEPTH` levels of
        parentheses, and terms per level by `max_string_chars`, else `_ARITH_TERMS`). With `numbers`
        (the builder's), a number is one of them (`expression_numbers`): a model copying a worked
        example's numbers cannot."""
        v = self.variant(allowed)
        ref = self.ref_rule(allowed)  # also defines refid_v{v}, used below
        chars = self.limits.max_string_chars
        terms = _ARITH_TERMS if chars is None else max(1, min(_ARITH_TERMS, chars // 2))
        name = f"arith_v{v}"
        if name not in self.rules:
            if "anum" not in self.rules:
                fixed = sorted(set(self.numbers)) if self.numbers is not None else None
                self.rule("anum", " | ".join(_lit(n) for n in fixed) if fixed else '[0-9] digit{0,14} ("." digit{1,6})?')
                self.rule("aop", 'ws ("+" | "-" | "*" | "/" | "**" | "//" | "%") ws')
                self.rule("afn", " | ".join(_lit(f) for f in _FUNCTIONS))
            for depth in range(_ARITH_DEPTH, -1, -1):
                atoms = ["anum", '"pi"'] + ([f'"$" refid_v{v} path'] if allowed else [])
                if depth < _ARITH_DEPTH:
                    inner = f"arith_v{v}_{depth + 1}_0"
                    atoms += [f'"(" ws {inner} ws ")"', f'afn "(" ws {inner} (ws "," ws {inner})? ws ")"']
                atom = self.rule(f"aatom_v{v}_{depth}", " | ".join(atoms))
                for i in range(terms - 1, -1, -1):
                    more = f' | "-"? {atom} aop arith_v{v}_{depth}_{i + 1}' if i < terms - 1 else ""
                    self.rule(f"arith_v{v}_{depth}_{i}", f'"-"? {atom}{more}')
            self.rule(name, f"arith_v{v}_0_0")
        # a whole result as the expression, as any string argument may be
        return f'("\\"" {name} "\\""' + (f" | {ref})" if ref else ")")

    def args_rule(self, t: Tool, allowed: frozenset[int], key: str = "") -> str:
        """Rule for tool `t`'s argument object with references to `allowed` ids (`key` tells apart
        copies of one tool whose schemas differ). The calculator's expression is arithmetic
        (`arithmetic_rule`)."""
        v = self.variant(allowed)
        name = f"args_v{v}_{t.name}{key}"
        chars = self.limits.max_string_chars
        if (t.name == "calculator" and list(t.parameters.get("properties", {})) == ["expression"]
                and (chars is None or chars >= 32)):  # tighter bounds: a plain capped string
            return self.rule(name, f'"{{" ws "\\"expression\\"" colon {self.arithmetic_rule(allowed)} ws "}}"')
        if name not in self.rules:
            self.rules[name] = ""  # reserve (recursion)
            emitter = _SchemaEmitter(self, t.parameters, f"v{v}_{t.name}{key}", allowed)
            self.rules[name] = emitter.value(t.parameters, top=True)
        return name

    def task_rule(self, tid: int, tools: list[Tool], allowed: frozenset[int], key: str = "") -> str:
        calls = " | ".join(f'{_lit(t.name + "(")} {self.args_rule(t, allowed, key)} ")"' for t in tools)
        return self.rule(f"task_{tid}{key}", f'{_lit(f"{tid}. ")} ({calls})')

    def render(self, root: str) -> str:
        lim = self.limits
        common = _COMMON % dict(digits=lim.max_int_digits - 1, segs=lim.max_path_segments)
        tline = self.text_rule("tline", [_LINE_CHAR], _lit("\n"), lim.max_thought_chars)
        self.rule("thought", f'"Thought: " {_LINE_CHAR} {tline}')
        body = "\n".join(f"{name} ::= {expr}" for name, expr in self.rules.items())
        return f"root ::= {root}\n{common.strip()}\n{body}\n"


class _SchemaEmitter:
    """JSON schema (the subset pydantic emits for tool arguments) -> EBNF, with reference slots."""

    def __init__(self, b: _Builder, root: dict[str, Any], prefix: str, allowed: frozenset[int]) -> None:
        self.b, self.root, self.prefix, self.allowed = b, root, prefix, allowed
        self.ref = b.ref_rule(allowed)

    def value(self, node: dict[str, Any] | bool, top: bool = False) -> str:
        expr = self._typed(node if isinstance(node, dict) else {})
        if self.ref and not top:
            return f"({expr} | {self.ref})"
        return expr

    def _typed(self, node: dict[str, Any]) -> str:
        if "$ref" in node:
            return self._def(node["$ref"])
        if "const" in node:
            return _json_lit(node["const"])
        if "enum" in node:
            return "(" + " | ".join(_json_lit(v) for v in node["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in node:
                return "(" + " | ".join(self._typed(n) for n in node[key]) + ")"
        if "allOf" in node and len(node["allOf"]) == 1:
            return self._typed(node["allOf"][0])
        kind = node.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self._typed({**node, "type": k}) for k in kind) + ")"
        if kind == "string":
            hi = node.get("maxLength")
            hi = int(hi) if isinstance(hi, int) and hi <= 64 else None
            lo = node.get("minLength", 0)
            if "pattern" in node or "format" in node or (isinstance(lo, int) and lo > 1):
                log.debug("string pattern/format/minLength > 1 is checked when the tool runs, not by the grammar")
            return self.b.string_rule(self.allowed, hi, nonempty=isinstance(lo, int) and lo >= 1)
        if kind == "integer":
            return self._integer(node)
        if kind == "number":
            return "jnumber"
        if kind == "boolean":
            return "jbool"
        if kind == "null":
            return '"null"'
        if kind == "array":
            return self._array(node)
        if kind == "object" or "properties" in node:
            return self._object(node)
        if node and not set(node) <= {"description", "default", "examples", "title"}:
            log.debug("schema %s is not constrained by the grammar beyond 'any JSON value'", node)
        return self._any()

    def _integer(self, node: dict[str, Any]) -> str:
        lo = node.get("minimum", node.get("exclusiveMinimum", float("-inf")) + 1)
        hi = node.get("maximum", node.get("exclusiveMaximum", float("inf")) - 1)
        if lo != float("-inf") and hi != float("inf") and hi - lo <= 64:
            return "(" + " | ".join(_lit(str(i)) for i in range(int(lo), int(hi) + 1)) + ")"
        return "jnat" if lo >= 0 else "jint"

    def _array(self, node: dict[str, Any]) -> str:
        lim = self.b.limits
        if "prefixItems" in node:
            items = " sep ".join(self.value(n) for n in node["prefixItems"])
            return self.b.rule(self.b.fresh(self.prefix + "_tuple"), f'"[" ws {items} ws "]"')
        lo = int(node.get("minItems", 0))
        hi = min(int(node.get("maxItems", lim.max_array_items)), max(lim.max_array_items, lo))
        if hi == 0:
            return '("[" ws "]")'
        item = self.b.rule(self.b.fresh(self.prefix + "_item"), self.value(node.get("items", {})))
        inner = item if hi == 1 else f"{item} (sep {item}){{{max(lo - 1, 0)},{hi - 1}}}"
        inner = f"({inner})" if lo > 0 else f"({inner})?"
        return self.b.rule(self.b.fresh(self.prefix + "_array"), f'"[" ws {inner} ws "]"')

    def _object(self, node: dict[str, Any]) -> str:
        props: dict[str, Any] = node.get("properties", {})
        if not props:
            extra = node.get("additionalProperties", True)
            if extra is False:
                return '("{" ws "}")'
            val = self.value(extra if isinstance(extra, dict) else {})
            hi = self.b.limits.max_object_entries
            entry = f"jstring colon {val}"  # keys are plain strings
            return self.b.rule(self.b.fresh(self.prefix + "_map"), f'"{{" ws ({entry} (sep {entry}){{0,{hi - 1}}})? ws "}}"')
        required = set(node.get("required", []))
        names = list(props)
        kv = [f"{_lit(json.dumps(n, ensure_ascii=False))} colon {self.value(props[n])}" for n in names]
        stem = self.b.fresh(self.prefix + "_obj")
        # rest_i_first: properties i.. with no comma written yet; rest_i_after: a comma precedes each
        for i in range(len(names), -1, -1):
            for first in (True, False):
                name = f"{stem}_{i}{'f' if first else 'a'}"
                if i == len(names):
                    body = '""'
                else:
                    lead = kv[i] if first else f"sep {kv[i]}"
                    take = f"{lead} {stem}_{i + 1}a"
                    body = take if names[i] in required else f"{take} | {stem}_{i + 1}{'f' if first else 'a'}"
                self.b.rule(name, body)
        return self.b.rule(stem, f'"{{" ws {stem}_0f ws "}}"')

    def _def(self, ref: str) -> str:
        if not ref.startswith("#/$defs/"):
            raise PlanError(f"tool schema uses an unsupported $ref {ref!r} (only #/$defs/... is supported)")
        key = ref.rsplit("/", 1)[1]
        name = f"{self.prefix}_def_{''.join(c if c.isalnum() else '_' for c in key)}"
        if name not in self.b.rules:
            self.b.rules[name] = '""'  # reserve for recursive models
            self.b.rules[name] = self._typed(self.root.get("$defs", {})[key])
        return name

    def _any(self) -> str:
        name = f"{self.prefix}_any"
        if name not in self.b.rules:
            self.b.rules[name] = '""'
            hi = self.b.limits.max_array_items
            arr = f'"[" ws ({name} (sep {name}){{0,{hi - 1}}})? ws "]"'
            obj = f'"{{" ws (jstring colon {name} (sep jstring colon {name}){{0,{hi - 1}}})? ws "}}"'
            alts = [self.b.string_rule(self.allowed), "jnumber", "jbool", '"null"', arr, obj] + ([self.ref] if self.ref else [])
            self.b.rules[name] = " | ".join(alts)
        return name


def _tool_list(tools: ToolRegistry | Iterable[Tool]) -> list[Tool]:
    out = list(tools)
    if not out:
        raise PlanError("cannot build a plan grammar without tools")
    if any(t.name == "join" for t in out):
        raise PlanError("'join' is reserved by the plan language; rename that tool")
    return out


def _pinned(t: Tool, param: str, value: str) -> Tool:
    """A copy of `t` whose `param` takes only `value`."""
    pinned = copy.copy(t)
    pinned.parameters = copy.deepcopy(t.parameters)
    pinned.parameters["properties"][param]["enum"] = [value]
    return pinned


def plan_grammar(
    tools: ToolRegistry | Iterable[Tool],
    *,
    first_id: int = 1,
    known_ids: Iterable[int] | None = None,
    refs_within_plan: bool = True,
    limits: GrammarLimits = GrammarLimits(),
    cover: Sequence[str] = (),
    numbers: Sequence[str] | None = None,
) -> str:
    """The xgrammar EBNF (root rule `root`) of a plan for these tools.

    Tasks are numbered from `first_id`; task N may reference `known_ids` (default: 1..first_id-1,
    the finished tasks of earlier rounds) and, if `refs_within_plan`, the tasks first_id..N-1.
    At most `limits.max_tasks` tasks, then `N. join()`.

    `cover`: phrases of the question (`uncovered_phrases`) the plan must pass, in this order, to
    the grounded parameter of a tool that has one (`grounded_params`) before it may make any other
    call or end; a task so pinned is one lookup of the next phrase. Ignored when there are more
    phrases than tasks, or no tool grounds exactly one parameter.

    `numbers`: the numbers the calculator's expressions may write (`expression_numbers`): a small
    model copying a worked example's numbers cannot. None: any number.
    """
    tool_list = _tool_list(tools)
    known = frozenset(range(1, first_id) if known_ids is None else known_ids)
    lookups = [(t, p[0]) for t in tool_list if len(p := grounded_params(t)) == 1]
    cover = list(cover) if lookups and len(cover) < limits.max_tasks else []
    b = _Builder(limits, numbers)
    last = first_id + limits.max_tasks

    def seq(k: int) -> str:  # task k; while k - first_id < len(cover), that many phrases are covered
        return f"seq_{k}" if k - first_id >= len(cover) else f"seq_{k}_c{k - first_id}"

    for k in range(first_id, last + 1):
        join = _lit(f"{k}. join()")
        u = k - first_id
        if k == last:  # out of tasks: the plan ends, covered or not
            b.rule(seq(k), f"maybe_thought {join}")
        elif u >= len(cover):
            allowed = known | frozenset(range(first_id, k)) if refs_within_plan else known
            task = b.task_rule(k, tool_list, allowed)
            b.rule(seq(k), f'maybe_thought ({join} | {task} "\\n" {seq(k + 1)})')
        else:  # the next phrase itself, not a reference
            task = b.task_rule(k, [_pinned(t, p, cover[u]) for t, p in lookups], frozenset(), key=f"_c{u}")
            b.rule(seq(k), f'maybe_thought {task} "\\n" {seq(k + 1)}')
    return b.render(seq(first_id))


def react_grammar(
    tools: ToolRegistry | Iterable[Tool],
    *,
    step_id: int,
    known_ids: Iterable[int] | None = None,
    limits: GrammarLimits = GrammarLimits(),
    numbers: Iterable[str] | None = None,
) -> str:
    """One ReAct step: an optional thought, then either one task `step_id. tool({...})` or `Finish(answer)`
    (with `numbers`, its digits grounded as in `joiner_grammar`)."""
    tool_list = _tool_list(tools)
    known = frozenset(range(1, step_id) if known_ids is None else known_ids)
    numbers = list(numbers) if numbers is not None else None
    b = _Builder(limits, numbers)
    task = b.task_rule(step_id, tool_list, known)
    b.rule("finish", f'"Finish(" {b.answer_rule(numbers, known)}')
    return b.render(f"maybe_thought ({task} | finish)")


def joiner_grammar(
    *, allow_replan: bool = True, limits: GrammarLimits = GrammarLimits(), numbers: Iterable[str] | None = None,
    refs: Iterable[int] = (),
) -> str:
    """The joiner's output: an optional thought, then `Finish(answer)` or `Replan(reason)`. With
    `numbers` (those of the question and the results, `answer_numbers`), the answer's digits are
    grounded: only those numbers and references `$K` to `refs` (`_Builder.answer_rule`)."""
    b = _Builder(limits)
    answer = b.answer_rule(numbers, frozenset(refs))
    reason = b.answer_rule() if numbers is not None else answer
    actions = f'"Finish(" {answer}' + (f' | "Replan(" {reason}' if allow_replan else "")
    return b.render(f"maybe_thought ({actions})")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def expression_numbers(question: str, values: Iterable[Any]) -> list[str]:
    """The numbers a calculation may use: the question's and the results' (`answer_numbers`), and small
    constants (halves, percentages) only when the question has no numbers of its own (a question's
    arithmetic is over its numbers; a model given more wanders onto them)."""
    own = answer_numbers(question, [])
    return answer_numbers(question, values) + ([] if own else _CONSTANTS)


def answer_numbers(question: str, values: Iterable[Any], observations: Iterable[str] = (), cap: int = 256) -> list[str]:
    """The numbers an answer may write out: the question's, each numeric result's, and those written
    in the observations (at most `cap`, in that order of preference)."""
    found = _NUMBER.findall(question)
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            found.append(json.dumps(v))
    for text in observations:
        found.extend(_NUMBER.findall(text))
    return list(dict.fromkeys(found))[:cap]
