"""Runaway values: caps on strings, arrays, numbers and open objects (tool calls have them by
default), built so xgrammar's token-mask cache still serves every capped string state, and a model
that never wants a value to end still ends its call — by the caps, or near max_tokens by steering."""

from __future__ import annotations

import json
import re

import anyio
import pytest
import torch
import xgrammar as xgr

from agentrt.chat import ChatOptions, ChatResult, prepare_chat, stream_chat
from agentrt.grammar import (TOOL_ARGUMENT_CAPS, CompileCache, Ebnf, GrammarCompiler, JsonSchema, Matcher,
                             ToolCalls, parse_tool_calls)
from agentrt.engine.sampling import SamplingParams

NO_CAPS = dict.fromkeys(TOOL_ARGUMENT_CAPS)
LOOKUP = {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                           "required": ["q"]}}
EVERYTHING = {"name": "record", "parameters": {"type": "object", "required": ["q", "tags", "n", "meta"], "properties": {
    "q": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}, "n": {"type": "number"},
    "meta": {"type": "object"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def byte_accepts():
    """accepts(constraint, text) over a one-byte-a-token vocabulary: the grammar's language, fast."""
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b"</s>"], stop_token_ids=[256])
    compiler = GrammarCompiler(info, cache=CompileCache(max_bytes=64 << 20))

    def run(constraint, text: str) -> bool:
        m = compiler.compile(constraint).matcher()
        return all(m.accept_token(b) for b in text.encode()) and m.accept_token(256)

    return run


def call(args: dict) -> str:
    return f'<tool_call>{{"name":"record","arguments":{json.dumps(args, separators=(",", ":"))}}}</tool_call>'


def test_caps_bound_strings_arrays_numbers_and_open_objects(byte_accepts):
    caps = {"max_string_length": 4, "max_array_items": 2, "max_number_digits": 3, "max_object_entries": 2}
    tc = ToolCalls([EVERYTHING], "required", **caps)
    ok = {"q": "abcd", "tags": ['a"b', "wxyz"], "n": -123.456, "meta": {"k": [1, "x"], "kk": {}},
          "labels": {"a": "b", "c": "d"}}
    assert byte_accepts(tc, call(ok))
    for key, value in [("q", "abcde"), ("tags", ["a", "b", "c"]), ("tags", ["abcde"]), ("n", 1234),
                       ("n", 1.2345), ("meta", {"a": 1, "b": 2, "c": 3}), ("meta", {"abcde": 1}),
                       ("meta", {"a": [1, 2, 3]}), ("meta", {"a": "abcde"}), ("labels", {"a": "b", "c": "d", "e": "f"}),
                       ("labels", {"a": "abcde"})]:
        assert not byte_accepts(tc, call({**ok, key: value})), (key, value)
    assert byte_accepts(ToolCalls([EVERYTHING], "required", **NO_CAPS),
                        call({**ok, "q": "x" * 300, "tags": ["y"] * 40, "n": 10**20, "meta": dict.fromkeys("abcdefghijklmnopqrst", 1)}))


def test_schema_bounds_under_a_cap_hold_and_a_min_length_over_it_wins(byte_accepts):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3},
                                               "t": {"type": "string", "minLength": 6}}}
    capped = JsonSchema(schema, max_string_length=5)
    assert byte_accepts(capped, '{"s":"abc","t":"abcdef"}')
    assert not byte_accepts(capped, '{"s":"abcd"}')
    assert not byte_accepts(capped, '{"t":"abcde"}')  # minLength still holds
    assert not byte_accepts(capped, '{"t":"abcdefg"}')  # a minLength over the cap is also its bound
    assert byte_accepts(JsonSchema(schema), '{"t":"' + "x" * 500 + '"}')


def test_tool_calls_cap_arguments_by_default_and_a_cap_turns_off(byte_accepts):
    limit = TOOL_ARGUMENT_CAPS["max_string_length"]
    text = '<tool_call>{{"name":"lookup","arguments":{{"q":"{}"}}}}</tool_call>'
    assert byte_accepts(ToolCalls([LOOKUP], "required"), text.format("x" * limit))
    assert not byte_accepts(ToolCalls([LOOKUP], "required"), text.format("x" * (limit + 1)))
    assert byte_accepts(ToolCalls([LOOKUP], "required", max_string_length=None), text.format("x" * (limit + 1)))


def _nested(depth: int) -> object:
    value: object = 1
    for i in range(depth):
        value = {"k": value} if i % 2 else [value, 2]
    return value


def test_untyped_values_nest_only_as_deep_as_the_cap(byte_accepts):
    schema = {"type": "object", "properties": {"any": {}, "obj": {"type": "object"}}}
    capped = JsonSchema(schema, max_untyped_depth=3)
    for key, wrap in (("any", lambda v: v), ("obj", lambda v: {"k": v})):  # an open object's values are untyped
        for depth in range(1, 4):
            assert byte_accepts(capped, json.dumps({key: wrap(_nested(depth))}, separators=(",", ":"))), (key, depth)
        assert not byte_accepts(capped, json.dumps({key: wrap(_nested(4))}, separators=(",", ":"))), key
        assert byte_accepts(JsonSchema(schema), json.dumps({key: wrap(_nested(9))}, separators=(",", ":")))
    assert byte_accepts(capped, '{"any":[[[{}]]]}')  # the deepest level still takes empty containers
    # tool arguments and json_object replies have the cap by default
    deep = {"name": "record", "arguments": {**{"q": "", "tags": [], "n": 1}, "meta": {"k": _nested(9)}}}
    assert not byte_accepts(ToolCalls([EVERYTHING], "required"),
                            "<tool_call>" + json.dumps(deep, separators=(",", ":")) + "</tool_call>")


def test_the_tools_of_a_request_share_one_string_chain():
    tools = [dict(LOOKUP, name=f"lookup_{i}") for i in range(3)] + [EVERYTHING]
    tag, _ = ToolCalls(tools, "required", max_string_length=16).structural_tag()
    (only,) = tag["format"]["tags"]
    rules = [line.split(" ::= ")[0] for line in only["content"]["grammar"].splitlines()]
    assert sum(r.startswith("basic_string_at_") for r in rules) == 17  # one rule a character, once


def _uncertain(compiled) -> dict[str, int]:
    """The most tokens any cached state of each rule leaves to be checked at run time (xgrammar's
    adaptive token-mask cache: what it cannot settle at compile time costs time every step)."""
    data = json.loads(compiled.grammar.serialize_json())
    names = [rule[0] for rule in data["grammar"]["rules"]]
    most: dict[str, int] = {}
    for key, entry in data["adaptive_token_mask_cache"]:
        most[names[key[0]]] = max(most.get(names[key[0]], 0), len(entry["uncertain_indices"]))
    return most


def test_capped_strings_are_served_from_the_mask_cache(compiler):
    capped = _uncertain(compiler.compile(ToolCalls([LOOKUP], "required", max_string_length=16)))
    links = {name: n for name, n in capped.items() if name.startswith("basic_string_at_")}
    assert len(links) == 17  # every position in the string has cached masks ...
    assert max(links.values()) < 0.01 * compiler.vocab_size  # ... that settle nearly every token
    # the form xgrammar 0.2.8 cannot cache (20-50 ms a token): a bounded repetition of characters
    slow = _uncertain(compiler.compile(Ebnf('root ::= "\\"" c{0, 16} "\\""\nc ::= [^"\\\\] | "\\\\" ["n]\n')))
    assert max(slow.values()) > 0.5 * compiler.vocab_size


class NeverEnds:
    """A model that never wants a value to end: of the tokens the grammar allows, it takes one with
    no `"`, `]` or `}` whenever there is one, else one that only opens a string (`"` first after any
    spaces, none of them after it), so that jump-forward leaving an opening quote to it (`' "'`, whose
    lone `' '` the matcher masks) does not end a value either."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        vocab = matcher.compiled.grammar.tokenizer_info.decoded_vocab

        def packed(ids: list[int]) -> torch.Tensor:
            bits = torch.zeros(matcher.vocab_size + 31 & ~31, dtype=torch.int64)
            bits[ids] = 1
            return (bits.view(-1, 32) << torch.arange(32)).sum(1).to(torch.int32)  # low 32 bits kept

        self.closing = packed([i for i, t in enumerate(vocab) if any(c in t for c in b'"]}')])
        self.opening = packed([i for i, t in enumerate(vocab) if t.lstrip(b" ")[:1] == b'"'
                               and not any(c in t.lstrip(b" ")[1:] for c in b'"]}')])

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, index)
        for keep in (bitmask[index] & ~self.closing, bitmask[index] & self.opening):
            if bool(keep.any()):
                bitmask[index] = keep
                return

    def __getattr__(self, name: str):
        return getattr(self.matcher, name)


def _generate(engine, matcher, max_tokens: int):
    prompt = engine.chat_prompt([{"role": "user", "content": "Record something."}])
    return anyio.run(engine.generate, prompt, SamplingParams(max_tokens=max_tokens), matcher)


def test_caps_end_every_value_of_a_model_that_never_ends_one(tiny_engine):
    compiler = GrammarCompiler(tiny_engine.tokenizer, vocab_size=tiny_engine.vocab_size)
    stop = sorted(tiny_engine.eos_token_ids)
    small = {"max_string_length": 12, "max_array_items": 3, "max_number_digits": 3, "max_object_entries": 2}
    # every value typed: an untyped one may nest arrays without end (depth is not capped)
    typed = {**EVERYTHING, "parameters": {**EVERYTHING["parameters"], "required": ["q", "tags", "n", "labels"]}}
    del typed["parameters"]["properties"]["meta"]
    capped = compiler.compile(ToolCalls([typed], "required", parallel=False, **small))
    out = _generate(tiny_engine, NeverEnds(Matcher(capped, stop_token_ids=stop)), 200)
    assert out.finish_reason == "stop" and not out.incomplete, out.text
    _, (got,) = parse_tool_calls(out.text)
    args = got["arguments"]
    assert len(args["q"]) <= 12 and len(args["tags"]) <= 3 and all(len(t) <= 12 for t in args["tags"])
    assert len(args["labels"]) <= 2 and all(len(k) <= 12 and len(v) <= 12 for k, v in args["labels"].items())
    assert all(len(digits) <= 3 for digits in re.findall(r"\d+", json.dumps(args["n"])))
    uncapped = compiler.compile(ToolCalls([typed], "required", parallel=False, **NO_CAPS))
    out = _generate(tiny_engine, NeverEnds(Matcher(uncapped, stop_token_ids=stop)), 200)
    assert out.finish_reason == "length" and out.incomplete  # what the caps prevent


def test_near_max_tokens_a_chat_call_closes_instead_of_being_cut(tiny_engine):
    compiler = GrammarCompiler(tiny_engine.tokenizer, vocab_size=tiny_engine.vocab_size)
    options = ChatOptions(tools=[{"type": "function", "function": LOOKUP}], tool_choice="required",
                          parallel_tool_calls=False)  # default caps: a 128-character string
    messages = [{"role": "user", "content": "Look something up."}]

    async def chat(max_tokens: int) -> ChatResult:
        prompt, matcher = await prepare_chat(tiny_engine, compiler, messages, options)
        result = None
        async for ev in stream_chat(tiny_engine, prompt, NeverEnds(matcher),
                                    SamplingParams(max_tokens=max_tokens)):
            result = ev
        return result

    for max_tokens in (30, 48):  # the envelope up to the string takes 18 tokens, its end 5
        result = anyio.run(chat, max_tokens)
        assert result.finish_reason == "tool_calls" and result.completion_tokens <= max_tokens
        (got,) = result.tool_calls
        q = json.loads(got.arguments)["q"]
        assert got.complete and isinstance(q, str)
        assert "}" not in q and "]" not in q  # steering closes the string; it never writes brackets into it
    # the same model without the steering (no close_by): cut inside the string
    _, matcher = anyio.run(prepare_chat, tiny_engine, compiler, messages, options)
    out = _generate(tiny_engine, NeverEnds(matcher), 30)
    assert out.incomplete
