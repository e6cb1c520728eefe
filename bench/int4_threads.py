"""The int4 weight-only kernel against the dense fp32 GEMM at M = 1, on 1 and 2 threads, interleaved:
`python -m bench.int4_threads` (smollm2's 3072 x 576 MLP shape; median and min of 30 rounds, µs)."""

from __future__ import annotations

import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    k, n = 576, 3072
    x = torch.randn(1, k)
    w = torch.randn(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    scales_zeros = torch.randn(k // 32, n, 2).bfloat16()
    calls = {"fp32 dense F.linear": lambda: torch.nn.functional.linear(x, w),
             "int4 _weight_int4pack_mm_for_cpu (bf16)":
                 lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, scales_zeros)}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(30):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, fn in calls.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                times.setdefault((name, threads), []).append((time.perf_counter() - t0) / 20 * 1e6)
    for (name, threads), v in times.items():
        print(f"{name:45s} {threads} thread(s): median {statistics.median(v):8.1f} us, min {min(v):8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
