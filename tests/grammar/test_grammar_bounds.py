"""Bounded grammar work: grammars that can never finish or force astronomically long output are
refused before they compile, grammars over the size cap are refused, jump-forward hands out at most
MAX_JUMP_FORWARD characters, and an isolated compile is stopped (its process killed) at the deadline."""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import psutil
import pytest

from agentrt.errors import GrammarError
from agentrt.grammar import (
    CompileCache,
    CompileRateLimitError,
    Ebnf,
    GrammarCompiler,
    JsonSchema,
    Regex,
    RestartBudget,
    ToolCalls,
)
from agentrt.grammar._bounds import GrammarLimits
from agentrt.grammar._isolate import _BOOTSTRAP, _package_paths
from agentrt.grammar._matcher import MAX_JUMP_FORWARD

pytestmark = pytest.mark.anyio

SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


def fresh(compiler, **kwargs) -> GrammarCompiler:
    return GrammarCompiler(compiler.info, cache=CompileCache(max_bytes=64 << 20), **kwargs)


@pytest.mark.parametrize("constraint", [
    JsonSchema(SELF_REQUIRED),
    JsonSchema({"$defs": {"n": {"type": "object", "required": ["kids"], "properties": {
        "kids": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"}),
    ToolCalls([{"name": "f", "parameters": SELF_REQUIRED}], "required"),
    Ebnf('root ::= "x" | "y" a\na ::= "b" a\n'),
])
def test_a_grammar_that_can_never_finish_is_refused_saying_why(compiler, constraint):
    with pytest.raises(GrammarError, match="can never finish") as info:
        fresh(compiler).compile(constraint)
    assert "recursi" in str(info.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}},  # the recursion may stop: compiles
    {"$defs": {"n": {"type": "object", "required": ["kids"], "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"},
])
def test_recursion_that_can_stop_compiles(compiler, accepts, schema):
    fresh(compiler).compile(JsonSchema(schema))
    assert accepts(JsonSchema(schema), '{"a":{}}' if "properties" in schema else '{"kids":[{"kids":[]}]}')


def test_rules_that_double_each_other_are_refused(compiler):
    rules = "".join(f"a{i} ::= a{i + 1} a{i + 1}\n" for i in range(40)) + 'a40 ::= "xy"\nroot ::= "q" | a0\n'
    with pytest.raises(GrammarError, match="forces an output of at least"):
        fresh(compiler).compile(Ebnf(rules))


def test_grammar_size_is_capped(compiler):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(50)}}
    small = fresh(compiler, limits=GrammarLimits(max_rules=100))
    with pytest.raises(GrammarError, match="too large: its grammar has \\d+ rules"):
        small.compile(JsonSchema(schema))
    small.compile(Regex("a+"))


def test_jump_forward_is_capped(compiler, tokenizer):
    long = "x" * (3 * MAX_JUMP_FORWARD)
    matcher = fresh(compiler).compile(Regex(long + "[ab]")).matcher()
    forced = matcher.find_jump_forward_string()
    assert forced == "x" * MAX_JUMP_FORWARD
    assert matcher.accept_string(forced) and matcher.find_jump_forward_string() == "x" * MAX_JUMP_FORWARD


def _slow_tools(n: int = 1500) -> ToolCalls:
    # optional integer properties compile in time that grows faster than linearly (1,500: ~15 s here)
    params = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}
    return ToolCalls([{"name": "f", "parameters": params}], "required")


async def test_an_isolated_compile_is_stopped_at_its_deadline(compiler):
    iso = fresh(compiler, isolate=True, timeout=60, limits=GrammarLimits(max_rules=39_999))  # a pool of its own
    await iso.compile_async(Regex("warm+"))  # the worker has started
    (worker,) = iso.pool.pids
    t0 = time.perf_counter()
    with pytest.raises(GrammarError, match="took longer than 2s and was stopped"):
        await iso.compile_async(_slow_tools(), timeout=2)
    assert time.perf_counter() - t0 < 20
    assert not psutil.pid_exists(worker)  # nothing keeps compiling: its process was killed
    with anyio.fail_after(60):  # and a fresh one serves the next compile
        compiled = await iso.compile_async(JsonSchema({"type": "integer"}))
    assert compiled.matcher().accept_string("42")
    with pytest.raises(GrammarError, match="can never finish"):
        await iso.compile_async(JsonSchema(SELF_REQUIRED))


def test_a_grammar_worker_imports_only_what_a_compile_needs():
    # what unpickling any constraint imports in a worker: not the engine, the compiler or llguidance.torch
    code = _BOOTSTRAP + ("import sys, agentrt.grammar._isolate, agentrt.grammar._constraints, agentrt.grammar._tools\n"
                         "print(' '.join(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code, *_package_paths()], capture_output=True, text=True,
                          timeout=600, check=True)
    modules = set(done.stdout.split())
    assert {"xgrammar", "agentrt.grammar._tools", "agentrt.engine.constraint"} <= modules
    for heavy in ("agentrt.engine.engine", "agentrt.engine.sampling", "agentrt.grammar._compiler",
                  "llguidance.torch", "torch._dynamo"):
        assert heavy not in modules


def test_worker_restarts_are_limited_per_client():
    budget = RestartBudget(limit=2, window=0.5)
    for _ in range(2):
        budget.check("a")
        budget.spend("a")
    with pytest.raises(CompileRateLimitError) as info:
        budget.check("a")
    assert 0 < info.value.retry_after <= 1.0
    budget.check("b")  # other clients, and compiles for no client, are not limited
    budget.spend(None)
    budget.check(None)
    time.sleep(0.6)  # the kills leave the window
    budget.check("a")
