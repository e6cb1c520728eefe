"""xgrammar (agentrt's grammar path) against llguidance on MaskBench: schemas compiled, compile time,
per-token mask time, and accept/reject agreement with each test instance's `valid` label.

Both see the same SmolLM2 tokenizer and the same instance text (compact separators, keys in the
schema's order, as tests/grammar/maskbench_eval.py lays it out). Run:
    python bench/llguidance_maskbench.py [--stride 20] [--json OUT] [--only agentrt xgrammar ...]
The `agentrt` run is the policy GrammarCompiler(backend="auto") applies, through the server's isolated
compiles: xgrammar unless it would drop a keyword llguidance enforces, cannot take the schema, or
compiles past --fallback-after seconds; it reports which backend served how many schemas.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "grammar"))

from maskbench_eval import maskbench_files, percentile, serialise

log = logging.getLogger("bench.llguidance_maskbench")
MAX_TOKENS = 256  # mask timings per instance
# bench/results/llguidance_maskbench.json: --stride 20 (49 schemas) on 2 busy shared cores, llguidance 1.9.1,
# xgrammar 0.2.9. llguidance compiles in ms (p95 12-14 ms against xgrammar's 8.4 s) and agrees as well
# or better (100% on the 39 schemas it accepts strictly); xgrammar's masks are faster (p99 104 us
# against 470-1030 us: llguidance builds its lexer lazily, during the masks).


def run_xgrammar(cases, tok) -> dict:
    from agentrt.engine.constraint import allocate_bitmask
    from agentrt.errors import GrammarError
    from agentrt.grammar import CompileCache, GrammarCompiler, JsonSchema

    compiler = GrammarCompiler(tok, vocab_size=49152, cache=CompileCache(max_bytes=64 << 20))
    bitmask = allocate_bitmask(1, 49152)
    stats = _Stats()
    for name, case in cases:
        t0 = time.perf_counter()
        try:
            compiled = compiler.compile(JsonSchema(case["schema"], allow_undeclared=True))
        except GrammarError:
            stats.failed.append(name)
            continue
        stats.compile.append(time.perf_counter() - t0)
        for test in case["tests"]:
            m = compiled.matcher()
            ok = _walk(stats, tok, test, case, lambda: m.fill_next_token_bitmask(bitmask, 0), m.accept_token)
            stats.vote(bool(test["valid"]), ok and m.accept_token(tok.eos_token_id))
    return stats.summary()


def run_agentrt(cases, tok, *, timeout: float, fallback_after: float) -> dict:
    """agentrt's own choice per schema (GrammarCompiler backend="auto", isolated compiles as the server
    runs them): which backend served each schema, and the same counts as the runs above."""
    import anyio

    from agentrt.engine.constraint import allocate_bitmask
    from agentrt.errors import AgentrtError
    from agentrt.grammar import CompileCache, GrammarCompiler, JsonSchema

    compiler = GrammarCompiler(tok, vocab_size=49152, cache=CompileCache(max_bytes=64 << 20), isolate=True,
                               timeout=timeout, fallback_after=fallback_after)
    compiler.pool.prestart()
    bitmask = allocate_bitmask(1, 49152)
    stats = _Stats()

    async def compile_one(schema):
        return await compiler.compile_async(JsonSchema(schema, allow_undeclared=True))

    for name, case in cases:
        t0 = time.perf_counter()
        try:
            compiled = anyio.run(compile_one, case["schema"])
        except AgentrtError:
            stats.failed.append(name)
            continue
        stats.compile.append(time.perf_counter() - t0)
        stats.served[compiled.backend] = stats.served.get(compiled.backend, 0) + 1
        log.info("%s: %s in %.2fs", name, compiled.backend, stats.compile[-1])
        for test in case["tests"]:
            m = compiled.matcher()
            ok = _walk(stats, tok, test, case, lambda: m.fill_next_token_bitmask(bitmask, 0), m.accept_token)
            stats.vote(bool(test["valid"]), ok and m.accept_token(tok.eos_token_id))
    compiler.pool.close()
    return stats.summary()


def run_llguidance(cases, tok, *, lenient: bool = False) -> dict:
    """`lenient`: approximate oneOf by anyOf and ignore keywords it cannot enforce (what xgrammar does,
    with our warnings); otherwise such a schema counts as not compiled."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=49152)
    bitmask = llt.allocate_token_bitmask(1, lltok.vocab_size)
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
               "coerce_one_of": lenient, "lenient": lenient}
    stats = _Stats()
    for name, case in cases:
        t0 = time.perf_counter()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(case["schema"], defaults=options)
            m0 = llguidance.LLMatcher(lltok, grammar, log_level=0)
        except (ValueError, RuntimeError):
            stats.failed.append(name)
            continue
        if m0.is_error():
            stats.failed.append(name)
            continue
        stats.compile.append(time.perf_counter() - t0)
        for test in case["tests"]:
            m = m0.deep_copy()
            ok = _walk(stats, tok, test, case, lambda: llt.fill_next_token_bitmask(m, bitmask, 0), m.consume_token)
            stats.vote(bool(test["valid"]), ok and m.is_accepting())
    return stats.summary()


def _walk(stats, tok, test: dict, case: dict, fill, accept) -> bool:
    """Feed one MaskBench instance's tokens to a matcher (`fill` its mask, then `accept` the token), the
    first MAX_TOKENS masks timed into `stats`; whether every token was accepted."""
    ids = tok.encode(serialise(test["data"], case["schema"])[0], add_special_tokens=False)
    for k, t in enumerate(ids):
        if k < MAX_TOKENS:
            t1 = time.perf_counter()
            fill()
            stats.mask.append(time.perf_counter() - t1)
        if not accept(t):
            return False
    return True


class _Stats:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.compile: list[float] = []
        self.mask: list[float] = []
        self.agree = self.total = 0
        self.loose = self.tight = 0  # invalid accepted / valid rejected
        self.served: dict[str, int] = {}  # backend -> schemas it served (agentrt's policy only)

    def vote(self, valid: bool, accepted: bool) -> None:
        self.total += 1
        self.agree += valid == accepted
        self.loose += (not valid) and accepted
        self.tight += valid and not accepted

    def summary(self) -> dict:
        ms = [1e3 * x for x in self.compile]
        us = [1e6 * x for x in self.mask]
        return {
            "compiled": len(self.compile), "failed": len(self.failed),
            "compile_ms_p50": round(percentile(ms, 0.5), 2), "compile_ms_p95": round(percentile(ms, 0.95), 2),
            "compile_ms_max": round(max(ms, default=0), 1),
            "mask_us_mean": round(statistics.fmean(us), 1) if us else 0,
            "mask_us_p50": round(percentile(us, 0.5), 1), "mask_us_p99": round(percentile(us, 0.99), 1),
            "instances": self.total, "agreement": round(self.agree / max(1, self.total), 4),
            "invalid_accepted": self.loose, "valid_rejected": self.tight,
            **({"served": self.served} if self.served else {}),
        }


def main() -> None:
    from agentrt.engine.models import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stride", type=int, default=20, help="every n-th MaskBench schema (1: all 980)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", nargs="*", default=None, help="runs to do (llguidance, llguidance_lenient, xgrammar, agentrt)")
    p.add_argument("--timeout", type=float, default=30.0, help="agentrt run: the compile deadline")
    p.add_argument("--fallback-after", type=float, default=5.0, help="agentrt run: xgrammar's share of it")
    p.add_argument("--verbose", action="store_true", help="log each schema's compile (agentrt run)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    if args.verbose:  # each schema's compile time and backend, and the grammar workers' events
        for name in ("bench.llguidance_maskbench", "agentrt.grammar"):
            logging.getLogger(name).setLevel(logging.INFO)
    tok = load_tokenizer("tiny-random")
    cases = [(f.name, json.loads(f.read_text())) for f in maskbench_files(args.stride)]
    out: dict = {"schemas": len(cases)}
    runs = {"llguidance": run_llguidance, "llguidance_lenient": lambda c, t: run_llguidance(c, t, lenient=True),
            "xgrammar": run_xgrammar,
            "agentrt": lambda c, t: run_agentrt(c, t, timeout=args.timeout, fallback_after=args.fallback_after)}
    for name, run in runs.items():
        if args.only is not None and name not in args.only:
            continue
        out[name] = run(cases, tok)
        print(name, json.dumps(out[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
