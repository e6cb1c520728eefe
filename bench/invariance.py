"""Invariance benchmark: does a request get the same tokens (and logprobs, bit for bit) alone on a fresh
engine, after unrelated requests (its prefix from the cache), and batched with 5 others — in the default
mode and in deterministic mode — and what does each mode cost.

Divergence: 6 chat prompts, 32 greedy tokens each. Cost, interleaved and best of --repeats: decode
ms/token at batch 1 and batch 6 (default vs deterministic), and prefill tokens/s of a 512-token chunk
by the batch-invariant kernels vs the fastest ones (`feed_sequence(..., exact=False)`).
Run: `agentrt bench invariance [--model smollm2-135m] [--dtype D] [--json OUT]` from the repo root.
"""

from __future__ import annotations

import asyncio
import time

import torch

from bench.common import machine, model_parser, report, where

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
             "How many legs does a spider have?", "Explain photosynthesis in one sentence.", "What is 17 times 23?"]
OTHERS = ["Tell me a joke about cats.", "What is the tallest mountain?", "List two prime numbers."]


def _engine(base, deterministic: bool):
    from agentrt.engine import Engine

    return Engine(base.model, base.tokenizer, eos_token_ids=sorted(base.eos_token_ids), name=base.name,
                  deterministic=deterministic)


def divergence(base, deterministic: bool, tokens: int) -> dict:
    from agentrt.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, logprobs=True)
    prompts = [base.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    fresh = []
    for p in prompts:
        with _engine(base, deterministic) as e:
            fresh.append(e.generate_sync(p, params))
    with _engine(base, deterministic) as e:
        for q in OTHERS:
            e.generate_sync(e.chat_prompt([{"role": "user", "content": q}]), params)
        after = [e.generate_sync(p, params) for p in prompts]
    with _engine(base, deterministic) as e:
        async def together():
            return await asyncio.gather(*[e.generate(p, params) for p in prompts])

        batched = asyncio.run(together())

    def differ(runs) -> dict:
        return {"tokens": sum(r.token_ids != f.token_ids for r, f in zip(runs, fresh)),
                "logprobs": sum(r.logprobs != f.logprobs for r, f in zip(runs, fresh))}

    return {"after": differ(after), "batched": differ(batched)}


def _decode_ms(engine, prompts: list[list[int]], tokens: int) -> float:
    """Wall ms per generated token per sequence, all sequences together (short prompts: decode-bound)."""
    from agentrt.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    async def go():
        return await asyncio.gather(*[engine.generate(p, params) for p in prompts])

    start = time.perf_counter()
    asyncio.run(go())
    return (time.perf_counter() - start) * 1000 / tokens


def _prefill_tok_s(engine, tokens: list[int], exact: bool) -> float:
    from agentrt.engine import feed_sequence
    from agentrt.engine.kv import KVSequence

    seq = KVSequence()
    start = time.perf_counter()
    feed_sequence(engine.model, engine.pool, seq, tokens, exact=exact)
    elapsed = time.perf_counter() - start
    engine.pool.free(seq)
    return len(tokens) / elapsed


def run(model: str, tokens: int, repeats: int, device: str | None, dtype: str | None) -> dict:
    from agentrt.engine import Engine

    base = Engine.load(model, device=device, dtype=dtype)
    result = {"model": model, **machine(base), "tokens": tokens,
              "default": divergence(base, False, tokens), "deterministic": divergence(base, True, tokens)}
    prompts = [base.chat_prompt([{"role": "user", "content": f"[{i}] Count to ten."}]) for i in range(6)]
    chunk = torch.randint(300, 20000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    timings: dict[str, list[float]] = {}
    engines = {m: _engine(base, m == "deterministic") for m in ("default", "deterministic")}
    for _ in range(repeats):  # interleaved: the machine's noise hits every arm alike
        for mode, e in engines.items():
            for batch in (1, 6):
                timings.setdefault(f"{mode} b{batch}", []).append(_decode_ms(e, prompts[:batch], 48))
        for exact in (True, False):
            timings.setdefault(f"prefill exact={exact}", []).append(_prefill_tok_s(engines["default"], chunk, exact))
    for e in engines.values():
        e.close()
    base.close()
    best = {k: (max(v) if k.startswith("prefill") else min(v)) for k, v in timings.items()}
    result["decode_ms_per_token"] = {k: round(v, 2) for k, v in best.items() if not k.startswith("prefill")}
    result["prefill_tok_s"] = {k.removeprefix("prefill "): round(v, 1) for k, v in best.items() if k.startswith("prefill")}
    return result


def print_table(r: dict) -> None:
    print(f"invariance — {r['model']} ({where(r)}), 6 prompts x {r['tokens']} greedy tokens")
    print(f"{'mode':14s} {'after others: tokens / logprobs differ':>40s} {'batched with 5: tokens / logprobs differ':>42s}")
    for mode in ("default", "deterministic"):
        a, b = r[mode]["after"], r[mode]["batched"]
        print(f"{mode:14s} {a['tokens']:>30d} / {a['logprobs']:<9d} {b['tokens']:>32d} / {b['logprobs']:<9d}")
    d = r["decode_ms_per_token"]
    for batch in (1, 6):
        base, det = d[f"default b{batch}"], d[f"deterministic b{batch}"]
        print(f"decode batch {batch}: default {base:.1f} ms/token, deterministic {det:.1f} ms/token ({det / base:.2f}x)")
    p = r["prefill_tok_s"]
    print(f"prefill 512 tokens: batch-invariant kernels {p['exact=True']:.0f} tok/s, fastest {p['exact=False']:.0f} "
          f"tok/s ({p['exact=False'] / p['exact=True']:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("invariance", __doc__, repeats=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    result = run(args.model, args.tokens, args.repeats, args.device, args.dtype)
    return report(result, print_table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
