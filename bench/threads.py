"""Thread-mode benchmark: the same long reasoning trees with subtask pruning off and on (TIM/TIMRUN).

For each target prunable fraction (0, 0.5, 0.9 of the generated tokens inside subtask lists), one tree
shape is forced by the grammar (`agentrt.threads.TreeShape`: the structure is forced, every text is
sampled digits, one token each), sized to about `--tokens` generated tokens, and decoded with pruning off
and on: the two runs generate exactly the same number of tokens. Reports decode tokens/s (all generated
tokens, sampled and forced, from the first to the last) and peak live KV tokens (prompt included).
`--json OUT` writes {"model", "device", "threads", "buffer", "rows": [{"prunable_frac", "pruning", "tok_s",
"peak_kv_tokens", "total_tokens", ...}]}.
Run: `agentrt bench threads [--model smollm2-135m] [--tokens 3000] [--buffer 1] [--json OUT]`.
"""

from __future__ import annotations


import anyio

from bench.common import machine, model_parser, report, where

# (target fraction) -> (top-level task chars, subtasks per top task, leaves per subtask, subtask chars)
FAMILIES = {0.0: (8, 0, 0, 0), 0.5: (4, 1, 0, 4), 0.9: (4, 3, 3, 4)}


def top_task(frac: float):
    from agentrt.threads import ShapeTask

    top, mid, leaves, chars = FAMILIES[frac]
    subtasks = [ShapeTask(chars, subtasks=[ShapeTask(chars) for _ in range(leaves)] or None)
                for _ in range(mid)]
    return ShapeTask(top, subtasks=subtasks or None)


def tree_for(engine, frac: float, tokens: int):
    """A tree of repeated top-level tasks of the family of `frac`, about `tokens` tokens long."""
    import json

    from agentrt.threads import TREE_SEPARATORS, TreeShape

    task = top_task(frac)
    sample = json.dumps(_render(task), separators=TREE_SEPARATORS)
    per_task = len(engine.tokenizer.encode(sample, add_special_tokens=False))
    return TreeShape([task] * max(1, round(tokens / per_task)))


def _render(t) -> dict:
    return {"thought": "1" * t.chars, "tooluse": None,
            "subtasks": None if t.subtasks is None else [_render(s) for s in t.subtasks],
            "conclusion": "1" * t.chars}


def measure(backend, shape, pruning: bool, buffer: int) -> dict:
    from agentrt.engine.sampling import SamplingParams
    from agentrt.threads import ThreadOptions, run_thread

    options = ThreadOptions(pruning=pruning, buffer=buffer)
    r = anyio.run(lambda: run_thread(backend, "Write the tree.", [], options=options, constraint=shape,
                                     params=SamplingParams(max_tokens=100_000)))
    if not r.complete:
        r.raise_for_incomplete()
    s = r.stats
    return {"pruning": pruning, "tok_s": round(s.tok_s, 2), "peak_kv_tokens": s.peak_kv_tokens,
            "total_tokens": s.generated_tokens, "prompt_tokens": s.prompt_tokens,
            "prunable_frac": round(s.prunable_tokens / s.generated_tokens, 3),
            "pruned_tokens": s.pruned_tokens,
            "recomputed_tokens": s.recomputed_tokens, "rerotated_tokens": s.rerotated_tokens,
            "seconds": round(s.decode_seconds, 2)}


def run(model: str, tokens: int, fracs: list[float], buffer: int, repeats: int, device: str | None,
        dtype: str | None = None) -> dict:
    from agentrt.backends import LocalBackend
    from agentrt.engine import Engine

    engine = Engine.load(model, device=device, dtype=dtype)
    backend = LocalBackend(engine)
    rows = []
    try:
        measure(backend, tree_for(engine, 0.5, 100), True, buffer)  # warm-up
        for frac in fracs:
            shape = tree_for(engine, frac, tokens)
            runs = {False: [], True: []}
            for _ in range(repeats):  # interleaved: the machine may be shared
                for pruning in (False, True):
                    runs[pruning].append(measure(backend, shape, pruning, buffer))
            for pruning in (False, True):
                best = max(runs[pruning], key=lambda r: r["tok_s"])
                rows.append({"target_frac": frac, **best})
        assert engine.pool.num_in_use == 0
    finally:
        engine.close()
    return {"model": model, **machine(engine),
            "buffer": buffer, "tokens": tokens, "repeats": repeats, "rows": rows}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"threads: {result['model']} ({where(result)}), "
                    f"pruning buffer {result['buffer']}, best of {result['repeats']}")
    for col in ("prunable", "pruning", "tokens", "tok/s", "x off", "peak KV", "x off", "pruned", "recomp."):
        t.add_column(col, justify="right")
    off = {r["target_frac"]: r for r in result["rows"] if not r["pruning"]}
    for r in result["rows"]:
        base = off[r["target_frac"]]
        t.add_row(f"{r['prunable_frac']:.2f}", "on" if r["pruning"] else "off", str(r["total_tokens"]),
                  f"{r['tok_s']:.1f}", f"{r['tok_s'] / base['tok_s']:.2f}x", str(r["peak_kv_tokens"]),
                  f"{r['peak_kv_tokens'] / base['peak_kv_tokens']:.0%}", str(r["pruned_tokens"]),
                  str(r["recomputed_tokens"]))
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("threads", __doc__, repeats=1)
    ap.add_argument("--tokens", type=int, default=3000, help="generated tokens per tree (about)")
    ap.add_argument("--fracs", type=float, nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    ap.add_argument("--buffer", type=int, default=1, help="closed subtask lists kept (TIM's pruning buffer)")
    args = ap.parse_args(argv)
    result = run(args.model, args.tokens, args.fracs, args.buffer, args.repeats, args.device, args.dtype)
    return report(result, print_table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
