"""The multi-call cases: every one is answerable (its expected calls, in any order, score right and a
missing, extra or wrong call does not), and one run of `agentrt bench multicall` through the
in-process server on tiny-random."""

from __future__ import annotations

import json

import pytest

from bench import bfcl, multicall


def perfect(case: bfcl.Case) -> list[dict]:
    return [{"name": name, "arguments": {k: v[0] for k, v in args.items() if v[0] != ""}}
            for answer in case.answers for name, args in answer.items()]


@pytest.mark.parametrize("case", multicall.cases(), ids=lambda c: c.id)
def test_each_case_scores_its_own_calls_in_any_order_and_nothing_less(case):
    calls = perfect(case)
    assert 2 <= len(calls) <= 3 and case.category in ("parallel", "parallel_multiple")
    assert (case.category == "parallel") == (len({c["name"] for c in calls}) == 1)
    offered = {f["name"] for f in case.functions}
    assert {c["name"] for c in calls} <= offered
    assert bfcl.check_case(case.category, case.functions, calls[::-1], case.answers).ok
    assert bfcl.check_case(case.category, case.functions, calls[:-1], case.answers).kind == "wrong_count"
    assert not bfcl.check_case(case.category, case.functions, calls + calls[:1], case.answers).ok
    assert not bfcl.check_case(case.category, case.functions, [calls[0]] * len(calls), case.answers).ok


def test_limit_takes_the_first_cases_of_each_category():
    cases = multicall.cases(2)
    assert [c.category for c in cases] == ["parallel", "parallel", "parallel_multiple", "parallel_multiple"]
    assert len({c.id for c in multicall.cases()}) == len(multicall.CASES)


def test_a_run_on_tiny_random_scores_every_category(tmp_path, capsys):
    # the unconstrained arm only: the constrained one goes through the same `bfcl.serve_and_run` (test_bfcl runs
    # it), and compiling these five tools' grammar can take past the server's 30 s timeout on a loaded box
    out = tmp_path / "mc.json"
    assert multicall.main(["--model", "tiny-random", "--limit", "1", "--arm", "unconstrained", "--json", str(out),
                           "--max-tokens", "32"]) == 0
    rows = {(r["category"], r["arm"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("parallel", "unconstrained"), ("parallel_multiple", "unconstrained")}
    assert all(r["n"] == 1 for r in rows.values())
    assert "multi-call cases" in capsys.readouterr().out
