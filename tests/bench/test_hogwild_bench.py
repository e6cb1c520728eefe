"""`agentrt bench hogwild` on tiny-random: the JSON it writes, interleaved runs, the run's dtype."""

from __future__ import annotations

import json

from bench.hogwild import main


def test_bench_hogwild_writes_a_row_per_worker_count(tmp_path):
    out = tmp_path / "hogwild.json"
    assert main(["--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--tokens", "24",
                 "--workers", "1", "2", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["device"], result["dtype"], result["repeats"]) == ("cpu", "float32", 2)
    assert [r["workers"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        assert r["tokens"] == 24 and r["finish_reason"] == "length"
        assert r["tok_s"] > 0 and r["engine_tok_s"] > 0 and r["steps"] >= 24 // r["workers"]
