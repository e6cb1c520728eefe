"""The paged KV cache: page accounting, sharing, copy-on-write, pruning with RoPE re-positioning."""

from __future__ import annotations

import pytest
import torch

from agentrt.errors import KVCacheError
from agentrt.engine.kv import KVPool, KVSequence, OutOfPagesError

from agentrt.engine import feed_sequence as run_ours


def small_pool(pages: int = 8, page_size: int = 4) -> KVPool:
    return KVPool(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=pages, page_size=page_size)


def test_append_allocates_pages_and_free_returns_them():
    pool = small_pool()
    seq = KVSequence()
    slots = pool.append(seq, 6)
    assert len(seq.pages) == 2 and pool.num_in_use == 2
    assert slots.tolist() == [seq.pages[0] * 4 + i for i in range(4)] + [seq.pages[1] * 4 + i for i in range(2)]
    assert seq.positions == list(range(6))
    pool.free(seq)
    assert pool.num_in_use == 0 and pool.num_free == 8


def test_out_of_pages_is_an_error_and_loses_nothing():
    pool = small_pool(pages=2)
    seq = KVSequence()
    pool.append(seq, 8)
    with pytest.raises(OutOfPagesError):
        pool.append(seq, 1)
    assert seq.length == 8
    pool.free(seq)
    assert pool.num_free == 2


def test_double_release_is_detected():
    pool = small_pool()
    seq = KVSequence()
    pool.append(seq, 2)
    page = seq.pages[0]
    pool.free(seq)
    with pytest.raises(KVCacheError):
        pool._decref(page)


def test_fork_shares_full_pages_and_copies_the_partial_one():
    pool = small_pool()
    seq = KVSequence()
    slots = pool.append(seq, 6)
    pool.k[0, slots] = torch.arange(12, dtype=torch.float32).view(6, 1, 2)
    child = pool.fork(seq)
    assert child.pages[0] == seq.pages[0] and child.pages[1] != seq.pages[1]
    assert torch.equal(pool.k[0, pool.slots(child)], pool.k[0, pool.slots(seq)])
    new = pool.append(child, 1)  # writes into the child's private page only
    pool.k[0, new] = -1.0
    assert seq.length == 6 and pool.k[0, pool.slots(seq)].min() >= 0
    pool.free(seq)
    assert pool.num_in_use == 2  # the child's pages
    pool.free(child)
    assert pool.num_in_use == 0


def test_prefix_cache_reuses_full_pages_and_keeps_one_token_to_compute():
    pool = small_pool()
    tokens = list(range(100, 110))
    seq = KVSequence()
    pool.append(seq, len(tokens))
    pool.register_prefix(seq, tokens)
    pool.free(seq)
    assert pool.num_in_use == 0  # cached pages are reclaimable
    hit = pool.match_prefix(tokens)
    assert hit.length == 8 and hit.positions == list(range(8))
    assert pool.match_prefix(tokens[:8]).length == 4  # the last token is always left to compute
    assert pool.match_prefix([1] + tokens[1:]).length == 0


def test_cached_pages_are_evicted_when_the_pool_runs_short():
    pool = small_pool(pages=3)
    seq = KVSequence()
    pool.append(seq, 12)
    pool.register_prefix(seq, list(range(12)))
    pool.free(seq)
    other = KVSequence()
    pool.append(other, 12)  # needs all three pages: takes the cached ones
    assert pool.num_free == 0
    assert pool.match_prefix(list(range(12))).length == 0


def test_prune_compacts_and_frees_pages():
    pool = small_pool(pages=8)
    seq = KVSequence()
    slots = pool.append(seq, 14)
    pool.v[0, slots] = torch.arange(14, dtype=torch.float32).view(14, 1, 1).expand(14, 1, 2)
    pool.prune(seq, 2, 10)  # drop 8 tokens, keep positions
    assert seq.length == 6 and len(seq.pages) == 2 and pool.num_in_use == 2
    assert pool.v[0, pool.slots(seq), 0, 0].tolist() == [0, 1, 10, 11, 12, 13]
    assert seq.positions == [0, 1, 10, 11, 12, 13]
    with pytest.raises(KVCacheError):
        pool.prune(seq, 4, 9)


def test_prune_of_a_shared_prefix_leaves_the_other_sequence_intact():
    pool = small_pool(pages=8)
    seq = KVSequence()
    slots = pool.append(seq, 8)
    pool.v[0, slots] = torch.arange(8, dtype=torch.float32).view(8, 1, 1).expand(8, 1, 2)
    child = pool.fork(seq)
    pool.prune(child, 1, 3)
    assert pool.v[0, pool.slots(seq), 0, 0].tolist() == list(range(8))
    assert pool.v[0, pool.slots(child), 0, 0].tolist() == [0, 3, 4, 5, 6, 7]


def one_layer(model):
    """tiny-random cut to its first layer: there a token's K/V depend only on the token and its
    position, so pruning + re-positioning must reproduce a fresh prefill exactly. (In deeper layers
    the kept tail's K/V also carry what it read from the pruned span: that is TIM's design, and no
    cache operation can make it equal a fresh prefill without recomputing the tail.)"""
    import copy

    one = copy.deepcopy(model)
    one.layers = one.layers[:1]
    one.cfg = copy.copy(model.cfg)
    one.cfg.num_layers = 1
    return one


def test_prune_and_reposition_equals_a_fresh_prefill_of_the_kept_tokens(tiny_parts):
    """After pruning a span and closing the position gap by RoPE re-rotation, the next-token logits are
    those of a fresh prefill of exactly the kept tokens at dense positions."""
    model = one_layer(tiny_parts[0])
    cfg = model.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32, 16)
    g = torch.Generator().manual_seed(3)
    tokens = [int(t) for t in torch.randint(0, cfg.vocab_size, (60,), generator=g)]
    seq = KVSequence()
    run_ours(model, pool, seq, tokens)
    pool.prune(seq, 10, 41, rotary=model.rotary)  # spans page boundaries; a 19-token tail moves back
    assert seq.positions == list(range(29))
    nxt = [7, 8, 9]
    pruned = run_ours(model, pool, seq, nxt)
    kept = tokens[:10] + tokens[41:]
    fresh_seq = KVSequence()
    fresh = run_ours(model, pool, fresh_seq, kept + nxt)[-3:]
    assert (pruned - fresh).abs().max().item() <= 1e-4
    # without re-positioning the gap stays, and the logits differ: the rotation is what made them equal
    gap_seq = KVSequence()
    run_ours(model, pool, gap_seq, tokens)
    pool.prune(gap_seq, 10, 41)
    assert gap_seq.positions[10] == 41
    assert (run_ours(model, pool, gap_seq, nxt) - fresh).abs().max().item() > 1e-3
    for s in (seq, fresh_seq, gap_seq):
        pool.free(s)
    assert pool.num_in_use == 0


def test_pruning_the_end_of_a_deep_model_equals_a_fresh_prefill(tiny_parts):
    """Dropping a finished span at the end (nothing after it yet) is exact at every depth."""
    model = tiny_parts[0]
    cfg = model.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32, 16)
    tokens = list(range(300, 350))
    seq = KVSequence()
    run_ours(model, pool, seq, tokens)
    pool.prune(seq, 20, 50, rotary=model.rotary)
    fresh_seq = KVSequence()
    fresh = run_ours(model, pool, fresh_seq, tokens[:20] + [5, 6])[-2:]
    assert (run_ours(model, pool, seq, [5, 6]) - fresh).abs().max().item() <= 1e-4


def test_reposition_moves_keys_without_recompute(tiny_parts):
    """Shifting a whole sequence by +5 positions equals prefilling it at positions 5.. (RoPE is relative)."""
    model, _, _ = tiny_parts
    cfg = model.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 16)
    tokens = list(range(200, 230))
    a = KVSequence()
    run_ours(model, pool, a, tokens)
    pool.reposition(a, 0, a.length, 5, model.rotary)
    b = KVSequence()
    run_ours(model, pool, b, tokens, positions=list(range(5, 35)))
    assert (pool.k[:, pool.slots(a)] - pool.k[:, pool.slots(b)]).abs().max().item() <= 1e-4


def test_reposition_moves_each_token_by_its_own_delta(tiny_parts):
    """Tokens written at gapped positions, moved token by token onto dense ones: the first layer's keys
    (which depend on nothing but token and position) equal a prefill at the dense positions."""
    model, _, _ = tiny_parts
    cfg = model.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 16)
    tokens = list(range(300, 320))
    gapped = [3 * i + (i % 2) for i in range(len(tokens))]
    a = KVSequence()
    run_ours(model, pool, a, tokens, positions=gapped)
    dense = list(range(40, 60))
    pool.reposition(a, 0, a.length, [d - g for d, g in zip(dense, gapped)], model.rotary)
    assert a.positions == dense
    b = KVSequence()
    run_ours(model, pool, b, tokens, positions=dense)
    assert (pool.k[0, pool.slots(a)] - pool.k[0, pool.slots(b)]).abs().max().item() <= 1e-4
    with pytest.raises(KVCacheError, match="3 deltas for a span of 20"):
        pool.reposition(a, 0, a.length, [1, 2, 3], model.rotary)
