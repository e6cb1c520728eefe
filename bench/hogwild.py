"""Hogwild! benchmark: N workers in one batched forward vs one worker, same model, same task.

For N = 1, 2, 4, 8 (greedy, collaboration prompts on): aggregate generated tokens/s over the decode
steps, and wall time (prefill included) until all workers together have generated `--tokens` tokens.
Beside each row, the engine decoding N independent requests of the task prompt (the batching ceiling).
Prints a table with the speedup over one worker; `--json OUT` writes {"model", "device", "threads",
"total_tokens", "rows": [{"workers", "tok_s", "wall_s", "engine_tok_s", ...}]}.
Run: `agentrt bench hogwild [--model smollm2-135m] [--tokens 192] [--workers 1 2 4 8] [--json OUT]`.
"""

from __future__ import annotations

import asyncio
import time


from bench.common import machine, model_parser, report, where

TASK = ("Plan a three-day trip to Rome for a family of four on a budget: list the sights for each day, "
        "where to eat, how to get around, and estimate the total cost.")


def measure(engine, workers: int, tokens: int) -> dict:
    from agentrt.engine.hogwild import HogwildPool

    pool = HogwildPool(engine, workers, max_step_tokens=64)
    t0 = time.perf_counter()
    try:
        pool.start(TASK, max_tokens=tokens)
        t1 = time.perf_counter()
        while pool.step():
            pass
        t2 = time.perf_counter()
        done = pool.result()
    finally:
        pool.close()
    return {"workers": workers, "tok_s": round(done.generated_tokens / (t2 - t1), 2), "wall_s": round(t2 - t0, 3),
            "tokens": done.generated_tokens, "steps": done.steps, "finish_reason": done.finish_reason}


def engine_batch(engine, workers: int, tokens: int) -> float:
    """Reference: the engine decoding `workers` independent requests of the same prompt (tokens/s)."""
    from agentrt.engine.hogwild import CollaborationPrompts
    from agentrt.engine.sampling import SamplingParams

    system = CollaborationPrompts().system(workers)  # the same prompt length as the hogwild run
    prompt = engine.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": TASK}])
    params = SamplingParams(max_tokens=max(2, tokens // workers), ignore_eos=True)

    async def one(i):
        stamps = []
        async for out in engine.stream(prompt + [i], params):  # differ in the last token: no shared decode
            stamps.extend(time.perf_counter() for _ in out.token_ids)
        return stamps

    async def together():
        return await asyncio.gather(*(one(i) for i in range(workers)))

    stamps = asyncio.run(together())
    start = max(s[0] for s in stamps)  # every request past its prefill
    done = sum(1 for s in stamps for t in s if t > start)
    return done / (max(s[-1] for s in stamps) - start)


def run(model: str, tokens: int, workers: list[int], repeats: int, device: str | None,
        dtype: str | None = None) -> dict:
    from agentrt.engine import Engine

    engine = Engine.load(model, device=device, dtype=dtype)
    try:
        measure(engine, 2, 16)  # warm-up
        runs: dict[int, list[dict]] = {n: [] for n in workers}
        refs: dict[int, list[float]] = {n: [] for n in workers}
        for _ in range(repeats):  # interleaved, best of: the machine may be shared
            for n in workers:
                runs[n].append(measure(engine, n, tokens))
                refs[n].append(engine_batch(engine, n, tokens))
        rows = [{**max(runs[n], key=lambda r: r["tok_s"]), "engine_tok_s": round(max(refs[n]), 2)} for n in workers]
        assert engine.pool.num_in_use == 0
    finally:
        engine.close()
    return {"model": model, **machine(engine),
            "total_tokens": tokens, "repeats": repeats, "rows": rows}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"hogwild: {result['model']} ({where(result)}), "
                    f"{result['total_tokens']} tokens in total, best of {result['repeats']}")
    for col in ("workers", "tok/s", "wall s", "batched steps", "tok/s vs 1 worker", "wall vs 1 worker",
                "engine, N requests: tok/s"):
        t.add_column(col, justify="right")
    one = next((r for r in result["rows"] if r["workers"] == 1), None)
    for r in result["rows"]:
        speed = f"{r['tok_s'] / one['tok_s']:.2f}x" if one else "-"
        wall = f"{one['wall_s'] / r['wall_s']:.2f}x" if one else "-"
        t.add_row(str(r["workers"]), f"{r['tok_s']:.1f}", f"{r['wall_s']:.2f}", str(r["steps"]), speed, wall,
                  f"{r['engine_tok_s']:.1f}")
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("hogwild", __doc__, repeats=2)
    ap.add_argument("--tokens", type=int, default=192, help="total generated tokens, all workers together")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args(argv)
    result = run(args.model, args.tokens, args.workers, args.repeats, args.device, args.dtype)
    return report(result, print_table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
