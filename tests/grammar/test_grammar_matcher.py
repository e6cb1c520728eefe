"""The matcher the engine drives and the batch mask filler: masks allow exactly the grammar's next
tokens, rollback and jump-forward behave, and a uniformly random "model" decoding under the masks
(what tiny-random does) always yields output that validates."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from agentrt.engine.constraint import TokenConstraint, allocate_bitmask
from agentrt.grammar import Choice, JsonSchema, Matcher, ToolCalls, parse_tool_calls

VOCAB = 49152


def allowed(bitmask: torch.Tensor, row: int = 0) -> list[int]:
    """Token ids whose bit is set in one packed row (bit j of word i = token 32 * i + j)."""
    words = bitmask[row].to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
    return bits.flatten()[:VOCAB].nonzero().flatten().tolist()


def test_matcher_implements_the_engine_protocol(compiler):
    m = compiler.compile(Choice(["a"])).matcher()
    assert isinstance(m, Matcher) and isinstance(m, TokenConstraint)


def test_mask_allows_exactly_the_grammar_continuations(compiler, tokenizer):
    m = compiler.compile(Choice(["yes", "no"])).matcher()
    mask = allocate_bitmask(1, VOCAB)
    m.fill_next_token_bitmask(mask, 0)
    texts = {tokenizer.decode([t]) for t in allowed(mask)}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    assert {"yes", "no"} <= texts or {"y", "n"} <= texts


def test_termination_rollback_and_jump_forward(compiler, tokenizer):
    schema = {
        "type": "object",
        "properties": {"status": {"enum": ["ok"]}, "n": {"type": "integer"}},
        "required": ["status", "n"],
    }
    m = compiler.compile(JsonSchema(schema)).matcher()
    assert m.find_jump_forward_string() == '{"status":"ok","n":'  # forced text, appended without sampling
    ids = tokenizer.encode('{"status":"ok","n":12}', add_special_tokens=False)
    for t in ids:
        assert m.accept_token(t)
    assert m.is_completed() and not m.is_terminated()
    m.rollback(1)
    assert not m.is_completed()
    assert m.accept_token(ids[-1])
    assert m.accept_token(tokenizer.eos_token_id) and m.is_terminated()
    with pytest.raises(ValueError):
        m.rollback(len(ids) + 5)


def test_rejected_tokens_leave_the_matcher_unchanged(compiler, tokenizer):
    m = compiler.compile(Choice(["abc"])).matcher()
    assert not m.accept_token(tokenizer.encode("z", add_special_tokens=False)[0])
    assert m.accept_token(tokenizer.encode("abc", add_special_tokens=False)[0])


def test_bitmask_width_mismatch_is_explained(compiler):
    m = compiler.compile(Choice(["a"])).matcher()
    with pytest.raises(ValueError, match="vocabulary of 49152"):
        m.fill_next_token_bitmask(allocate_bitmask(1, 1000), 0)


@pytest.mark.parametrize("overlap", [True, False], ids=["during the forward", "before it"])
def test_the_engines_mask_filler_fills_constrained_rows_and_leaves_others_open(compiler, overlap):
    from agentrt.engine.sampling import MaskFiller

    a = compiler.compile(Choice(["yes"])).matcher()
    b = compiler.compile(JsonSchema({"type": "integer"})).matcher()
    filler = MaskFiller(VOCAB, torch.device("cpu"), max_rows=4, overlap=overlap)
    filler.start([(0, a), (2, b)], rows=3)  # launched while the forward would run
    logits = torch.zeros(3, VOCAB)
    filler.apply(logits)
    solo = allocate_bitmask(1, VOCAB)
    b.fill_next_token_bitmask(solo, 0)
    allowed_b = {i for i in range(VOCAB) if solo[0, i // 32] >> (i % 32) & 1}
    assert {int(i) for i in torch.nonzero(logits[2] == 0)} == allowed_b  # the matcher's own mask, steering included
    assert bool((logits[1] == 0).all())  # an unconstrained row keeps every token
    assert 0 < int((logits[0] == 0).sum()) < 100
    filler.apply(logits)  # nothing pending: a no-op
    filler.close()


def random_decode(matcher: Matcher, tokenizer, rng: random.Random, max_tokens: int) -> tuple[str, bool]:
    """Sample uniformly among allowed tokens, like a random-weight model under the grammar."""
    mask = allocate_bitmask(1, VOCAB)
    out: list[int] = []
    for _ in range(max_tokens):
        forced = matcher.find_jump_forward_string()
        if forced:
            assert matcher.accept_string(forced)
            out += tokenizer.encode(forced, add_special_tokens=False)
            continue
        matcher.fill_next_token_bitmask(mask, 0)
        token = rng.choice(allowed(mask))
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "score": {"type": "number"},
        "count": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    },
    "required": ["name", "score", "count", "meta"],
}


def test_random_model_under_capped_schema_finishes_with_valid_json(compiler, tokenizer):
    compiled = compiler.compile(JsonSchema(SCHEMA, max_string_length=8, max_number_digits=4))
    rng = random.Random(0)
    finished = 0
    for _ in range(8):
        text, done = random_decode(compiled.matcher(), tokenizer, rng, max_tokens=200)
        if done:
            finished += 1
            jsonschema.validate(json.loads(text), SCHEMA)
    assert finished >= 6, f"only {finished} of 8 random decodes finished within 200 tokens"


def test_random_model_under_required_tool_calls_emits_valid_calls(compiler, tokenizer):
    tools = [
        {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        }
    ]
    compiled = compiler.compile(ToolCalls(tools, "required", parallel=False, max_string_length=6))
    text, done = random_decode(compiled.matcher(), tokenizer, random.Random(1), max_tokens=100)
    assert done
    rest, calls = parse_tool_calls(text)
    assert rest == "" and len(calls) == 1 and calls[0]["name"] == "lookup"
    assert isinstance(calls[0]["arguments"]["q"], str) and len(calls[0]["arguments"]["q"]) <= 6
