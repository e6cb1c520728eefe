"""Bounds on grammar work before a grammar reaches the compiler: a size cap, and a check that every
rule can finish. A rule with no finite derivation (`{"properties": {"a": {"$ref": "#"}},
"required": ["a"]}`) makes xgrammar's jump-forward search grow without bound; so does a rule whose
shortest output is astronomically long (rules that double each other). Both are refused here.

The check reads the grammar as xgrammar prints it and finds each rule's shortest output with
Knuth's generalisation of Dijkstra's algorithm (Knuth 1977, "A generalization of Dijkstra's
algorithm"): a rule's length is final once it is the smallest candidate left.
"""

from __future__ import annotations

import heapq
import logging
import re
from dataclasses import dataclass, field

from agentrt.errors import GrammarError

__all__ = ["GrammarLimits", "check_grammar"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarLimits:
    """What one grammar may cost. `max_rules` / `max_chars` cap the grammar's size (compile time grows
    faster than linearly with it); `max_forced_chars` caps the shortest output any rule can produce
    (above it, the output cannot fit any context and jump-forward would build it whole)."""

    max_rules: int = 40_000
    max_chars: int = 4 << 20
    max_forced_chars: int = 1 << 20


DEFAULT_LIMITS = GrammarLimits()
_INF = float("inf")


def check_grammar(text: str, what: str, limits: GrammarLimits = DEFAULT_LIMITS, *, param: str = "grammar") -> None:
    """Raise `GrammarError` if the grammar `text` (xgrammar's printed form, root rule `root`) is too
    large, or has a rule that can never finish or only finishes after `max_forced_chars` characters."""
    if len(text) > limits.max_chars:
        raise GrammarError(f"{what} is too large: its grammar has {len(text)} characters, more than the limit "
                           f"of {limits.max_chars}; simplify it", param=param)
    try:
        rules = _parse(text)
    except _ParseError as e:  # a form this reader does not know: the compiler still has its own checks
        log.warning("grammar bound check skipped for %s: %s", what, e)
        return
    if len(rules) > limits.max_rules:
        raise GrammarError(f"{what} is too large: its grammar has {len(rules)} rules, more than the limit of "
                           f"{limits.max_rules}; simplify it", param=param)
    lengths = _shortest(rules)
    reachable = _reachable(rules, "root")
    missing = [n for n in reachable if n not in lengths]
    endless = sorted(n for n in missing if "#" not in n) or sorted({n.split("#")[0] for n in missing})
    if endless:
        raise GrammarError(
            f"{what} can never finish: {_names(endless)} no finite output. A recursive schema must let its "
            "recursion stop (a required property that refers back to its own object has no finite instance): "
            "make the recursive property optional, or allow null or an empty array there", param=param)
    longest = max(reachable, key=lambda n: lengths[n], default=None)
    if longest is not None and lengths[longest] > limits.max_forced_chars:
        raise GrammarError(f"{what} forces an output of at least {int(lengths[longest])} characters (rule "
                           f"{longest.split('#')[0]!r}), more than the limit of {limits.max_forced_chars}",
                           param=param)


def _names(rules: list[str]) -> str:
    shown = ", ".join(repr(n) for n in rules[:3]) + (f" and {len(rules) - 3} more" if len(rules) > 3 else "")
    return f"rule {shown} has" if len(rules) == 1 else f"rules {shown} have"


class _ParseError(ValueError):
    pass


@dataclass
class _Alt:
    """One alternative: `const` characters plus `mult` times each dependency's shortest output."""

    rule: str
    const: int = 0
    deps: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Rule:
    alts: list[_Alt] = field(default_factory=list)
    refs: set[str] = field(default_factory=set)  # every rule it mentions, optional ones too


_RULE_HEAD = re.compile(r"^([A-Za-z_][\w.]*) ::= ", re.M)
_NAME = re.compile(r"[A-Za-z_][\w.]*")
_REPEAT = re.compile(r"\{\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\}")
_CALL = re.compile(r"[A-Za-z_]\w*\(")
_TAG_PAIR = re.compile(r'\(\s*"(?:[^"\\]|\\.)*"\s*,\s*([A-Za-z_][\w.]*)\s*\)')


def _parse(text: str) -> dict[str, _Rule]:
    heads = list(_RULE_HEAD.finditer(text))
    rules: dict[str, _Rule] = {}
    for i, m in enumerate(heads):
        body = text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)].strip()
        _Body(m.group(1), body, rules).parse()
    return rules


class _Body:
    """Recursive descent over one rule body; groups become synthetic rules `name#k`."""

    def __init__(self, name: str, body: str, rules: dict[str, _Rule]) -> None:
        self.name, self.s, self.i, self.rules, self.groups = name, body, 0, rules, 0

    def parse(self) -> None:
        if _CALL.match(self.s):  # TagDispatch(...) (free text, tags start rules), Regex(...): may end at once
            rule = self.rules.setdefault(self.name, _Rule())
            rule.alts.append(_Alt(self.name))
            rule.refs |= set(_TAG_PAIR.findall(self.s))
            return
        self._alternatives(self.name)
        self._skip_ws()
        if self.i < len(self.s) and self.s.startswith("(=", self.i):
            self._skip_group()  # a lookahead assertion adds no output
            self._skip_ws()
        if self.i != len(self.s):
            raise _ParseError(f"rule {self.name!r}: unexpected {self.s[self.i:self.i + 20]!r}")

    def _alternatives(self, target: str) -> None:
        rule = self.rules.setdefault(target, _Rule())
        while True:
            rule.alts.append(self._sequence(target, rule))
            self._skip_ws()
            if self.i < len(self.s) and self.s[self.i] == "|":
                self.i += 1
                continue
            return

    def _sequence(self, target: str, rule: _Rule) -> _Alt:
        alt = _Alt(target)
        while True:
            self._skip_ws()
            if self.i >= len(self.s) or self.s[self.i] in "|)" or self.s.startswith("(=", self.i):
                return alt
            const, dep = self._element(rule)
            lo = self._repeat()
            if lo > 0:
                alt.const += const * lo
                if dep is not None:
                    alt.deps.append((dep, lo))

    def _element(self, rule: _Rule) -> tuple[int, str | None]:
        c = self.s[self.i]
        if c == '"':
            j = self.i + 1
            n = 0
            while j < len(self.s) and self.s[j] != '"':
                j += 2 if self.s[j] == "\\" else 1
                n += 1
            if j >= len(self.s):
                raise _ParseError(f"rule {self.name!r}: unterminated literal")
            self.i = j + 1
            return n, None
        if c == "[":
            j = self.i + 1
            while j < len(self.s) and self.s[j] != "]":
                j += 2 if self.s[j] == "\\" else 1
            if j >= len(self.s):
                raise _ParseError(f"rule {self.name!r}: unterminated character class")
            self.i = j + 1
            return 1, None
        if c == "(":
            self.i += 1
            self.groups += 1
            sub = f"{self.name}#{self.groups}"
            self._alternatives(sub)
            self._skip_ws()
            if self.i >= len(self.s) or self.s[self.i] != ")":
                raise _ParseError(f"rule {self.name!r}: unbalanced parenthesis")
            self.i += 1
            rule.refs.add(sub)
            return 0, sub
        m = _NAME.match(self.s, self.i)
        if m is None:
            raise _ParseError(f"rule {self.name!r}: unexpected {self.s[self.i:self.i + 20]!r}")
        self.i = m.end()
        rule.refs.add(m.group(0))
        return 0, m.group(0)

    def _repeat(self) -> int:
        """The minimum count of the postfix operator after an element (1 without one)."""
        if self.i < len(self.s) and self.s[self.i] in "*?+":
            self.i += 1
            return 1 if self.s[self.i - 1] == "+" else 0
        m = _REPEAT.match(self.s, self.i)
        if m is None:
            return 1
        self.i = m.end()
        return max(0, int(m.group(1)))

    def _skip_group(self) -> None:
        depth = 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "\"[":
                self._element(_Rule())
                continue
            depth += (c == "(") - (c == ")")
            self.i += 1
            if depth == 0:
                return
        raise _ParseError(f"rule {self.name!r}: unbalanced lookahead")

    def _skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1


def _shortest(rules: dict[str, _Rule]) -> dict[str, float]:
    """Each rule's shortest output in characters (rules with none are absent): Knuth's algorithm."""
    alts = [a for r in rules.values() for a in r.alts]
    waiting: dict[str, list[tuple[int, int]]] = {}  # dependency -> (alt index, multiplicity)
    left = [len(a.deps) for a in alts]
    acc = [a.const for a in alts]
    heap: list[tuple[int, str]] = []
    for k, a in enumerate(alts):
        for dep, mult in a.deps:
            waiting.setdefault(dep, []).append((k, mult))
        if not a.deps:
            heap.append((a.const, a.rule))
    heapq.heapify(heap)
    done: dict[str, float] = {}
    cap = 1 << 62  # far above any limit; keeps the sums small
    while heap:
        n, name = heapq.heappop(heap)
        if name in done:
            continue
        done[name] = n
        for k, mult in waiting.get(name, ()):
            left[k] -= 1
            acc[k] = min(cap, acc[k] + mult * n)
            if left[k] == 0 and alts[k].rule not in done:
                heapq.heappush(heap, (acc[k], alts[k].rule))
    return done


def _reachable(rules: dict[str, _Rule], root: str) -> list[str]:
    seen, stack = {root}, [root]
    while stack:
        rule = rules.get(stack.pop())
        for ref in rule.refs if rule else ():
            if ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return list(seen)
