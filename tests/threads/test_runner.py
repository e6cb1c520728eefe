"""Thread mode end to end on the engine: tools inside the inference, pruning, errors, the remote fallback."""

from __future__ import annotations

import math

import anyio
import jsonschema
import pytest

from agentrt.errors import ContextLengthError, InvalidRequestError
from agentrt.engine.sampling import SamplingParams
from agentrt.threads import ShapeTask, ThreadOptions, ThreadSchema, TreeShape, run_thread
from agentrt.tools import calculator, tool
from agentrt.tools._calculator import evaluate

BIG = SamplingParams(max_tokens=20000)


@tool
def boom(x: int) -> int:
    """Always fails."""
    raise RuntimeError("kaput")


@tool(timeout=0.05)
async def stuck(x: int) -> int:
    """Never finishes in time."""
    await anyio.sleep(30)
    return x


def shape(top: int, mid: int, leaves: int, calls=()) -> TreeShape:
    """`top` tasks (the first ones calling `calls`), each with `mid` subtasks of `leaves` subtasks each."""
    mids = [ShapeTask(1, subtasks=[ShapeTask(1)] * leaves)] * mid
    tasks = [ShapeTask(1, subtasks=list(mids)) for _ in range(top)]
    for t, call in zip(tasks, calls):
        t.tool = call
    return TreeShape(tasks)


def count_tasks(tasks) -> int:
    return sum(1 + count_tasks(t["subtasks"] or []) for t in tasks)


def run(backend, tools, **kwargs):
    events = []
    kwargs.setdefault("params", BIG)
    result = anyio.run(lambda: run_thread(backend, "q", tools, on_event=events.append, **kwargs))
    return result, events


def test_a_real_calculator_call_writes_its_true_result_into_the_tree(tiny_backend):
    calls = [("calculator", {"expression": "6*7"}), ("calculator", {"expression": "sqrt(2) ** 3"})]
    r, events = run(tiny_backend, [calculator], constraint=shape(2, 1, 1, calls))
    assert r.complete and r.finish_reason == "stop"
    uses = [t["tooluse"] for t in r.tree["reasoning"]]
    assert [u["tool_result"] for u in uses] == [42, evaluate("sqrt(2) ** 3")]
    assert [c.result.value for c in r.tool_calls] == [42, evaluate("sqrt(2) ** 3")]
    kinds = [e.kind for e in events if e.path == (0,)]
    assert kinds.index("tool_call") < kinds.index("tool_end") < kinds.index("tool_result")
    assert r.stats.tool_calls == 2 and r.stats.injected_tokens > 0
    assert tiny_backend.engine.pool.num_in_use == 0


def test_tool_failures_timeouts_and_unknown_tools_become_error_results(tiny_backend):
    calls = [("boom", {"x": 1}), ("stuck", {"x": 1}), ("nope", {"x": 1})]
    r, _ = run(tiny_backend, [boom, stuck], constraint=shape(3, 0, 0, calls))
    results = [t["tooluse"]["tool_result"] for t in r.tree["reasoning"]]
    assert results[0] == {"error": "RuntimeError: kaput", "kind": "error"}
    assert results[1]["kind"] == "timeout" and "0.05" in results[1]["error"]
    assert results[2]["kind"] == "error" and "unknown tool 'nope'" in results[2]["error"]


def test_other_sequences_keep_decoding_while_a_tool_runs(tiny_backend):
    engine = tiny_backend.engine
    other_done = anyio.Event()

    @tool
    async def wait_for_other(x: int) -> int:
        """Returns once the other request has finished."""
        await other_done.wait()
        return x

    async def go():
        async with anyio.create_task_group() as tg:
            out = {}

            async def thread():
                out["thread"] = await run_thread(tiny_backend, "q", [wait_for_other], params=BIG,
                                                 constraint=shape(1, 1, 1, [("wait_for_other", {"x": 7})]))

            tg.start_soon(thread)
            with anyio.fail_after(60):  # a blocked engine never finishes the other request
                out["other"] = await engine.generate([5, 6, 7], SamplingParams(max_tokens=40,
                                                                                ignore_eos=True))
            other_done.set()
        return out

    out = anyio.run(go)
    assert len(out["other"].token_ids) == 40
    assert out["thread"].tree["reasoning"][0]["tooluse"]["tool_result"] == 7


def test_pruning_bounds_live_kv_while_the_tree_grows_tenfold(tiny_backend):
    small, _ = run(tiny_backend, [], constraint=shape(1, 6, 6), options=ThreadOptions(buffer=0))
    big_shape = shape(10, 6, 6)
    big, events = run(tiny_backend, [], constraint=big_shape, options=ThreadOptions(buffer=0))
    assert big.complete and big.stats.generated_tokens >= 9.5 * small.stats.generated_tokens
    assert big.stats.peak_kv_tokens < 2 * small.stats.peak_kv_tokens  # grows by the top tasks' summaries only
    assert big.stats.peak_kv_tokens < 0.1 * (big.stats.prompt_tokens + big.stats.generated_tokens)
    assert big.stats.prunable_tokens >= 0.9 * big.stats.generated_tokens
    assert sum(e.kind == "prune" for e in events) == big.stats.prunes == 10 * 7
    # the text returned is the whole tree: pruning changed only what the model attended to
    assert count_tasks(big.tree["reasoning"]) == sum(t.count() for t in big_shape.tasks)
    # without pruning the same tree does not fit the context: a clear error
    unpruned, _ = run(tiny_backend, [], constraint=big_shape, options=ThreadOptions(pruning=False))
    assert not unpruned.complete and unpruned.cut_by == "context"
    with pytest.raises(ContextLengthError, match="live context"):
        unpruned.raise_for_incomplete()
    assert tiny_backend.engine.pool.num_in_use == 0


def test_a_random_model_writes_a_valid_tree_and_its_calls_are_real(tiny_backend, add):
    options = ThreadOptions(max_depth=2, max_text_chars=3, require_tool=True)
    params = SamplingParams(max_tokens=1500, temperature=1.0, seed=1)
    r, _ = run(tiny_backend, [add], options=options, params=params, max_number_digits=3)
    assert r.complete, r.text[-200:]
    jsonschema.validate(r.tree, ThreadSchema([add], max_depth=2).json_schema())
    assert r.tool_calls and r.tree["reasoning"][0]["tooluse"] is not None
    for c in r.tool_calls:
        if c.result.ok:
            assert c.result.value == c.arguments["a"] + c.arguments["b"]


def test_a_tree_cut_by_max_tokens_is_a_clear_error(tiny_backend):
    r, _ = run(tiny_backend, [], constraint=shape(3, 2, 2), params=SamplingParams(max_tokens=40))
    assert not r.complete and r.cut_by == "max_tokens" and r.tree is None
    with pytest.raises(InvalidRequestError, match="max_tokens=40") as err:
        r.raise_for_incomplete()
    assert err.value.param == "max_tokens"


def test_remote_backends_fall_back_to_tools_between_requests_without_pruning(tiny_backend, add):
    from agentrt.remote import RemoteBackend
    from agentrt.server import create_app
    from agentrt.testing import LiveServer

    live = LiveServer(create_app(tiny_backend.engine, model_names=["tiny-random"]))
    try:
        remote = RemoteBackend(live.base_url, "tiny-random")
        options = ThreadOptions(max_depth=2, max_text_chars=3, require_tool=True)
        params = SamplingParams(max_tokens=600, temperature=1.0, seed=2)
        r, events = run(remote, [add], options=options, params=params, max_number_digits=3)
        anyio.run(remote.aclose)
    finally:
        live.stop()
    assert r.complete and any("no pruning" in n for n in r.notes) and r.stats.prunes == 0
    first = r.tree["reasoning"][0]["tooluse"]
    assert first["tool_result"] == first["parameters"]["a"] + first["parameters"]["b"]
    assert sum(e.kind == "tool_end" for e in events) == len(r.tool_calls) >= 1
    assert not math.isnan(r.stats.decode_seconds)


def test_cancelling_a_run_during_a_tool_call_frees_its_paused_sequence(tiny_backend):
    engine = tiny_backend.engine

    @tool
    async def hang(x: int) -> int:
        """Never returns."""
        await anyio.sleep(3600)
        return x

    async def go():
        with anyio.CancelScope() as scope:
            async def on_event(ev) -> None:
                if ev.kind == "tool_call":
                    scope.cancel()

            await run_thread(tiny_backend, "q", [hang], params=BIG, on_event=on_event,
                             constraint=shape(1, 1, 1, [("hang", {"x": 1})]))
        assert scope.cancelled_caught
        for _ in range(500):  # the engine drops the request at its next command
            if engine.num_active == 0:
                break
            await anyio.sleep(0.01)

    anyio.run(go)
    assert engine.num_active == 0 and engine.pool.num_in_use == 0
