"""Tool-call envelopes: `<tool_call>{"name":...,"arguments":{...}}</tool_call>` blocks whose arguments
follow each tool's schema, built on xgrammar structural tags (free text until the tag starts under
`auto`; calls only under `required` or a named tool).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

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
                tool.parameters, strict=tool.strict, separators=self.separators, **self.schema_options
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


_NAME = r"(?:[A-Z][\w'-]*(?:\s+(?:of\s+|de\s+)?[A-Z][\w'-]*)*)"
_AND = r"(?:\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or|&)\s+)(?:(?:in|for|of|at|to|from|on)\s+)?"
_LISTED = re.compile(rf"{_NAME}(?:{_AND}{_NAME})+")
_OPENERS = {"What", "What's", "How", "Which", "Who", "Is", "Are", "Do", "Does", "Can", "Could", "Please", "Tell",
            "Give", "Find", "Get", "Show", "I", "I'm", "The", "A", "An", "And", "Or", "Compare", "Check", "List"}


def listed_names(text: str) -> list[list[str]]:
    """The groups of names a request lists together ("Paris and Rome", "in Boston, in Austin or in
    Denver"): where a call takes one of them, the others usually want calls of their own."""
    groups = []
    for m in _LISTED.finditer(text):
        members = []
        for name in re.split(_AND, m.group(0)):
            words = name.split()
            while words and words[0] in _OPENERS:
                words = words[1:]
            if words:
                members.append(" ".join(words))
        # a list has an "and"/"or" ("Riga, Latvia" is one place, "Paris and Rome" two)
        if len(members) > 1 and re.search(r"\s(?:and|or|&)\s", m.group(0)):
            groups.append(list(dict.fromkeys(members)))
    return groups


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class CallList(Matcher):
    """The matcher for a `ToolCalls` grammar, with the call-list policy on top: a call that repeats
    an earlier one of the same turn exactly (`earlier`: (name, arguments) of calls already made,
    plus each one this output completes) ends the output right after it (the chat layer drops the
    repeat), as does reaching `max_calls` calls or, between calls, nearing max_tokens (`close_by`)
    or having fewer tokens left than the longest call so far took.
    A weak model that would call the same tool over and over until max_tokens makes one call.
    `listed`: groups of names the request lists together (`listed_names`): once a call has taken
    exactly one name of a group, the list may not end between calls while another name of it is in
    no call (a weak model asked about Paris and Rome would stop after Paris; a call that takes both,
    a route from one to the other, is the whole list); the repeat, cap and budget rules still end it."""

    def __init__(self, compiled: Any, *, stop_token_ids: list[int] | None = None, max_calls: int | None = MAX_TOOL_CALLS,
                 earlier: list[tuple[str, Any]] = (), listed: list[list[str]] = ()) -> None:
        super().__init__(compiled, stop_token_ids=stop_token_ids)
        self.listed = [list(g) for g in listed]
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
        if self.ended:
            self._end_only(bitmask, index)
        elif self.listed and self.text.endswith(TOOL_CALL_END.encode()) and self._names_left():
            self._no_end(bitmask, index)

    def _names_left(self) -> bool:
        """A call took exactly one name of a listed group (it is about one of them), and some name of
        the group is in no call yet."""
        made = [json.loads(k) for k in self._made if k is not None] + [[n, a] for n, a in self.earlier]
        for group in self.listed:
            taken = [{name for name in group if any(name.lower() in v.lower() for v in _strings(args))}
                     for _, args in made]
            if any(len(t) == 1 for t in taken) and set(group) - set().union(*taken):
                return True
        return False

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
