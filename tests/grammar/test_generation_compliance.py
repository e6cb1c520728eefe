"""Generation compliance: decode under real MaskBench schemas with real models on our engine; every
finished output validates with `jsonschema`, and enough of them finish for that to mean something."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import jsonschema
import pytest

from agentrt.grammar import GrammarCompiler, JsonSchema, Matcher
from agentrt.engine.sampling import SamplingParams

MASKBENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "maskbench"


def schemas(n: int, **caps) -> list[tuple[str, dict, object]]:
    """The n smallest MaskBench schemas that compile with no warning (a warning means the grammar
    lets through something the schema forbids, so validation could fail by design)."""
    if not MASKBENCH.exists():
        pytest.skip(f"{MASKBENCH} is absent: the shared benchmark data sits beside the checkout")
    return [(name, schema, caps) for name, schema in _smallest()][: n * 3]


def _smallest() -> list[tuple[str, dict]]:
    files = sorted(MASKBENCH.glob("*.json"))
    items = [(f.name, json.loads(f.read_text())["schema"]) for f in files]
    return sorted(items, key=lambda it: len(json.dumps(it[1])))


def decode_all(engine, n: int, max_tokens: int, caps: dict, temperature: float) -> tuple[int, int, list[str]]:
    """(finished, valid among finished, failures) for the first n usable schemas."""
    logging.getLogger("agentrt.grammar").setLevel(logging.ERROR)
    compiler = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size)
    chosen = []
    for name, schema in _smallest():
        try:
            compiled = compiler.compile(JsonSchema(schema, **caps))
        except Exception:
            continue
        if not compiled.warnings:
            chosen.append((name, schema, compiled))
        if len(chosen) == n:
            break
    assert len(chosen) == n
    stop = sorted(engine.eos_token_ids)

    async def one(i, name, schema, compiled):
        prompt = engine.chat_prompt([{"role": "user", "content": "Reply with JSON that matches this schema: "
                                      + json.dumps(schema)[:1500]}])
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i)
        return name, schema, await engine.generate(prompt, params, Matcher(compiled, stop_token_ids=stop))

    async def run():
        return await asyncio.gather(*(one(i, *c) for i, c in enumerate(chosen)))

    finished = valid = 0
    failures = []
    for name, schema, out in asyncio.run(run()):
        if out.finish_reason != "stop":
            assert out.incomplete
            continue
        finished += 1
        try:
            jsonschema.validate(json.loads(out.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{name}: {str(exc)[:200]} in {out.text[:200]!r}")
    return finished, valid, failures


def test_tiny_random_under_200_schemas(tiny_engine):
    if not MASKBENCH.exists():
        pytest.skip(f"{MASKBENCH} is absent: the shared benchmark data sits beside the checkout")
    finished, valid, failures = decode_all(tiny_engine, 200, 160, dict(max_string_length=8, max_number_digits=4),
                                           temperature=1.0)
    assert valid == finished, failures
    assert finished >= 150, f"only {finished} of 200 finished"  # measured: see the issue note
    assert tiny_engine.pool.num_in_use == 0


@pytest.mark.slow
def test_smollm2_under_30_schemas(smol_engine):
    if not MASKBENCH.exists():
        pytest.skip(f"{MASKBENCH} is absent: the shared benchmark data sits beside the checkout")
    finished, valid, failures = decode_all(smol_engine, 30, 200, {}, temperature=0.0)
    assert valid == finished, failures
    assert finished >= 20, f"only {finished} of 30 finished"
