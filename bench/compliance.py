"""Generation compliance on MaskBench schemas (../shared/data/maskbench): decode each schema's JSON with
the policy every constrained path uses (`agentrt generate --json-schema`: default caps
grammar.TOOL_ARGUMENT_CAPS, close near max_tokens) and count outputs that finish and validate with
jsonschema. Schemas whose grammar compiles with a warning (it admits something the schema forbids)
are skipped and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from bench.common import machine, model_parser, report, where

MASKBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maskbench"


def run(model: str, n: int, max_tokens: int, device: str | None, dtype: str, only: list[str] | None = None) -> dict:
    import jsonschema

    from agentrt.engine import Engine
    from agentrt.grammar import TOOL_ARGUMENT_CAPS, GrammarCompiler, JsonSchema, Matcher
    from agentrt.engine.sampling import SamplingParams

    logging.getLogger("agentrt.grammar").setLevel(logging.ERROR)
    engine = Engine.load(model, device=device, dtype=dtype)
    compiler = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size)
    files = sorted(MASKBENCH.glob("*.json"))
    if only:  # a re-run of named schemas (file stems), e.g. the ones a full run failed
        files = [f for f in files if f.stem in only]
    chosen, skipped = [], 0
    for f in files:
        schema = json.loads(f.read_text())["schema"]
        try:
            compiled = compiler.compile(JsonSchema(schema, **TOOL_ARGUMENT_CAPS))
        except Exception:
            skipped += 1
            continue
        if compiled.warnings:
            skipped += 1
            continue
        chosen.append((f.name, schema, compiled))
        if len(chosen) == n:
            break
    stop = sorted(engine.eos_token_ids)

    async def one(name, schema, compiled):
        prompt = engine.chat_prompt([{"role": "user", "content": "Reply with JSON that matches this schema: "
                                      + json.dumps(schema)[:1500]}])
        matcher = Matcher(compiled, stop_token_ids=stop)
        matcher.close_by(max_tokens)
        out = await engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), matcher)
        try:
            jsonschema.validate(json.loads(out.text), schema)
            valid, error = True, ""
        except (ValueError, jsonschema.ValidationError) as exc:
            valid, error = False, str(exc)[:160]
        return {"schema": name, "finished": out.finish_reason == "stop", "valid": valid, "tokens": len(out.token_ids),
                "error": error}

    async def all_of_them():
        return await asyncio.gather(*(one(*c) for c in chosen))

    t0 = time.perf_counter()
    rows = asyncio.run(all_of_them())
    seconds = time.perf_counter() - t0
    result = {"model": model, "max_tokens": max_tokens, "schemas": len(rows), "skipped_with_warnings": skipped,
              "finished": sum(r["finished"] for r in rows), "valid": sum(r["valid"] for r in rows),
              "seconds": round(seconds, 1), "rows": rows, **machine(engine)}
    engine.close()
    return result


def print_table(result: dict) -> None:
    print(f"MaskBench compliance, {result['model']} ({where(result)}), max_tokens={result['max_tokens']}, greedy")
    print(f"  schemas {result['schemas']} (skipped: {result['skipped_with_warnings']} compile with a warning)")
    print(f"  finished {result['finished']}/{result['schemas']}, valid {result['valid']}/{result['schemas']}")
    for r in result["rows"]:
        if not (r["finished"] and r["valid"]):
            print(f"  FAIL {r['schema']}: finished={r['finished']} {r['error']}")


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("compliance", __doc__)
    ap.add_argument("-n", type=int, default=60, help="schemas (in file-name order)")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--only", nargs="+", metavar="STEM", help="just these schemas (file stems, e.g. BFCL_java_2)")
    args = ap.parse_args(argv)
    return report(run(args.model, args.n, args.max_tokens, args.device, args.dtype, args.only), print_table,
                  args.json)
