"""Jump-forward keeps token boundaries: a model that writes a text in its canonical tokenisation,
decoded greedily under a grammar that allows that text, writes exactly those tokens; forced text is
never committed as a token the model's own next token would have merged with (`": "` as `":` + `' '`
before `' -3'`)."""

from __future__ import annotations

import json

import pytest

from agentrt.engine.constraint import allocate_bitmask, jump_forward_tokens
from agentrt.grammar import JsonSchema, ToolCalls
from agentrt.grammar._boundary import TokenBoundaries

VOCAB = 49152

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "number"}},
         "required": ["x", "y"], "additionalProperties": False}
NOTE = {"type": "object", "properties": {"text": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}}, "required": ["text", "tags"], "additionalProperties": False}
LIST = {"type": "array", "items": {"type": "number"}}

CASES = [
    (JsonSchema(POINT, separators=(", ", ": ")), {"x": -3, "y": -0.25}),
    (JsonSchema(POINT, separators=(", ", ": ")), {"x": 12, "y": 4.5}),
    (JsonSchema(POINT), {"x": -7, "y": -1e-3}),
    (JsonSchema(NOTE, separators=(", ", ": ")), {"text": " leading space", "tags": ['"quoted"', " x"]}),
    (JsonSchema(NOTE, separators=(", ", ": ")), {"text": "-dash", "tags": []}),
    (JsonSchema(LIST, separators=(", ", ": ")), [-1, -2.5, 3]),
]


def greedy_oracle(compiler, tokenizer, constraint, text: str) -> list[int]:
    """Decode as the engine does (jump-forward, then mask and sample) with a "model" whose argmax is
    always the next token of `text`'s canonical tokenisation; the tokens written."""
    target = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    matcher = compiler.compile(constraint).matcher()
    mask = allocate_bitmask(1, VOCAB)
    out: list[int] = []
    while not matcher.is_terminated():
        forced = jump_forward_tokens(matcher, tokenizer)
        for t in forced:
            assert matcher.accept_token(t)
        out += forced
        if out != target[:len(out)] or matcher.is_terminated():
            break
        matcher.fill_next_token_bitmask(mask, 0)
        want = target[len(out)]
        assert mask[0, want // 32].item() >> (want % 32) & 1, "the grammar refuses the model's token"
        assert matcher.accept_token(want)
        out.append(want)
    return out


@pytest.mark.parametrize("constraint,value", CASES, ids=[json.dumps(v) for _, v in CASES])
def test_constrained_greedy_writes_the_models_own_tokens(compiler, tokenizer, constraint, value):
    sep = constraint.separators if constraint.separators else (",", ":")
    text = json.dumps(value, separators=sep)
    target = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert greedy_oracle(compiler, tokenizer, constraint, text) == target


@pytest.mark.parametrize("args", [{"a": 5, "b": -3}, {"a": -12, "b": 11}, {"a": 0.5, "b": -0.75}])
def test_tool_call_arguments_keep_their_signs(compiler, tokenizer, args):
    from agentrt.chat import TOOL_SEPARATORS
    from agentrt.grammar import render_tool_call

    text = render_tool_call("add", args, separators=TOOL_SEPARATORS)
    constraint = ToolCalls([ADD], "required", parallel=False, separators=TOOL_SEPARATORS)
    target = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert greedy_oracle(compiler, tokenizer, constraint, text) == target


def test_forced_text_stops_before_a_token_could_straddle_it(tokenizer):
    from agentrt.grammar import tokenizer_info

    b = TokenBoundaries(tokenizer_info(tokenizer, VOCAB).decoded_vocab)
    forced = '{"a": '
    ids = tokenizer.encode(forced, add_special_tokens=False)
    kept = b.commit(forced, ids)
    assert tokenizer.decode(ids) == forced and kept == ids[:len(kept)]
    assert not tokenizer.decode(kept).endswith(" ")  # ' ' joins what follows: ' -', ' "'
    assert b.commit("abc", [0, 1]) == []  # ids that do not spell the text commit nothing


CALC = {"type": "object", "properties": {"expression": {"type": "string", "minLength": 1}},
        "required": ["expression"], "additionalProperties": False}


@pytest.mark.parametrize("schema,kind", [(CALC, "string"), (POINT, "number")])
def test_forced_text_left_to_the_sampler_keeps_its_canonical_first_token(compiler, tokenizer, schema, kind):
    """After `{"expression":` the grammar forces `' "'`: the lone `' '` (what a model that wants a number
    there writes) is masked and `' "'` is not; before a number, where `' '` is the canonical token,
    nothing is masked (`' '` and `' -'` both stay)."""
    matcher = compiler.compile(JsonSchema(schema, separators=(", ", ": "))).matcher()
    key = next(iter(schema["properties"]))
    for t in tokenizer.encode('{"' + key + '"', add_special_tokens=False):
        assert matcher.accept_token(t)
    committed = jump_forward_tokens(matcher, tokenizer)
    for t in committed:
        assert matcher.accept_token(t)
    mask = allocate_bitmask(1, VOCAB)
    matcher.fill_next_token_bitmask(mask, 0)

    def allowed(text: str) -> bool:
        (t,) = tokenizer.encode(text, add_special_tokens=False)
        return bool(mask[0, t // 32].item() >> (t % 32) & 1)

    assert tokenizer.decode(committed).endswith(":")
    if kind == "string":
        assert allowed(' "') and not allowed(" ")
    else:
        assert allowed(" ") and allowed(" -")
