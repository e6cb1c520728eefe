"""llguidance as the second backend, behind the same Matcher: the policy that picks it per schema
(keywords xgrammar drops or strict refuses, schemas xgrammar cannot take, compiles past xgrammar's
share of the deadline), the bitmask layout both write, and what the engine drives through a matcher
(masks, acceptance, stop tokens, rollback, jump-forward), with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from maskbench_eval import MASKBENCH, serialise

from agentrt.engine.constraint import allocate_bitmask, jump_forward_tokens
from agentrt.errors import GrammarError
from agentrt.grammar import CompileCache, GrammarCompiler, JsonSchema
from agentrt.grammar._bounds import GrammarLimits

VOCAB = 49152  # the SmolLM2 tokenizer's, as in conftest

# xgrammar enforces only the format here (and refuses the schema under strict); llguidance both
EMAIL_COM = {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$", "format": "email"}
# xgrammar's grammar for it admits one matching key only (and warns); llguidance follows the schema
PATTERN_PROPS = {"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pet": {"enum": ["cat", "dog"]}},
          "required": ["name", "age"]}


def _compiler(tokenizer, **kw) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=VOCAB, cache=CompileCache(max_bytes=64 << 20), **kw)


@pytest.fixture(scope="module")
def auto(tokenizer) -> GrammarCompiler:
    return _compiler(tokenizer)


@pytest.fixture(scope="module")
def xgr_only(tokenizer) -> GrammarCompiler:
    return _compiler(tokenizer, backend="xgrammar")


@pytest.fixture(scope="module")
def llg_only(tokenizer) -> GrammarCompiler:
    return _compiler(tokenizer, backend="llguidance")


def allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def walk(matcher, tokenizer, text: str) -> bool:
    """Every token of `text` allowed by the mask and accepted, then end-of-sequence."""
    bitmask = allocate_bitmask(1, VOCAB)
    for t in [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]:
        bitmask.fill_(-1)
        matcher.fill_next_token_bitmask(bitmask, 0)
        if not allowed(bitmask, t) or not matcher.accept_token(t):
            return False
    return matcher.is_terminated()


def test_strict_keyword_xgrammar_refuses_is_served_by_llguidance(auto, xgr_only, tokenizer):
    with pytest.raises(GrammarError, match="strict mode requires"):
        xgr_only.compile(JsonSchema(EMAIL_COM, strict=True))
    compiled = auto.compile(JsonSchema(EMAIL_COM, strict=True))
    assert compiled.backend == "llguidance" and compiled.warnings == []
    assert walk(compiled.matcher(), tokenizer, '"ab@cd.com"')
    assert not walk(compiled.matcher(), tokenizer, '"Ab@cd.com"')  # xgrammar's format alone admits it
    assert not walk(compiled.matcher(), tokenizer, '"ab@cd.org"')
    loose = xgr_only.compile(JsonSchema(EMAIL_COM))
    assert loose.backend == "xgrammar" and loose.warnings and walk(loose.matcher(), tokenizer, '"Ab@cd.org"')


def test_dropped_keyword_goes_to_llguidance_and_is_enforced(auto, xgr_only, tokenizer):
    two_keys = '{"x":1,"xy":2}'  # valid: both keys match ^x
    assert not walk(xgr_only.compile(JsonSchema(PATTERN_PROPS)).matcher(), tokenizer, two_keys)
    compiled = auto.compile(JsonSchema(PATTERN_PROPS))
    assert compiled.backend == "llguidance" and compiled.warnings == []
    assert walk(compiled.matcher(), tokenizer, two_keys)
    assert not walk(compiled.matcher(), tokenizer, '{"x":1,"x":"a"}')
    assert not walk(compiled.matcher(), tokenizer, '{"y":1}')


def test_plain_schemas_stay_with_xgrammar_and_endless_ones_stay_refused(auto):
    assert auto.compile(JsonSchema(PERSON)).backend == "xgrammar"
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}, "b": {"not": {}}}, "required": ["a"]}
    with pytest.raises(GrammarError, match="never finish"):  # llguidance would serve it; nothing can end it
        auto.compile(JsonSchema(endless))


def test_schema_too_large_for_xgrammar_is_served(tokenizer):
    small = _compiler(tokenizer, limits=GrammarLimits(max_rules=3))
    compiled = small.compile(JsonSchema(PERSON))
    assert compiled.backend == "llguidance"
    assert walk(compiled.matcher(), tokenizer, '{"name":"Al","age":7,"pet":"cat"}')
    assert not walk(compiled.matcher(), tokenizer, '{"name":"Al","age":700}')
    with pytest.raises(GrammarError, match="too large"):
        _compiler(tokenizer, limits=GrammarLimits(max_rules=3), backend="xgrammar").compile(JsonSchema(PERSON))


@pytest.mark.anyio
async def test_compile_past_xgrammars_share_of_the_deadline_is_served(tokenizer):
    # fallback_after=0: xgrammar's share of the deadline is over at once, whatever the machine's speed
    compiler = _compiler(tokenizer, fallback_after=0.0, timeout=30.0)
    schema = {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"}}, "required": ["s"]}
    compiled = await compiler.compile_async(JsonSchema(schema, max_string_length=5, max_number_digits=3))
    assert compiled.backend == "llguidance"
    assert walk(compiled.matcher(), tokenizer, '{"s":"abcde","n":-999}')
    assert not walk(compiled.matcher(), tokenizer, '{"s":"abcdef"}')  # the caps, as maxLength and a range
    assert not walk(compiled.matcher(), tokenizer, '{"s":"a","n":1000}')
    # a constraint llguidance does not serve keeps xgrammar's whole deadline
    from agentrt.grammar import Regex

    assert (await compiler.compile_async(Regex("[a-c]{2}"))).backend == "xgrammar"


def test_bitmask_layout_agrees_with_xgrammar(xgr_only, llg_only, tokenizer):
    """Same schema, same language, the engine's bitmask: both backends write the same bits into their
    row (and only there) wherever the output is free; where text is forced, llguidance allows only its
    canonical tokens (`{"` but not `{`), a subset of xgrammar's."""
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "pet": {"enum": ["cat", "dog", "doge"]}}, "required": ["age", "pet"]}
    x = xgr_only.compile(JsonSchema(schema)).matcher()
    g = llg_only.compile(JsonSchema(schema)).matcher()
    assert g.compiled.backend == "llguidance"
    bx, bg = allocate_bitmask(2, VOCAB), allocate_bitmask(2, VOCAB)
    free = 0
    for t in [*tokenizer.encode('{"age":42,"pet":"doge"}', add_special_tokens=False), tokenizer.eos_token_id]:
        bx.fill_(-1), bg.fill_(-1)
        x.fill_next_token_bitmask(bx, 1)
        g.fill_next_token_bitmask(bg, 1)
        assert bool((bg[0] == -1).all())  # only its own row is written
        if x.find_jump_forward_string():
            assert torch.equal(bg[1] & bx[1], bg[1]) and bool(bg[1].any())
        else:
            free += 1
            assert torch.equal(bx[1], bg[1]), f"masks differ before token {t} ({tokenizer.decode([t])!r})"
        assert allowed(bg[1:], t) and x.accept_token(t) and g.accept_token(t)
    assert free >= 4 and x.is_terminated() and g.is_terminated()


def test_matcher_state_rollback_stop_and_jump_forward(llg_only, tokenizer):
    m = llg_only.compile(JsonSchema(PERSON)).matcher()
    assert m.find_jump_forward_string() == '{"name":"'
    forced = jump_forward_tokens(m, tokenizer)
    assert forced and tokenizer.decode(forced) == '{"name":"'[:len(tokenizer.decode(forced))]
    ids = tokenizer.encode('{"name":"Al","age":5', add_special_tokens=False)
    masks = []
    bitmask = allocate_bitmask(1, VOCAB)
    for t in ids:
        m.fill_next_token_bitmask(bitmask, 0)
        masks.append(bitmask.clone())
        assert m.accept_token(t)
    bad = tokenizer.encode("x", add_special_tokens=False)[0]
    assert not m.accept_token(bad)  # refused, and the state is as it was
    assert m.accept_token(tokenizer.encode("}", add_special_tokens=False)[0]) and m.is_completed()
    assert m.accept_token(tokenizer.eos_token_id) and m.is_terminated()
    assert not m.accept_token(ids[0])
    m.rollback(3)  # the stop token, '}' and the last digit token
    assert not m.is_terminated() and m.num_accepted == len(ids) - 1
    m.fill_next_token_bitmask(bitmask, 0)
    assert torch.equal(bitmask, masks[-1])
    assert m.accept_token(ids[-1])
    m.reset()
    assert m.find_jump_forward_string() == '{"name":"' and m.num_accepted == 0
    assert walk(m, tokenizer, '{"name":"Al","age":5}')
    with pytest.raises(NotImplementedError):
        m.accept_string("x")


def test_stop_token_override(llg_only, tokenizer):
    compiled = llg_only.compile(JsonSchema({"enum": ["yes", "no"]}))
    m = compiled.matcher(stop_token_ids=[0])
    for t in tokenizer.encode('"no"', add_special_tokens=False):
        assert m.accept_token(t)
    bitmask = allocate_bitmask(1, VOCAB)
    m.fill_next_token_bitmask(bitmask, 0)
    assert allowed(bitmask, 0) and not allowed(bitmask, tokenizer.eos_token_id)
    assert not m.accept_token(tokenizer.eos_token_id) and m.accept_token(0) and m.is_terminated()


def _maskbench_case(name: str) -> dict:
    path = MASKBENCH / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared MaskBench data sits beside the checkout (../shared/data)")
    return json.loads(path.read_text())


MASKBENCH_CASE = "Github_trivial---o86372.json"  # patternProperties: xgrammar drops a keyword of it


def test_maskbench_instances_under_llguidance(auto, tokenizer):
    """A MaskBench schema the policy gives llguidance: its valid instances accepted token by token,
    its invalid ones rejected (MaskBench's labels)."""
    case = _maskbench_case(MASKBENCH_CASE)
    compiled = auto.compile(JsonSchema(case["schema"], allow_undeclared=True))
    assert compiled.backend == "llguidance"
    seen = set()
    for test in case["tests"]:
        text = serialise(test["data"], case["schema"])[0]
        valid = bool(test["valid"])
        assert walk(compiled.matcher(), tokenizer, text) == valid, (test.get("description"), text)
        seen.add(valid)
    assert seen == {True, False}
