"""Hogwild! worker pool: views over shared pages give the logits of their text, pages come back,
one worker is plain generation, and the collaboration loop stops where it says it does."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import pytest
import torch

from agentrt.engine.runner import chunk_group, feed_sequence
from agentrt.errors import KVCacheError
from agentrt.engine.hogwild import CollaborationPrompts, HogwildPool, ViewRecord
from agentrt.engine.kv import KVPool, KVSequence
from agentrt.engine.model import BatchInput
from agentrt.engine.sampling import SamplingParams

SAMPLED = SamplingParams(temperature=1.0, seed=3)  # random weights: greedy would repeat one token
TASK = "List three prime numbers and check them."


def _ref_pool(model, tokens: int) -> KVPool:
    cfg = model.cfg
    return KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_pages=tokens // 16 + 2, page_size=16)


def fresh_prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of `ids` fed from scratch (plain causal prefill) at dense positions 0..n-1."""
    pool, seq, n = _ref_pool(model, len(ids)), KVSequence(), len(ids)
    batch = BatchInput(torch.tensor(ids), torch.arange(n), pool.append(seq, n), [chunk_group(pool, seq, 0, n)],
                       torch.tensor([n - 1]))
    return model(batch, pool.k, pool.v)[0]


def dense_copy_logits(model, pool: KVPool, view: ViewRecord) -> torch.Tensor:
    """Next-token logits of the view's last token over a plain sequence holding the view's cached K/V
    (copied, keys re-rotated to dense positions): an ordinary forward, no hogwild machinery."""
    n = len(view.token_ids) - 1
    ref = _ref_pool(model, n + 1)
    seq = KVSequence()
    dst, src = ref.append(seq, n), view.slots[:n]
    ref.k[:, dst] = model.rotary.rotate_by(view.keys[:, :n], torch.arange(n) - view.stored_positions[:n])
    ref.v[:, dst] = pool.v[:, src]
    return feed_sequence(model, ref, seq, [view.token_ids[-1]], positions=[n])[-1]


def run_with_views(engine, check, workers: int = 3, steps: int = 14, fused: bool = False) -> int:
    """Step a collaboration run, calling check(view) for every worker's view after every forward."""
    pool = HogwildPool(engine, workers, max_step_tokens=3, prompts=CollaborationPrompts(check_every=4),
                       trace=True, fused=fused)
    pool.start(TASK, max_tokens=1000, params=SAMPLED)
    checked = 0
    try:
        for _ in range(steps):
            assert pool.step()
            for view in pool.views:
                if view.worker >= 0:
                    check(view)
                    checked += 1
        text = engine.tokenizer.decode(pool.view_ids(0))
        # finished steps of every worker have joined the common history, before the unfinished ones
        history, _, mine = text.rpartition("### Work in progress (others)")
        assert all(f"**{n} [2]:**" in history for n in ("Alice", "Bob", "Carol"))
        assert mine.rsplit("### Work in progress (own)", 1)[1].lstrip().startswith("**Alice [")
    finally:
        pool.close()
    assert engine.pool.num_in_use == 0
    return checked


@pytest.fixture
def one_layer_engine(tiny_parts, make_engine):
    from agentrt.engine import Engine

    model, tok, eos = tiny_parts
    shallow = copy.deepcopy(model)
    shallow.layers = torch.nn.ModuleList(list(shallow.layers)[:1])
    shallow.cfg = dataclasses.replace(shallow.cfg, num_layers=1)
    engine = Engine(shallow, tok, eos_token_ids=eos)
    yield engine
    engine.close()


@pytest.fixture(params=["plain", "cascade", "fused"])
def path(request, monkeypatch):
    """plain: attention groups gathering each view's keys and re-rotating the moved ones; cascade: the
    same, with the history the views share read once for all of them (CPU); fused: the views as slot
    tables with key deltas through the fused step (what runs on a GPU, in CUDA graphs)."""
    import agentrt.engine.model

    calls = []
    cascade = agentrt.engine.model._cascade
    monkeypatch.setattr(agentrt.engine.model, "_cascade", lambda *a: calls.append(1) or cascade(*a))
    monkeypatch.setattr(agentrt.engine.model, "CASCADE_FROM", 1 if request.param == "cascade" else 10**9)
    yield request.param
    assert bool(calls) == (request.param == "cascade")  # each path ran as named


def test_views_give_the_logits_of_a_fresh_prefill_of_their_text(one_layer_engine, path):
    # One layer: a token's K/V depend on nothing but the token and its position, so the view's logits
    # must equal a fresh prefill of the view's tokens at dense positions, whatever each token saw.
    engine = one_layer_engine

    def check(view):
        want = fresh_prefill_logits(engine.model, view.token_ids)
        assert (view.logits - want).abs().max() <= 1e-4

    assert run_with_views(engine, check, fused=path == "fused") >= 30


def test_views_equal_a_plain_forward_over_their_cached_kv(tiny_engine, path):
    # Any depth: the batched, padded, re-rotated forward equals an ordinary forward over the same
    # cached K/V laid out densely (deeper K/V keep the context their writer saw: see agentrt.engine.hogwild).
    def check(view):
        want = dense_copy_logits(tiny_engine.model, tiny_engine.pool, view)
        assert (view.logits - want).abs().max() <= 1e-4

    assert run_with_views(tiny_engine, check, fused=path == "fused") >= 30


def test_finished_steps_join_the_history_at_dense_positions(tiny_engine):
    # A step's tokens are written at their writer's view positions, which jump whenever another
    # worker's step (placed before it) grows. Joining must move every token onto the history's dense
    # positions, once: otherwise each view re-rotates the whole history in every layer and step.
    header = tiny_engine.tokenizer.encode(CollaborationPrompts().others_header, add_special_tokens=False)
    joined = []

    def check(view):
        ids = view.token_ids
        history = max(i for i in range(len(ids)) if ids[i:i + len(header)] == header)
        assert torch.equal(view.stored_positions[:history], torch.arange(history))
        joined.append(history)

    run_with_views(tiny_engine, check)
    assert max(joined) > min(joined)  # steps did join during the run


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_one_worker_is_plain_generation(tiny_engine, params):
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": TASK}])
    want = tiny_engine.generate_sync(prompt, dataclasses.replace(params, max_tokens=40)).token_ids
    out = HogwildPool(tiny_engine, 1, collaborate=False, max_step_tokens=3).run_sync(
        prompt, max_tokens=40, params=params)
    assert out.token_ids[0] == want
    assert tiny_engine.pool.num_in_use == 0


def test_all_workers_share_one_forward_per_step(tiny_engine):
    calls = []
    hook = tiny_engine.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = HogwildPool(tiny_engine, 4, max_step_tokens=8).run_sync(TASK, max_tokens=64, params=SAMPLED)
    finally:
        hook.remove()
    assert out.finish_reason == "length" and out.generated_tokens == 64
    # 16 decode steps, plus the prompt, headers, step boundaries and the finisher's answer
    assert out.steps < 64 // 4 + 16
    assert len(calls) <= out.steps + 1 + 64 + 1
    assert tiny_engine.pool.num_in_use == 0


def test_workers_are_named_and_asked_about_redundant_work(tiny_engine):
    prompts = CollaborationPrompts(check_every=6)
    out = HogwildPool(tiny_engine, 2, prompts=prompts, max_step_tokens=5).run_sync(
        TASK, max_tokens=60, params=SAMPLED)
    alice, bob = out.texts
    assert alice.startswith("**Alice [1]:** Hi, I'm Alice.") and bob.startswith("**Bob [1]:** Hi, I'm Bob.")
    assert "**Alice [3]:** " in alice and "**Bob [3]:** " in bob
    assert "am I doing redundant work? (yes/no): " in alice
    assert out.answer is not None  # no worker answered: the finisher did
    assert "**Alice [1]:**" in out.transcript and "**Bob [1]:**" in out.transcript


@dataclasses.dataclass
class FixedSystem(CollaborationPrompts):
    def system(self, workers: int) -> str:  # the marker must not change the prompt between the two runs
        return "Work together."


def test_a_worker_answer_ends_the_run(tiny_engine):
    free = HogwildPool(tiny_engine, 2, prompts=FixedSystem(answer_marker="@@never@@"), max_step_tokens=6)
    first = free.run_sync(TASK, max_tokens=80, params=SAMPLED)
    bob_step2 = first.texts[1].split("**Bob [2]:** ")[1].split("**Bob [3]:**")[0]
    marker = bob_step2[:4]
    assert marker.strip() and marker not in first.texts[1].split("**Bob [2]:** ")[0]
    pool = HogwildPool(tiny_engine, 2, prompts=FixedSystem(answer_marker=marker), max_step_tokens=6)
    out = pool.run_sync(TASK, max_tokens=80, params=SAMPLED)
    assert out.finish_reason == "answer" and out.generated_tokens < first.generated_tokens
    assert out.answer == bob_step2.split(marker, 1)[1].strip()
    assert tiny_engine.pool.num_in_use == 0


class DigitsThenEnd:
    """A real TokenConstraint: three digit tokens, then the end-of-sequence token."""

    def __init__(self, digits: list[int], eos: int) -> None:
        self.digits, self.eos, self.accepted = digits, eos, []

    def fill_next_token_bitmask(self, bitmask, index):
        bitmask[index] = 0
        for t in (self.digits if len(self.accepted) < 3 else [self.eos]):
            bitmask[index, t // 32] |= 1 << (t % 32) if t % 32 < 31 else -(1 << 31)

    def accept_token(self, token_id):
        ok = token_id == self.eos if len(self.accepted) >= 3 else token_id in self.digits
        if ok:
            self.accepted.append(token_id)
        return ok

    def is_terminated(self):
        return len(self.accepted) == 4

    def find_jump_forward_string(self):
        return ""

    def rollback(self, num_tokens):
        del self.accepted[len(self.accepted) - num_tokens:]


def test_the_finisher_answers_under_a_constraint(tiny_engine):
    tok = tiny_engine.tokenizer
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    c = DigitsThenEnd(digits, tok.eos_token_id)
    out = HogwildPool(tiny_engine, 2).run_sync(TASK, max_tokens=20, params=SAMPLED, constraint=c)
    assert len(out.answer) == 3 and out.answer.isdigit() and c.is_terminated()


def test_pages_come_back_after_an_error(make_engine):
    engine = make_engine(kv_tokens=192)  # room for the prompt, not for the run
    with pytest.raises(KVCacheError):
        HogwildPool(engine, 4, collaborate=False, max_step_tokens=2).run_sync([5, 6, 7, 8], max_tokens=500,
                                                                               params=SAMPLED)
    assert engine.pool.num_in_use == 0
    out = HogwildPool(engine, 2, collaborate=False).run_sync([5, 6, 7, 8], max_tokens=8)  # usable again
    assert out.generated_tokens == 8 and engine.pool.num_in_use == 0


def test_pages_come_back_after_cancellation(tiny_engine):
    async def run():
        pool = HogwildPool(tiny_engine, 3)
        task = asyncio.create_task(pool.run(TASK, max_tokens=100_000, params=SAMPLED))
        await asyncio.sleep(0.5)
        assert tiny_engine.pool.num_in_use > 0  # it was running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert tiny_engine.pool.num_in_use == 0
    assert tiny_engine.generate_sync([1, 2, 3], SamplingParams(max_tokens=3)).completion_tokens == 3


def test_runs_beside_ordinary_requests(tiny_engine):
    prompt = [7, 8, 9, 10]
    alone = tiny_engine.generate_sync(prompt, SamplingParams(max_tokens=20)).token_ids

    async def together():
        pool = HogwildPool(tiny_engine, 2)
        return await asyncio.gather(pool.run(TASK, max_tokens=40, params=SAMPLED),
                                    tiny_engine.generate(prompt, SamplingParams(max_tokens=20)))

    hog, plain = asyncio.run(together())
    assert plain.token_ids == alone and hog.generated_tokens == 40
    assert tiny_engine.pool.num_in_use == 0
