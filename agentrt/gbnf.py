"""Our EBNF (xgrammar's) as GBNF (llama.cpp's), for servers that take grammars only in GBNF."""

from __future__ import annotations

import re

from agentrt.errors import GrammarError

__all__ = ["ebnf_to_gbnf"]

# --- our EBNF (xgrammar's) as GBNF (llama.cpp's) ---------------------------------------------------------
# GBNF, after ggml-org/llama.cpp grammars/README.md and src/llama-grammar.cpp (its parser): rule names are
# letters, digits and '-' only; literals and classes take \x, \u, \U, \t, \r, \n, \\, \" (\[ \] in classes);
# repetition {m}, {m,}, {m,n}; no lookahead. xgrammar's EBNF (docs/tutorials/ebnf_guided_generation.md) adds
# '_' and '.' in names, more escapes and `(= ...)` lookahead assertions (hints after a rule's body, dropped
# here: what follows in the grammar decides the same strings).

_TOKEN = re.compile(r"""
    (?P<ws>\s+) | (?P<comment>\#[^\n]*) | (?P<define>::=) | (?P<lookahead>\(=) |
    (?P<name>[A-Za-z_][A-Za-z0-9_.\-]*) | (?P<string>"(?:[^"\\]|\\.)*") | (?P<cls>\[(?:[^\]\\]|\\.)*\]) |
    (?P<repeat>\{\s*\d+\s*(?:,\s*-?\d*\s*)?\}) | (?P<op>[()|*+?])
""", re.VERBOSE | re.DOTALL)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "a": "\a", "e": "\x1b",
                   "0": "\0"}


def _unescape(body: str) -> list[tuple[str, bool]]:
    """Characters of a literal's or class's body: (char, was_escaped)."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append((c, False))
            i += 1
            continue
        e = body[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        if width:
            out.append((chr(int(body[i + 2:i + 2 + width], 16)), True))
            i += 2 + width
        else:
            out.append((_SIMPLE_ESCAPES.get(e, e), True))
            i += 2
    return out


_GBNF_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _gbnf_char(c: str, special: str) -> str:
    """One character for a GBNF literal or class; `special`: what must be escaped there."""
    if c in _GBNF_NAMED:
        return _GBNF_NAMED[c]
    if c in special or c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02X}"
    return c


def ebnf_to_gbnf(ebnf: str) -> str:
    """Our grammars (xgrammar's EBNF, root rule `root`) as llama.cpp's GBNF, which llama.cpp's server
    and llama-cpp-python's `grammar` field take. Raises GrammarError on text that is not that EBNF."""
    import xgrammar as xgr

    try:
        xgr.Grammar.from_ebnf(ebnf)  # refuse what xgrammar itself refuses, with its message
    except Exception as exc:  # noqa: BLE001 - xgrammar raises plain RuntimeError/ValueError
        raise GrammarError(f"not a valid EBNF grammar: {exc}", param="grammar") from None
    tokens = []
    pos = 0
    while pos < len(ebnf):
        m = _TOKEN.match(ebnf, pos)
        if m is None:
            raise GrammarError(f"cannot translate the grammar to GBNF at {ebnf[pos:pos + 40]!r}", param="grammar")
        pos = m.end()
        if m.lastgroup not in ("ws", "comment"):
            tokens.append((m.lastgroup, m.group()))
    names: dict[str, str] = {}
    used: set[str] = set()

    def rename(name: str) -> str:
        if name not in names:
            base = re.sub(r"[^A-Za-z0-9-]", "-", name)
            new, n = base, 1
            while new in used:
                n += 1
                new = f"{base}-{n}"
            names[name], _ = new, used.add(new)
        return names[name]

    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "name" and i + 1 < len(tokens) and tokens[i + 1][0] == "define":
            out.append(("\n" if out else "") + rename(text) + " ::=")
            i += 2
            continue
        if kind == "lookahead":  # skip to its closing parenthesis
            depth, i = 1, i + 1
            while depth:
                k, t = tokens[i]
                depth += 1 if k == "lookahead" or (k == "op" and t == "(") else -1 if k == "op" and t == ")" else 0
                i += 1
            continue
        if kind == "name":
            out.append(rename(text))
        elif kind == "string":
            out.append('"' + "".join(_gbnf_char(c, '"') for c, _ in _unescape(text[1:-1])) + '"')
        elif kind == "cls":
            body = text[1:-1]
            negate = body.startswith("^")
            items = _unescape(body[1:] if negate else body)
            parts = []
            for j, (c, escaped) in enumerate(items):
                if c == "-" and not escaped and 0 < j < len(items) - 1:
                    parts.append("-")  # a range
                else:
                    parts.append(_gbnf_char(c, "]-^["))
            out.append("[" + ("^" if negate else "") + "".join(parts) + "]")
        elif kind == "repeat":  # xgrammar prints an unbounded {m,} as {m, -1}
            out.append(re.sub(r"\s+", "", text).replace(",-1}", ",}"))
        else:
            out.append(text)
        i += 1
    return " ".join(out).replace(" \n", "\n") + "\n"
