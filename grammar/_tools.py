"""Tool-call envelopes: `<tool_call>{"name":...,"arguments":{...}}</tool_call>` blocks whose arguments
follow each tool's schema, built on xgrammar structural tags (free text until the tag starts under
`auto`; calls only under `required` or a named tool).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import numpy as np
import torch
import xgrammar as xgr
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentrt.errors import GrammarError
from agentrt.grammar._constraints import Constraint, JsonSchema, ebnf_literal
from agentrt.grammar._json import first_line, merge_grammars
from agentrt.grammar._matcher import Matcher

__all__ = [
    "ToolSpec",
    "ToolCalls",
    "listed_names",
    "named_choices",
    "format_pattern",
    "with_stated_formats",
    "TOOL_ARGUMENT_CAPS",
    "render_tool_call",
    "parse_tool_calls",
    "TOOL_CALL_BEGIN",
    "TOOL_CALL_END",
    "CallList",
    "call_key",
    "MAX_TOOL_CALLS",
]

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_CALL_SEPARATOR = "\n"


class ToolSpec(BaseModel):
    """One callable tool as the model sees it (OpenAI function shape)."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @classmethod
    def parse(cls, tool: Any) -> ToolSpec:
        """Accept `{"name", "description", "parameters"}`, `{"type": "function", "function": {...}}`,
        a ToolSpec, or anything with a `to_openai()` / `openai_schema()` method returning one of those."""
        if isinstance(tool, ToolSpec):
            return tool
        for attr in ("to_openai", "openai_schema"):
            if callable(getattr(tool, attr, None)):
                tool = getattr(tool, attr)()
                break
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
        ):
            tool = tool["function"]
        try:
            return cls.model_validate(tool)
        except ValidationError as e:
            raise GrammarError(
                f"invalid tool definition: {e.errors()[0]['msg']} in {tool!r:.120}", param="tools"
            ) from e


ToolChoice = Literal["auto", "required", "none"] | dict[str, Any]

# Caps on tool arguments unless a caller passes its own (None turns one off), so a weak model that
# loops inside a value moves on (smollm2-135m on BFCL looped inside strings until max_tokens). They
# hold every answer of BFCL's simple_python, multiple and live_simple but one 224-character URL
# (otherwise at most 109 characters, 12 digits, 12 items, 8 entries). The string cap adds ~0.5-1 s
# to the first compile of a tool set (49k vocabulary); tools that take long text (file contents)
# need it off. Near max_tokens, `Matcher.close_by` closes whatever is still open.
TOOL_ARGUMENT_CAPS: dict[str, int | None] = {
    "max_string_length": 128,
    "max_number_digits": 16,
    "max_array_items": 16,
    "max_object_entries": 16,
    # untyped values (`{}`, a free-form object or array): containers nest at most this deep, else a
    # weak model opens `{"a": {"b": {...` until max_tokens (3 of 60 MaskBench schemas did)
    "max_untyped_depth": 4,
}


# a description that states its value's layout: "in the format of 'City, State'" (alternatives joined by
# "or"), or unquoted "format of City, State." / "Format: yyyy-mm-dd."
_FORMAT_WORDS = r"\b(?i:format(?:ted)?(?: it)?(?: of| is| as|:| -)?)\s+"
_QUOTED_LAYOUTS = re.compile(_FORMAT_WORDS + r"""((?:['"`‘“][^'"`’”]{2,60}['"`’”](?:,?\s+or\s+)?)+)""", re.IGNORECASE)
_DATE_RUN = r"(?:Y{2,4}|y{2,4}|M{2,3}|m{2}|D{2}|d{2}|H{2}|h{2}|S{2}|s{2})"
_DATE_LAYOUT = rf"{_DATE_RUN}(?:(?:[-/:. T]|, )(?:{_DATE_RUN}))+"
_BARE_LAYOUT = re.compile(_FORMAT_WORDS + rf"({_DATE_LAYOUT}|[A-Za-z]+(?: \([a-z]+\))?(?:, (?!e\.g)[A-Za-z]+(?: \([a-z]+\))?)+)\b")
_PIECE = r'[^,"\\\x00-\x1f]+'  # one comma-separated part of a value, no JSON escapes needed


def _layout_pattern(layout: str) -> str | None:
    layout = layout.strip()
    if re.fullmatch(_DATE_LAYOUT, layout):
        out = []
        for run in re.finditer(r"([YyMmDdHhSs])\1*|.", layout):
            text = run.group(0)
            if text[0] in "Yy":
                out.append(r"\d{4}")
            elif text[0].isalpha():
                out.append(rf"\d{{{len(text)}}}" if len(text) <= 2 else rf"[A-Za-z]{{{len(text)}}}")
            else:
                out.append(re.escape(text) if text == "." else text)
        return "".join(out)
    parts = [p for p in layout.split(",") if p.strip()]
    return rf"{_PIECE}(, {_PIECE}){{{len(parts) - 1}}}" if len(parts) > 1 else None


def format_pattern(description: str) -> str | None:
    """A regular expression for a string parameter whose description states its layout, else None: a
    date or time layout (`YYYY-MM-DD`, `dd/mm/yyyy HH:MM`) as its digits and separators, a layout of
    comma-separated parts (`City, State (abbr)`) as that many parts; a layout this cannot read
    (`First Last`, `XX123`), also as one of alternatives, leaves the value free. A small model writes
    the city alone where the layout asks for `Riga, Latvia` (BFCL live_simple: 16 of 40 values)."""
    m = _QUOTED_LAYOUTS.search(description or "")
    layouts = re.findall(r"""['"`‘“]([^'"`’”]{2,60})['"`’”]""", m.group(1)) if m else []
    if not layouts and (m := _BARE_LAYOUT.search(description or "")):
        layouts = [m.group(1)]
    patterns = [_layout_pattern(layout) for layout in layouts]
    if not patterns or None in patterns:
        return None
    return "^" + (patterns[0] if len(patterns) == 1 else "(?:" + "|".join(dict.fromkeys(patterns)) + ")") + "$"


def with_stated_formats(parameters: dict[str, Any]) -> dict[str, Any]:
    """`parameters` with each string property whose description states a format (`format_pattern`)
    given that pattern, unless it has a pattern, enum, const or format already (a copy; unchanged when
    none does)."""
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(props, dict):
        return parameters
    changed = {}
    for name, prop in props.items():
        if (isinstance(prop, dict) and prop.get("type") == "string"
                and not {"pattern", "enum", "const", "format"} & prop.keys()
                and (pattern := format_pattern(prop.get("description", ""))) is not None):
            changed[name] = {**prop, "pattern": pattern}
    return {**parameters, "properties": {**props, **changed}} if changed else parameters


class ToolCalls(Constraint):
    """Free text and/or tool calls in agentrt's tool-call format.

    `choice="auto"`: text, with calls constrained once `<tool_call>` starts; `"required"`: one or
    more calls and nothing else; `{"name": f}` (or OpenAI's `{"type": "function", "function":
    {"name": f}}`): one call to `f`; `"none"`: text that never opens a call. `parallel=False`
    allows at most one call. `CallList` (the matcher to decode it with) ends a list that repeats
    itself, reaches its call cap or nears max_tokens. Schema options (`JsonSchema`'s) apply to every tool's arguments; the
    caps default to `TOOL_ARGUMENT_CAPS` (`max_string_length=None` etc. turns one off).
    """

    def __init__(
        self,
        tools: list[Any],
        choice: ToolChoice = "auto",
        *,
        parallel: bool = True,
        separators: tuple[str, str] = (",", ":"),
        **schema_options: Any,
    ) -> None:
        self.tools = [ToolSpec.parse(t) for t in tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise GrammarError(f"duplicate tool names in {names}", param="tools")
        self.choice, self.named = _choice_name(choice, names)
        if self.choice == "required" and not self.tools:
            raise GrammarError("tool_choice 'required' needs at least one tool", param="tool_choice")
        self.parallel = parallel
        self.separators = (separators[0], separators[1])
        self.schema_options = {**TOOL_ARGUMENT_CAPS, **schema_options}

    def _identity(self) -> Any:
        return [
            [t.model_dump() for t in self.tools],
            self.choice,
            self.named,
            self.parallel,
            self.separators,
            sorted(self.schema_options.items()),
        ]

    def structural_tag(self) -> tuple[dict[str, Any], list[str]]:
        """The xgrammar structural tag (as a dict) and warnings about the tools' schemas."""
        if self.choice == "none" or not self.tools:
            return {
                "type": "structural_tag",
                "format": {"type": "any_text", "excludes": [TOOL_CALL_BEGIN]},
            }, []
        warnings: list[str] = []
        heads, texts = [], []
        for tool in self.tools:
            if self.named is not None and tool.name != self.named:
                continue
            schema = JsonSchema(
                with_stated_formats(tool.parameters), strict=tool.strict, separators=self.separators, **self.schema_options
            )
            try:
                text, ws = schema.ebnf()
            except GrammarError as e:
                raise GrammarError(f"tool {tool.name!r}: {e}", param="tools") from e
            warnings += [f"tool {tool.name!r}: {w}" for w in ws]
            heads.append(_envelope(tool.name, self.separators)[0].removeprefix(TOOL_CALL_BEGIN))
            texts.append(text)
        # One tag for every tool: their grammars merged, so rules they share compile once.
        rules, roots = merge_grammars(texts)
        calls = " | ".join(f"({ebnf_literal(head)} {root})" for head, root in zip(heads, roots))
        body = f'root ::= ({calls}) "}}"\n{rules}'
        tags = [{"type": "tag", "begin": TOOL_CALL_BEGIN, "content": {"type": "grammar", "grammar": body},
                 "end": TOOL_CALL_END}]
        if self.choice == "auto":
            fmt = {
                "type": "triggered_tags",
                "triggers": [TOOL_CALL_BEGIN],
                "tags": tags,
                "at_least_one": False,
                "stop_after_first": not self.parallel or self.named is not None,
            }
        else:
            fmt = {
                "type": "tags_with_separator",
                "tags": tags,
                "separator": _CALL_SEPARATOR,
                "at_least_one": True,
                "stop_after_first": not self.parallel or self.named is not None,
            }
        return {"type": "structural_tag", "format": fmt}, warnings

    def build(self) -> tuple[xgr.Grammar, list[str]]:
        tag, warnings = self.structural_tag()
        try:
            return xgr.Grammar.from_structural_tag(tag), warnings
        except (RuntimeError, ValueError) as e:
            raise GrammarError(
                f"cannot compile the tool-call grammar: {first_line(e)}", param="tools"
            ) from e


MAX_TOOL_CALLS = 8  # calls one turn may make unless a request asks for another cap


def call_key(name: str, arguments: Any) -> str | None:
    """What makes two calls the same call: the name and the arguments as parsed JSON (key order
    ignored); None when `arguments` (a dict or its JSON text) is not a JSON object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps([name, arguments], sort_keys=True, ensure_ascii=False)


_OPENERS = {"What", "What's", "How", "Which", "Who", "Is", "Are", "Do", "Does", "Can", "Could", "Please", "Tell",
            "Give", "Find", "Get", "Show", "I", "I'm", "The", "A", "An", "And", "Or", "Compare", "Check", "List"}
_NAME = r"[A-Z](?:[\w-]|['.](?=\w))*(?:\s+(?:of\s+|de\s+|la\s+)?[A-Z](?:[\w-]|['.](?=\w))*)*"
_NOT_OPENER = "(?!(?:" + "|".join(re.escape(w) for w in sorted(_OPENERS)) + r")\b)"
_NUMBER = r"(?<![\w.,])\$?(?P<number>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\w%])"
# a name, or names joined by commas: one qualified place ("Riga, Latvia") unless an and/or goes on to
# another name ("Berlin, Lima and Oslo": three)
_ITEM = re.compile(rf"(?P<names>{_NAME}(?:,\s+{_NOT_OPENER}{_NAME})*)"
                   rf"(?P<more>(?=,?\s+(?:and|or)\s+(?:(?:in|for|of|at|to|from|on)\s+)?[A-Z]))?|{_NUMBER}")
# what divides a request into parts: commas, semicolons, sentence ends, and/or/&, "also", "as well as"
_PART = re.compile(r"[,;?!]|\.(?=\s|$)|\s(?:and|or|&|also|as well as|plus|then)\s", re.IGNORECASE)
_SENTENCE_START = re.compile(r"(?:^|[.?!:;]\s+|\n)$")


def listed_names(text: str) -> list[list[str]]:
    """The parts of a request that name things (names or numbers), each part's names: "the weather in
    Paris and in Rome" has the parts [Paris], [Rome]; "add 3 and 4, and also add 10 and 20" [3], [4],
    [10], [20]. Names joined by a comma are one qualified name ("Riga, Latvia") unless the run goes on
    with and/or to another name ("Berlin, Lima and Oslo"); a sentence's opening word is no name unless
    it is in capitals (a ticker) or more words of the name follow. Each part usually wants a call that
    takes one of its names (`CallList(listed=)`)."""
    items: list[tuple[int, int, str]] = []
    for m in _ITEM.finditer(text):
        if m.group("number"):
            items.append((m.start(), m.end(), m.group("number").replace(",", "")))
            continue
        at = m.start()
        runs = re.split(r",\s+", m.group("names")) if m.group("more") is not None else [m.group("names")]
        for run in runs:
            at = text.index(run, at)
            words = run.rstrip(".").split()
            while words and words[0] in _OPENERS:
                words = words[1:]
            first = len(words) == len(run.rstrip(".").split())  # nothing was dropped: the name starts the run
            if words and first and len(words) == 1 and _SENTENCE_START.search(text[:at]) and not words[0].isupper():
                words = []  # a sentence's first word is capitalised anyway
            if words:
                items.append((at, at + len(run), " ".join(words)))
            at += len(run)
    parts: list[list[str]] = []
    pos = None
    for start, end, item in items:
        if pos is None or _PART.search(text, pos, start):
            parts.append([])
        parts[-1].append(item)
        pos = end
    return parts


def named_choices(tools: list[Any], request: str) -> dict[str, dict[str, list[str]]]:
    """{tool: {parameter: values}}: of each string enum's values, those the request names as words, where
    it names some but not all ("in fahrenheit": the unit is "fahrenheit", not the model's habit "celsius")."""
    text = request.lower()
    out: dict[str, dict[str, list[str]]] = {}
    for tool in tools:
        spec = ToolSpec.parse(tool)
        for name, prop in ((spec.parameters or {}).get("properties") or {}).items():
            values = prop.get("enum") if isinstance(prop, dict) else None
            if not values or not all(isinstance(v, str) and v for v in values):
                continue
            said = [v for v in values if re.search(rf"(?<!\w){re.escape(v.lower())}(?!\w)", text)]
            if said and len(said) < len(values):
                out.setdefault(spec.name, {})[name] = said
    return out


def _values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _values(v)]
    if isinstance(value, list):
        return [s for v in value for s in _values(v)]
    return [value]


def _takes(args: Any, item: str) -> bool:
    """Whether a call's arguments take `item` (a name or a number of the request)."""
    values = _values(args)
    if re.fullmatch(r"-?[\d.]+", item):
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == float(item) for v in values):
            return True
        return any(isinstance(v, str) and re.search(rf"(?<![\d.]){re.escape(item)}(?![\d])", v) for v in values)
    head = item.split(",")[0].strip().lower()
    return any(isinstance(v, str) and v.strip() and (head in v.lower() or v.strip().lower() in item.lower())
               for v in values)


_ROWS: dict[tuple, torch.Tensor] = {}  # (vocab id, words, what) -> packed row


def _rows(vocab: list[bytes], words: int, what: tuple, test) -> torch.Tensor:
    """One packed bitmask row of the tokens whose lower-cased text passes `test`, cached under `what`."""
    key = (id(vocab), words, what)
    if key not in _ROWS:
        if len(_ROWS) > 4096:
            _ROWS.clear()
        bits = np.zeros(words * 32, dtype=np.uint64)
        for i, piece in enumerate(vocab):
            t = piece.decode("utf-8", "ignore").lower() if piece else ""
            if t and test(t):
                bits[i] = 1
        packed = (bits.reshape(words, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
        _ROWS[key] = torch.from_numpy(packed.astype(np.uint32).view(np.int32))
    return _ROWS[key]


def _starts_row(vocab: list[bytes], words: int, typed: str, items: tuple[str, ...], kind: str) -> torch.Tensor:
    """The tokens that, after `typed` (a value's text so far), go on writing one of `items` (lower case):
    a string's item may be followed by its closing quote and more, a number's by no further digit."""
    end = '"' if kind == "string" else ""

    def writes(t: str, item: str) -> bool:
        if item.startswith(t):
            return True
        if not t.startswith(item + end):
            return False
        rest = t[len(item + end):]
        return kind == "string" or not rest or rest[0] not in "0123456789."

    return _rows(vocab, words, ("writes", typed, items, kind), lambda t: any(writes(typed + t, i) for i in items))


def _text_row(vocab: list[bytes], words: int, char: str) -> torch.Tensor:
    """The tokens whose text holds `char`."""
    return _rows(vocab, words, ("has", char), lambda t: char in t)


_OPEN_VALUE = re.compile(rb'"((?:[^"\\]|\\.)*)": ("?)((?:[^"\\]|\\.)*)$')
_BEGUN = 3  # characters of a value that show it copies a name of the request ("g" may begin anything)
_NUMBER_ITEM = re.compile(r"-?[\d.]+")


class CallList(Matcher):
    """The matcher for a `ToolCalls` grammar, with the call-list policy on top: a call that repeats
    an earlier one of the same turn exactly (`earlier`: (name, arguments) of calls already made,
    plus each one this output completes) ends the output right after it (the chat layer drops the
    repeat), as does reaching `max_calls` calls or, between calls, nearing max_tokens (`close_by`)
    or having fewer tokens left than the longest call so far took.
    A weak model that would call the same tool over and over until max_tokens makes one call.
    `listed`: the request's parts and their names and numbers (`listed_names`): once a call took a
    name of one part, the list may not end between calls while another part is in no call and fewer
    calls than parts were made (a weak model asked about Paris and Rome would stop after Paris; a call
    that takes both, a route from one to the other, is the whole list); the repeat, cap and budget
    rules still end it. Values copy the request (`_ground`), and `named` ({tool: {parameter: values}},
    `named_choices`) narrows an enum to the values the request names."""

    def __init__(self, compiled: Any, *, stop_token_ids: list[int] | None = None, max_calls: int | None = MAX_TOOL_CALLS,
                 earlier: list[tuple[str, Any]] = (), listed: list[list[str]] = (),
                 named: dict[str, dict[str, list[str]]] | None = None) -> None:
        super().__init__(compiled, stop_token_ids=stop_token_ids)
        self.listed = [list(g) for g in listed]
        self.named = named or {}
        self.max_calls = max_calls
        self.earlier = [(name, args) for name, args in earlier]
        self._earlier = {call_key(name, args) for name, args in self.earlier}
        self._made: list[str | None] = []  # the key of each new call, in order
        self.calls = 0  # new calls completed (repeats not counted)
        self.repeats = 0
        self._history: list[tuple[int, int, bool, int, int]] = []  # per accepted token: the state before it
        self.closed = False
        self.longest = 0  # tokens the longest call took
        self._call_from = 0  # num_accepted where the open call began

    @property
    def ended(self) -> bool:
        """True once the list may not go on: a repeat, the call cap, or the budget."""
        if self.closed:
            return True
        if self.calls + self.repeats == 0 or self.max_tokens is None:
            return False
        return self.near_budget or self.max_tokens - self.num_accepted <= self.longest

    def _steer(self, bitmask, index: int) -> None:
        super()._steer(bitmask, index)
        if self.near_budget and self.in_string:
            # a string whose stated format wants more comma-separated parts cannot close yet: a comma first
            words = bitmask.shape[-1]
            if not bool((bitmask[index] & _text_row(self._vocab, words, '"')).any()):
                self._keep(bitmask, index, _text_row(self._vocab, words, ","))
        if self.ended:
            self._end_only(bitmask, index)
        elif self.listed or self.named:
            going_on = bool(self.listed) and self._parts_left()
            if going_on and self.text.endswith(TOOL_CALL_END.encode()):
                self._no_end(bitmask, index)
            else:
                self._ground(bitmask, index, going_on)

    def _taken(self) -> tuple[list[bool], list[Any]]:
        made = [json.loads(k)[1] for k in self._made if k is not None] + [a for _, a in self.earlier]
        return [any(_takes(args, item) for args in made for item in part) for part in self.listed], made

    def _parts_left(self) -> bool:
        """Some call took a name of one listed part, another part's names are in no call, and fewer calls
        were made than the request has parts."""
        taken, made = self._taken()
        return len(made) < len(self.listed) and any(taken) and not all(taken)

    def _open_value(self) -> tuple[str, str, str] | None:
        """(key, "string" | "number", text so far) of the argument value an open call is writing, else None."""
        start = self.text.rfind(TOOL_CALL_BEGIN.encode())
        body = bytes(self.text[start:]) if start >= 0 else b""
        at = body.find(b'"arguments": ')
        if at < 0 or TOOL_CALL_END.encode() in body:
            return None
        m = _OPEN_VALUE.search(body, at + len(b'"arguments": '))
        if m is None:
            return None
        typed = m.group(3).decode("utf-8", "ignore")
        if m.group(2) and self.in_string:
            return m.group(1).decode("utf-8", "ignore"), "string", typed.lower()
        if not m.group(2) and not self.in_string and re.fullmatch(r"-?[\d.]*", typed):
            return m.group(1).decode("utf-8", "ignore"), "number", typed
        return None

    def _ground(self, bitmask, index: int, going_on: bool) -> None:
        """Argument values copy what the request writes. A value that has begun as one of the request's
        names or numbers (case aside) goes on to its end: "Mariposa, CA" not "Maraposi", 200000 for
        "$200,000" not 200. In a call the list went on for (`going_on`), an argument whose key took a
        name of the request in an earlier call writes a name no call took yet, and no other value starts
        as a taken name where that is no way to start a free one (a weak model asked about Paris and
        Rome repeats Paris, or writes Moscow)."""
        value = self._open_value()
        if value is None:
            return
        key, kind, typed = value
        tool = re.match(rb'<tool_call>\{"name": "([^"]*)"', bytes(self.text[self.text.rfind(TOOL_CALL_BEGIN.encode()):]))
        choices = self.named.get(tool.group(1).decode("utf-8", "ignore"), {}).get(key) if tool else None
        if kind == "string" and choices:  # of the values an enum allows, the ones the request names
            self._keep(bitmask, index, _starts_row(self._vocab, bitmask.shape[-1], typed,
                                                   tuple(sorted(c.lower() for c in choices)), kind))
            return
        taken, made = self._taken()
        items = [(item, t) for part, t in zip(self.listed, taken) for item in part
                 if bool(_NUMBER_ITEM.fullmatch(item)) == (kind == "number")]
        names = {i.lower() for i, _ in items}
        words = bitmask.shape[-1]
        row = None
        if going_on:
            start = self.text.rfind(TOOL_CALL_BEGIN.encode())
            body = bytes(self.text[start:]).decode("utf-8", "ignore").lower()
            free = tuple(sorted({i.lower() for i, t in items if not t}
                                - {n for n in names if re.search(rf'": "?{re.escape(n)}"?[,}}]', body)}))
            used = tuple(sorted({i.lower() for i, t in items if t}))
            if free and any(k == key and any(_takes({k: v}, item) for part in self.listed for item in part)
                            for args in made if isinstance(args, dict) for k, v in args.items()):
                row = _starts_row(self._vocab, words, typed, free, kind)
            elif free and used and not typed:
                row = ~(_starts_row(self._vocab, words, "", used, kind) & ~_starts_row(self._vocab, words, "", free, kind))
        if row is None and len(typed) >= _BEGUN and typed not in names:
            begun = tuple(sorted(n for n in names if n.startswith(typed)))
            if begun:
                row = _starts_row(self._vocab, words, typed, begun, kind)
        if row is not None:
            self._keep(bitmask, index, row)

    @staticmethod
    def _keep(bitmask, index: int, row) -> None:
        """Narrow the mask to `row`, when that leaves something allowed."""
        kept = bitmask[index] & row
        if bool(kept.any()):
            bitmask[index] = kept

    def _no_end(self, bitmask, index: int) -> None:
        """Take the stop tokens out of the mask, when something else is allowed."""
        row = bitmask[index] & ~self._stop_row(bitmask[index])
        if bool(row.any()):
            bitmask[index] = row

    def accept_token(self, token_id: int) -> bool:
        state = (self.calls, self.repeats, self.closed, self.longest, self._call_from)
        if not super().accept_token(token_id):
            return False
        self._history.append(state)
        if self.text.endswith(TOOL_CALL_END.encode()):
            self._complete_call()
        return True

    def _feed(self, piece: bytes) -> None:
        super()._feed(piece)
        if self.text.endswith(TOOL_CALL_BEGIN.encode()):  # JSON starts afresh: quotes in text before it do not count
            self.in_string = self._escaped = False
            self.depth = 0
            self._call_from = self.num_accepted - 1

    def _complete_call(self) -> None:
        self.longest = max(self.longest, self.num_accepted - self._call_from)
        start = self.text.rfind(TOOL_CALL_BEGIN.encode())
        body = bytes(self.text[start + len(TOOL_CALL_BEGIN):len(self.text) - len(TOOL_CALL_END)])
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None  # cannot come out of the grammar; counted as a new call
        key = call_key(obj.get("name", ""), obj.get("arguments", {})) if isinstance(obj, dict) else None
        if self._seen(key):
            self.repeats += 1
            self.closed = True
            return
        self._made.append(key)
        self.calls += 1
        if self.max_calls is not None and self.calls >= self.max_calls:
            self.closed = True

    def rollback(self, num_tokens: int) -> None:
        super().rollback(num_tokens)
        if num_tokens:
            self.calls, self.repeats, self.closed, self.longest, self._call_from = self._history[-num_tokens]
            del self._history[-num_tokens:], self._made[self.calls:]

    def reset(self) -> None:
        super().reset()
        self.calls = self.repeats = self.longest = self._call_from = 0
        self.closed = False
        self._history.clear()
        self._made.clear()

    def _seen(self, key: str | None) -> bool:
        return key is not None and (key in self._made or key in self._earlier)


def render_tool_call(
    name: str, arguments: dict[str, Any], *, separators: tuple[str, str] = (",", ":")
) -> str:
    """One call exactly as the `ToolCalls` grammar (default layout) lets the model write it."""
    begin, end = _envelope(name, separators)
    return begin + json.dumps(arguments, separators=separators, ensure_ascii=False) + end


_CALL_RE = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split model output into its free text and its calls `[{"name", "arguments"}]`.

    A block that is not valid JSON with a string `name` stays in the text (it cannot come out of
    the grammar, but unconstrained backends may produce it).
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        calls.append({"name": obj["name"], "arguments": obj.get("arguments") or {}})
        kept.append(text[pos : m.start()])
        pos = m.end()
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def _envelope(name: str, separators: tuple[str, str]) -> tuple[str, str]:
    comma, colon = separators
    name_json = json.dumps(name, ensure_ascii=False)
    return f'{TOOL_CALL_BEGIN}{{"name"{colon}{name_json}{comma}"arguments"{colon}', f"}}{TOOL_CALL_END}"


def _choice_name(choice: ToolChoice, names: list[str]) -> tuple[str, str | None]:
    """("auto" | "required" | "none", the one tool a named choice forces, or None)."""
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise GrammarError(
                f"tool_choice names {name!r}, which is not among the tools {names}", param="tool_choice"
            )
        return "required", name
    if choice not in ("auto", "required", "none"):
        raise GrammarError(
            f"tool_choice must be 'auto', 'required', 'none' or {{'name': ...}}, got {choice!r}",
            param="tool_choice",
        )
    return choice, None
