"""Where a decode step goes: the model's forward for one step of B decoding rows (no scheduling, sampling
or streaming), timed, then a torch.profiler table of its ops (self CPU time), per --quant.

Run: `python -m bench.step_profile [--quant gguf none] [--batch 1] [--context 100] [--steps 10]`.
A quant mode may name a path: `gguf:plain` runs quantized decode steps through forward's general path
instead of the quantized decode step, `gguf:uncapped` runs that step on torch's own thread count.
Times are wall clock and this process's CPU time (the latter moves less on a busy machine).
"""

from __future__ import annotations

import statistics
import time

import torch

from agentrt.engine.kv import KVSequence
from agentrt.engine.scheduler import Work
from bench.common import model_parser


def step_fn(engine, batch: int, context: int):
    """A function running one decode step of `batch` rows over `context` cached tokens each."""
    pool = engine.pool
    seqs = [KVSequence() for _ in range(batch)]
    for s in seqs:
        pool.append(s, context)
    work = [Work.decode(s, 11) for s in seqs]

    def step() -> int:
        logits = engine.model(engine.runner.build_batch(work), pool.k, pool.v)
        return int(logits.argmax(-1)[0])  # the host sync a sampler makes

    return step


def load(engine_cls, args, mode: str):
    """An engine for a --quant mode: "QUANT" or "QUANT:plain" / "QUANT:uncapped" (see the module doc)."""
    quant, _, path = mode.partition(":")
    engine = engine_cls.load(args.model, device=args.device, dtype=args.dtype, quant=quant)
    if path == "plain":
        engine.model.quantized_decode = False
    elif path == "uncapped":
        engine.model.kernel_threads = None
    elif path:
        raise SystemExit(f"unknown path {path!r} in --quant {mode} (plain or uncapped)")
    return engine


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from agentrt.engine import Engine

    ap = model_parser("step_profile", __doc__)
    ap.add_argument("--quant", nargs="+", default=["gguf", "none"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20, help="ops in each table")
    args = ap.parse_args(argv)
    steps = {q: step_fn(load(Engine, args, q), args.batch, args.context) for q in args.quant}
    times: dict[str, list[float]] = {q: [] for q in steps}
    cpu: dict[str, list[float]] = {q: [] for q in steps}
    for f in steps.values():
        f()
    for _ in range(3 * args.steps):  # interleaved
        for q, f in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            times[q].append(time.perf_counter() - t0)
            cpu[q].append(time.process_time() - c0)
    print(f"{args.model}, batch {args.batch}, context {args.context}, {torch.get_num_threads()} threads")
    for q, f in steps.items():
        print(f"quant {q}: step median {statistics.median(times[q]) * 1000:.1f} ms, min {min(times[q]) * 1000:.1f} ms; "
              f"CPU time median {statistics.median(cpu[q]) * 1000:.1f} ms")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                f()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
