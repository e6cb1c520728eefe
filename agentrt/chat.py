"""Chat with tools on the local engine: prompts, constraints, and tool calls split out of the stream.

Shared by the OpenAI-compatible server, the SDK and the terminal agent. Tool calls use agentrt's
format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, decoded under the `ToolCalls`
grammar; `ToolCallStream` turns the text into content deltas and per-call name/argument deltas.
Unconstrained, a model may also answer with the calls alone as bare JSON, as Qwen2.5's chat template
teaches (`{"name": ..., "arguments": ...}`, one per line, a list of them, or in a ```json fence):
such an output is held back and read as calls when it ends.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agentrt import grammar
from agentrt.engine import template_ids
from agentrt.errors import InvalidRequestError
from agentrt.grammar import (
    MAX_TOOL_CALLS,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    CallList,
    Matcher,
    ToolCalls,
    ToolSpec,
    call_key,
    render_tool_call,
)
from agentrt.grammar._tools import named_choices

__all__ = ["ChatOptions", "ChatEvent", "ChatResult", "ToolCall", "ToolCallStream", "bare_calls", "build_prompt",
           "chat_constraint",
           "prepare_chat", "stream_chat", "turn_calls"]

# Tool calls are written `{"name": "f", "arguments": {"a": 1}}`: one fixed space after ',' and ':'
# (no free whitespace). Small models follow the layout they were trained on: on BFCL simple_python,
# smollm2-135m scored 41/60 with it against 24/60 with compact separators.
TOOL_SEPARATORS = (", ", ": ")
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_FENCE = re.compile(r"\A\s*```(?:json)?\s*|\s*```\s*\Z")
_BARE_START = ('{"name"', '[{"name"', "```json", "```\n")


def _could_be_bare_calls(text: str) -> bool:
    """Whether an output that begins with `text` may still be bare-JSON tool calls."""
    head = re.sub(r"\s+", "", text)[:8]
    return bool(head) and any(h.replace("\n", "").startswith(head) or head.startswith(h.replace("\n", ""))
                              for h in _BARE_START)


def bare_calls(text: str) -> list[tuple[str, Any]] | None:
    """(name, arguments) of the calls when `text` is nothing but bare-JSON calls, else None."""
    body, decoder, found = _FENCE.sub("", text.strip()).strip(), json.JSONDecoder(), []
    while body:
        try:
            value, end = decoder.raw_decode(body)
        except json.JSONDecodeError:
            return None
        for call in value if isinstance(value, list) else [value]:
            args = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
                return None
            found.append((call["name"], args))
        body = body[end:].lstrip().removeprefix(",").lstrip()
    return found or None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text, exactly as streamed
    complete: bool = False  # its closing tag arrived (False: cut short by max_tokens)


@dataclass
class ChatEvent:
    """content: text delta; call_start: (index, id, name) of a new call; call_args: (index, fragment)."""

    kind: str  # "content" | "call_start" | "call_args"
    text: str = ""
    index: int = 0
    call_id: str = ""
    name: str = ""


@dataclass
class ChatResult:
    """The end of a chat turn: what was said, which tools were called, and why it stopped."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: str  # stop | length | tool_calls | cancelled
    prompt_tokens: int
    completion_tokens: int
    incomplete: bool = False
    refused: int = 0  # calls dropped as exact repeats of earlier calls of the turn
    cached_tokens: int = 0  # prompt tokens read from the prefix cache


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Splits model text into content and tool calls as it arrives.

    Argument fragments are raw slices of the model's text, so they concatenate to exactly the
    `arguments` string of the finished call. The envelope's closing brace and a partial end tag
    are held back until they can be told apart from the arguments. A call is held back while it
    could still be an exact repeat of an earlier one (`earlier`: (name, arguments) of calls made
    before this output, and this output's own); a finished repeat is dropped (`refused` counts them).
    With `bare`, an output that is only bare-JSON calls (`bare_calls`) is held back and ends as calls.
    """

    def __init__(self, earlier: list[tuple[str, Any]] = (), *, bare: bool = False) -> None:
        self.bare = bare  # tools were offered: an output of bare-JSON calls alone is read as calls
        self.earlier = [(name, args if isinstance(args, str) else json.dumps(args, separators=TOOL_SEPARATORS,
                                                                             ensure_ascii=False))
                        for name, args in earlier]
        self.refused = 0
        self._held = False  # the open call's events wait: it may still turn out a repeat
        self.calls: list[ToolCall] = []
        self.content = ""
        self._ws = ""  # whitespace held back: shown only once more text follows it
        self._buf = ""  # outside a block: text not yet shown
        self._block: str | None = None  # inside a block: its text so far
        self._args_start = -1
        self._sent = 0  # argument characters already streamed for the open call

    def push(self, text: str) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        if self._block is None:
            self._buf += text
        else:
            self._block += text
        while True:
            if self._block is None:
                i = self._buf.find(TOOL_CALL_BEGIN)
                if i < 0:
                    if self.bare and not self.content and not self.calls and _could_be_bare_calls(self._buf):
                        return events  # may be bare-JSON calls: held until the output ends (`finish`)
                    keep = _partial_suffix(self._buf, TOOL_CALL_BEGIN)
                    self._content(events, self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return events
                self._content(events, self._buf[:i])
                self._block, self._buf, self._args_start, self._sent = self._buf[i + len(TOOL_CALL_BEGIN):], "", -1, 0
            if self._args_start < 0:
                m = _HEAD.match(self._block)
                if m is None:
                    return events
                name = json.loads(m.group(1))
                call = ToolCall(f"call_{secrets.token_hex(12)}", name, "")
                self.calls.append(call)
                self._args_start = m.end()
                self._held = True
                self._release(events)
            end = self._block.find(TOOL_CALL_END, self._args_start)
            args = self._block[self._args_start:end if end >= 0 else len(self._block)]
            if end < 0:
                safe = args.rfind("}")  # may be the envelope's closing brace: hold it back
                self._args(events, args[:safe] if safe >= 0 else args[:len(args) - _partial_suffix(args, TOOL_CALL_END)])
                return events
            args = args.rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args
            self._args(events, args)
            call = self.calls[-1]
            call.complete = True
            if self._held and call_key(call.name, call.arguments) in {call_key(n, a) for n, a in self._priors()}:
                self.calls.pop()  # an exact repeat, never shown: dropped
                self.refused += 1
                self._held = False
            self._release(events, force=True)
            rest = self._block[end + len(TOOL_CALL_END):]
            self._block, self._buf = None, rest

    def finish(self) -> list[ChatEvent]:
        """End of output: flush held-back text; an unterminated call keeps what it has."""
        events: list[ChatEvent] = []
        bare = (bare_calls(self._buf) if self.bare and self._block is None and not self.content and not self.calls
                else None)
        if bare is not None:
            self._buf = ""
            for name, args in bare:
                self._bare_call(events, name, args)
        if self._block is None:
            self._content(events, self._buf)
            if not self.content and not self.calls and self._ws:  # an output of whitespace only is its content
                self.content = self._ws
                events.append(ChatEvent("content", self._ws))
        elif self._args_start >= 0:  # cut short (length): the call keeps the arguments it has
            self._args(events, self._block[self._args_start:])
            self._release(events, force=True)
        # a block cut before its name is complete carries nothing a client could use: dropped
        self._buf, self._block, self._ws = "", None, ""
        return events

    def _bare_call(self, events: list[ChatEvent], name: str, args: dict) -> None:
        """One finished call read from bare JSON (a repeat of an earlier call is dropped)."""
        text = json.dumps(args, separators=TOOL_SEPARATORS, ensure_ascii=False)
        if call_key(name, text) in {call_key(n, a) for n, a in self.earlier + [(c.name, c.arguments) for c in self.calls]}:
            self.refused += 1
            return
        self.calls.append(ToolCall(f"call_{secrets.token_hex(12)}", name, text, complete=True))
        i = len(self.calls) - 1
        events += [ChatEvent("call_start", index=i, call_id=self.calls[i].id, name=name),
                   ChatEvent("call_args", text, index=i)]

    def _content(self, events: list[ChatEvent], text: str) -> None:
        # trailing whitespace waits for more text: before a call or at the end it is never shown
        text = self._ws + text
        shown = text.rstrip()
        self._ws = text[len(shown):]
        if not shown:
            return
        text = shown
        self.content += text
        events.append(ChatEvent("content", text))

    def _args(self, events: list[ChatEvent], upto: str) -> None:
        if len(upto) > self._sent:
            frag = upto[self._sent:]
            self._sent = len(upto)
            self.calls[-1].arguments += frag
            if not self._held:
                events.append(ChatEvent("call_args", frag, index=len(self.calls) - 1))
            self._release(events)

    def _priors(self) -> list[tuple[str, str]]:
        return self.earlier + [(c.name, c.arguments) for c in self.calls[:-1]]

    def _release(self, events: list[ChatEvent], force: bool = False) -> None:
        """Show the held call (its start and arguments so far) once it can no longer be a repeat."""
        if not self._held:
            return
        call = self.calls[-1]
        if not force and any(n == call.name and a.startswith(call.arguments) for n, a in self._priors()):
            return
        self._held = False
        i = len(self.calls) - 1
        events.append(ChatEvent("call_start", index=i, call_id=call.id, name=call.name))
        if call.arguments:
            events.append(ChatEvent("call_args", call.arguments, index=i))


@dataclass
class ChatOptions:
    """What a chat request asks for beyond its messages (OpenAI's names)."""

    tools: list[dict] = field(default_factory=list)
    tool_choice: str | dict = "auto"
    parallel_tool_calls: bool = True
    response_format: dict | None = None
    grammar: str | None = None  # an xgrammar EBNF (vLLM's `guided_grammar`, SGLang's `ebnf`)
    # JsonSchema options for tool arguments and json_schema replies: max_string_length, max_number_digits,
    # max_array_items, max_object_entries (tool calls default to grammar.TOOL_ARGUMENT_CAPS; None: no cap)
    schema_options: dict = field(default_factory=dict)
    max_tool_calls: int | None = MAX_TOOL_CALLS  # calls one output may make (None: no cap)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise InvalidRequestError(f"unsupported message content {type(content).__name__}", param="messages")


# Python names for the JSON-schema types (and BFCL's `dict`, `float`, `tuple`, `any`) in a tool's signature
_PY_TYPES = {"string": "str", "integer": "int", "number": "float", "float": "float", "boolean": "bool",
             "array": "list", "tuple": "list", "object": "dict", "dict": "dict"}


def tool_signature(spec: ToolSpec) -> str:
    """A tool as a Python function: its parameters typed (an enum as its values), optional ones with their
    default (`= None` when there is none), and a docstring of its and its parameters' descriptions."""
    params = spec.parameters or {}
    required = set(params.get("required") or [])
    parts, docs = [], []
    for name, prop in (params.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        kind = prop.get("type")
        if "enum" in prop:
            shown = " | ".join(json.dumps(v, ensure_ascii=False) for v in prop["enum"])
        else:
            shown = _PY_TYPES.get(kind, str(kind or "any")) if not isinstance(kind, list) else " | ".join(
                _PY_TYPES.get(k, str(k)) for k in kind)
        if name in required:
            default = ""
        else:
            default = " = " + (json.dumps(prop["default"], ensure_ascii=False) if "default" in prop else "None")
        parts.append(f"{name}: {shown}{default}")
        if prop.get("description"):
            docs.append(f"    {name}: {prop['description']}")
    return f"def {spec.name}({', '.join(parts)}):\n    \"\"\"{spec.description}\n" + "\n".join(docs) + '\n    \"\"\"'


def tool_instructions(tools: list[dict]) -> str:
    """The system prompt's description of `tools` and of how to call them.

    Tools are shown as Python signatures, not as JSON: a small model copies a JSON listing's shape into
    its calls (smollm2-135m, right after a call's first argument, wanted `, "description": ...` as in
    the listing, which the grammar then turned into an optional argument with an invented value)."""
    specs = [ToolSpec.parse(t) for t in tools]
    return ("You can call these functions:\n\n" + "\n\n".join(tool_signature(s) for s in specs) + "\n\n"
            'To call a function, write <tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>, '
            "with the argument values taken from the user's request.")


def build_prompt(tokenizer, messages: list[dict], options: ChatOptions) -> list[int]:
    """Token ids for `messages` (OpenAI shape) under the model's chat template, tools described."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    template = tokenizer.chat_template or ""
    native_tools = "tools" in template and "tool_call" in template
    out: list[dict] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidRequestError(f"messages[{i}].role {role!r} is not one of system, user, assistant, tool",
                                      param=f"messages[{i}].role")
        text = _text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                fn = call.get("function", call)
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError as exc:
                    raise InvalidRequestError(f"messages[{i}] has a tool call whose arguments are not JSON",
                                              param=f"messages[{i}].tool_calls") from exc
                text += render_tool_call(fn.get("name", ""), args, separators=TOOL_SEPARATORS)
        if role == "tool" and not native_tools:
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        out.append({"role": role, "content": text})
    kwargs: dict[str, Any] = {}
    if options.tools and options.tool_choice != "none":
        if native_tools:
            kwargs["tools"] = options.tools
        else:
            instructions = tool_instructions(options.tools)
            if out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + instructions}
            else:
                out.insert(0, {"role": "system", "content": instructions})
    return template_ids(tokenizer, out, **kwargs)


def chat_constraint(options: ChatOptions, **schema_options: Any):
    """The grammar for a request: tool calls when tools are offered, else its response_format."""
    if options.grammar is not None:
        return grammar.Ebnf(options.grammar)
    if options.tools and options.tool_choice != "none":
        return grammar.ToolCalls(options.tools, options.tool_choice, parallel=options.parallel_tool_calls,
                                 separators=TOOL_SEPARATORS, **schema_options)
    fmt = options.response_format or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    caps = {**grammar.TOOL_ARGUMENT_CAPS, **schema_options}  # the same defaults as tool arguments
    if kind == "json_object":  # OpenAI: a JSON object, not any JSON value
        return grammar.JsonSchema({"type": "object"}, **caps)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object",
                                      param="response_format")
        return grammar.JsonSchema(spec["schema"], strict=spec.get("strict"), **caps)
    raise InvalidRequestError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                              param="response_format")


async def prepare_chat(engine, compiler, messages: list[dict], options: ChatOptions):
    """Prompt ids and (when the request needs one) a grammar matcher; bad input raises here, before
    anything is streamed."""
    prompt_ids = build_prompt(engine.tokenizer, messages, options)
    constraint = chat_constraint(options, **options.schema_options)
    if constraint is None:
        return prompt_ids, None
    compiled = await compiler.compile_async(constraint)
    stop = sorted(engine.eos_token_ids)
    if isinstance(constraint, ToolCalls):
        asked = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        return prompt_ids, CallList(compiled, stop_token_ids=stop, max_calls=options.max_tool_calls,
                                    earlier=turn_calls(messages),
                                    listed=grammar.listed_names(asked) if isinstance(asked, str) else [],
                                    named=named_choices(constraint.tools, asked) if isinstance(asked, str) else {})
    return prompt_ids, Matcher(compiled, stop_token_ids=stop)


def turn_calls(messages: list[dict]) -> list[tuple[str, Any]]:
    """(name, arguments) of the calls the assistant made since the last user message: the calls of
    this turn that a new call must not repeat."""
    calls: list[tuple[str, Any]] = []
    for m in messages:
        if m.get("role") == "user":
            calls = []
        for call in (m.get("tool_calls") or []) if m.get("role") == "assistant" else []:
            fn = call.get("function", call)
            calls.append((fn.get("name", ""), fn.get("arguments") or "{}"))
    return calls


async def stream_chat(engine, prompt_ids: list[int], matcher, params) -> AsyncIterator[ChatEvent | ChatResult]:
    """Decode a chat turn: yields ChatEvents as text arrives, then one ChatResult.

    Near max_tokens the grammar steers open JSON to close (`Matcher.close_by`): a tool call or JSON
    reply that would be cut mid-value ends complete, its last value shortened."""
    if matcher is not None:
        matcher.close_by(params.max_tokens)
    splitter = ToolCallStream(getattr(matcher, "earlier", ()), bare=isinstance(matcher, CallList))
    async for out in engine.stream(prompt_ids, params, matcher):
        for event in splitter.push(out.text):
            yield event
        if out.finish_reason is not None:
            for event in splitter.finish():
                yield event
            reason = "tool_calls" if splitter.calls and out.finish_reason == "stop" else out.finish_reason
            yield ChatResult(splitter.content, splitter.calls, reason, out.prompt_tokens, out.completion_tokens,
                             out.incomplete, splitter.refused, out.cached_tokens)
