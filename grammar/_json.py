"""JSON-schema → EBNF text with the layout agentrt enforces: compact separators, no free whitespace
(or a bounded amount), and optional caps on string and number length.

XGrammar converts the schema; we then rewrite its shared `basic_*` rules, which (in 0.2.8) keep
`", "` separators inside untyped values and admit unbounded strings and digit runs.
"""

from __future__ import annotations

import functools
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
    max_array_items: int | None = None,
    max_object_entries: int | None = None,
    max_untyped_depth: int | None = None,
) -> tuple[str, list[str]]:
    """EBNF text for a normalised schema, and warnings about caps that could not be applied.

    `max_whitespace=None` allows no whitespace beyond `separators`; an integer allows any
    whitespace between tokens, at most that many characters in a row. The caps bound every
    string, number, array and open object (a `minLength` / `minItems` above a cap wins);
    `max_untyped_depth` how deep arrays and objects nest inside an untyped value (`_cap_depth`).
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
        raise GrammarError(f"cannot compile the JSON schema: {first_line(e)}", param="schema") from e
    text = str(grammar)
    rules = _Rules(text)
    comma, colon = separators
    if not any_ws:  # xgrammar keeps ", " in untyped arrays/objects whatever the separators
        rules.replace("basic_array_items", f"(({_lit(comma)} basic_any))")
        rules.replace("basic_object_properties", f"(({_lit(comma)} basic_string {_lit(colon)} basic_any))")
        first = f"basic_string {_lit(colon)} basic_any"
        rules.replace("basic_object", f'(("{{" {first} basic_object_properties{{0, -1}} "}}") | ("{{" "}}"))')
    if max_string_length is not None:
        rules.string("basic_string", _STRING_CHARS, 0, max_string_length)
    for name, (item, lo, hi) in rules.length_limited_strings():  # xgrammar writes `c{lo, hi}`: slow masks
        rules.string(name, _string_chars(item), lo, _capped(lo, hi, max_string_length))
    rules.retype(_XGRAMMAR_LENGTH_CHAR, "(" + " | ".join(f"({c})" for c in _STRING_CHARS) + ")")  # 1 or 0-1 chars
    if max_number_digits is not None:
        n = max_number_digits
        rules.replace("basic_integer", f'(("0") | (basic_integer_1 [1-9] [0-9]{{0, {n - 1}}}))')
        rules.replace("basic_number_2", f'(("0") | ([1-9] [0-9]{{0, {n - 1}}}))')
        rules.replace("basic_number_3", f'("" | ("." basic_number_digits{{1, {n}}}))')
        rules.replace("basic_number_5", f'("" | ([eE] basic_number_4 basic_number_digits{{1, {min(n, 3)}}}))')
    if max_untyped_depth is not None:
        _cap_depth(rules, max_untyped_depth)
    text = rules.text()
    if max_number_digits is not None:  # typed numbers get rules of their own: cap those digits too
        n = max_number_digits
        text = text.replace("[1-9] [0-9]*", f"[1-9] [0-9]{{0, {n - 1}}}")
        text = text.replace("_digits{1, -1}", f"_digits{{1, {n}}}")
    # `x_items{lo, hi}` repeats the items after an array's first; `x_properties` the entries after an
    # object's first. A bounded repetition of these (not of characters) keeps masks fast.
    for suffix, cap in (("items", max_array_items), ("properties", max_object_entries)):
        if cap is not None:
            text = re.sub(rf"_{suffix}\{{(\d+), (-?\d+)\}}", functools.partial(_cap_repeat, suffix, cap - 1), text)
    return text, rules.missing


_UNTYPED = ("basic_any", "basic_array", "basic_object", "basic_array_items", "basic_object_properties")


def _cap_depth(rules: _Rules, depth: int) -> None:
    """Untyped values (xgrammar's shared `basic_*` rules) nest at most `depth` containers: level i's
    containers hold level i + 1 values, and the last level's containers are empty."""
    bodies = {n: rules.body(n) for n in _UNTYPED}
    if None in bodies.values():
        rules.missing.append("untyped value rules not found; max_untyped_depth is not applied")
        return

    def level(name: str, i: int) -> str:
        return name if i == 0 else name.replace("basic_", f"basic_l{i}_")  # `_items{..}` stays a suffix

    for i in range(depth + 1):
        if i == depth:  # the deepest level: scalars and empty containers only
            rules.add(level("basic_array", i), '("[" "]")')
            rules.add(level("basic_object", i), '("{" "}")')
        for name in _UNTYPED if i < depth else ("basic_any",):
            inner = i if name == "basic_any" else i + 1  # a container's values sit one level down
            names = {n: level(n, inner) for n in ("basic_any",)}
            names |= {n: level(n, i) for n in _UNTYPED if n != "basic_any"}
            body = _rename(bodies[name], names)
            (rules.replace if i == 0 else rules.add)(level(name, i), body)


def _cap_repeat(suffix: str, cap: int, m: re.Match[str]) -> str:
    lo, hi = int(m.group(1)), int(m.group(2))
    return f"_{suffix}{{{lo}, {_capped(lo, hi, cap)}}}"


# A JSON string character, as one character of the decoded string: plain, an escape, a \u escape
# outside the surrogates, or a surrogate pair's two escapes (a lone surrogate is refused). Inline: an
# escape rule of its own would leave the tokens that run past its end unresolved in the mask cache.
_HEX = "[A-Fa-f0-9]"
_STRING_CHARS = [
    '[^\\0-\\x1f\\"\\\\]', '"\\\\" ["\\\\/bfnrt]',
    f'"\\\\u" [0-9A-Ca-cE-Fe-f] {_HEX} {_HEX} {_HEX}', f'"\\\\u" [Dd] [0-7] {_HEX} {_HEX}',
    f'"\\\\u" [Dd] [89ABab] {_HEX} {_HEX} "\\\\u" [Dd] [C-Fc-f] {_HEX} {_HEX}',
]
# xgrammar's character of a string with minLength/maxLength (0.2.9; a repetition of a rule holding it,
# or the class itself for at most one character): any character but a quote, a backslash, CR and LF.
# It admits the other control characters raw (not JSON) and no escapes at all.
_XGRAMMAR_LENGTH_CHAR = r'[^\"\\\r\n]'


def _string_chars(item: str) -> list[str]:
    """The alternatives for one character of a length-bounded string whose character xgrammar wrote
    as the class `item`: JSON's string character (an escape counts as one, as `len` of the decoded
    string does) where `item` is xgrammar's generic one, else `item` as it is."""
    return _STRING_CHARS if item == _XGRAMMAR_LENGTH_CHAR else [item]


# A length bound above this stays a bounded repetition: a chain compiles in ~10 ms a character
# for a 49k vocabulary, so longer chains trade seconds of compile for the faster masks.
MAX_CHAIN = 256


def _capped(lo: int, hi: int, cap: int | None) -> int:
    """The upper bound of a `{lo, hi}` repetition (hi -1: none) under `cap` (None: no cap), never below lo."""
    if cap is None:
        return hi
    return max(lo, cap if hi < 0 else min(hi, cap))


def merge_grammars(texts: list[str]) -> tuple[str, list[str]]:
    """Several EBNF grammars (root rule `root`) as one text, and the name each one's root has there.

    Grammar i's rules become `g{i}_<name>`, except those every grammar defines alike and whose
    references are all kept alike too: those stay once under their own name and compile once (a
    capped string's chain above all, ~10 ms a character).
    """
    tables = [dict(line.split(" ::= ", 1) for line in text.splitlines() if line.strip()) for text in texts]
    first = tables[0]
    shared = {n for n, body in first.items() if n != "root" and all(t.get(n) == body for t in tables[1:])}
    while True:  # drop rules that reference a rule of their own grammar, until none does
        own = {n for n in shared if any(r in first and r not in shared for r in _EBNF_TOKEN.findall(first[n]))}
        if not own:
            break
        shared -= own
    lines = [f"{n} ::= {body}" for n, body in first.items() if n in shared]
    roots = []
    for i, table in enumerate(tables):
        names = {n: n if n in shared else f"g{i}_{n}" for n in table}
        lines += [f"{names[n]} ::= {_rename(body, names)}" for n, body in table.items() if n not in shared]
        roots.append(names["root"])
    return "\n".join(lines) + "\n", roots


# A literal, a character class, or a name (group 1): literals and classes are skipped over whole.
_EBNF_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|([A-Za-z_]\w*)')


def _rename(body: str, names: dict[str, str]) -> str:
    return _EBNF_TOKEN.sub(lambda m: names.get(m.group(0), m.group(0)), body)


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

    def length_limited_strings(self) -> list[tuple[str, tuple[str, int, int]]]:
        """Strings xgrammar bounds by repetition, `s ::= (("\\"" c{lo, hi} "\\""))` with `c` one
        character class: [(s, (class, lo, hi))], hi -1 for no upper bound."""
        found = []
        for line in self.lines:
            m = re.fullmatch(r'(\w+) ::= \(\("\\"" (\w+)\{(\d+), (-?\d+)\} "\\""\)\)', line)
            item = m and self.body(m.group(2))
            if m and item and re.fullmatch(r"\(\((\[[^\]]*\])\)\)", item):
                found.append((m.group(1), (item[2:-2], int(m.group(3)), int(m.group(4)))))
        return found

    def retype(self, cls: str, group: str) -> None:
        """Write `group` wherever the character class `cls` stands in a rule (not inside literals)."""
        for i, line in enumerate(self.lines):
            name, body = line.split(" ::= ", 1)
            self.lines[i] = f"{name} ::= " + _EBNF_TOKEN.sub(lambda m: group if m.group(0) == cls else m.group(0), body)

    def body(self, name: str) -> str | None:
        i = self.index.get(name)
        return None if i is None else self.lines[i].split(" ::= ", 1)[1]

    def string(self, name: str, chars: list[str], lo: int, hi: int | None) -> None:
        """Make `name` a JSON string of lo..hi characters (alternatives `chars`; hi None or -1: no
        bound) as a right-recursive chain, one rule per character that ends inside itself
        (`s_i ::= "\\"" | c s_i+1`): xgrammar 0.2.8 caches those rules' token masks (~10 us a
        token) where a repetition `c{lo, hi}` costs 20-50 ms a token. Bounds over MAX_CHAIN stay
        repetitions (see there)."""
        hi = None if hi is None or hi < 0 else hi
        if max(lo, hi or 0) > MAX_CHAIN:
            alts = " | ".join(f"({c})" for c in chars)
            self.replace(name, f'(("\\"" {name}_char{{{lo}, {-1 if hi is None else hi}}} "\\""))')
            self.add(f"{name}_char", f"({alts})")
            return
        last = lo if hi is None else hi
        self.replace(name, f'(("\\"" {name}_at_0))')
        for i in range(last + 1):
            nxt = f"{name}_at_{i if hi is None and i == last else i + 1}"
            alts = (['("\\"")'] if i >= lo else []) + ([f"({c} {nxt})" for c in chars] if i < last or hi is None else [])
            self.add(f"{name}_at_{i}", "(" + " | ".join(alts) + ")")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _lit(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+: ", "", msg)
