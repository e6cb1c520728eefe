"""`agentrt bench threads` on tiny-random: the JSON it writes and the pruning it measures."""

from __future__ import annotations

import json

from bench.threads import main


def test_bench_threads_writes_rows_for_pruning_off_and_on(tmp_path):
    out = tmp_path / "threads.json"
    assert main(["--model", "tiny-random", "--device", "cpu", "--tokens", "400", "--fracs", "0.0", "0.9",
                 "--buffer", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["target_frac"], r["pruning"]) for r in rows] == [(0.0, False), (0.0, True), (0.9, False),
                                                                  (0.9, True)]
    for r in rows:
        assert {"prunable_frac", "pruning", "tok_s", "peak_kv_tokens", "total_tokens"} <= r.keys()
    off, on = rows[2], rows[3]
    assert on["total_tokens"] == off["total_tokens"] and on["prunable_frac"] >= 0.85
    assert on["pruned_tokens"] > 0 and on["peak_kv_tokens"] < off["peak_kv_tokens"]
    assert rows[1]["pruned_tokens"] == 0 and rows[1]["peak_kv_tokens"] == rows[0]["peak_kv_tokens"]
