"""The pruning buffer and byte-to-token spans."""

from __future__ import annotations

from agentrt.threads import PruneBuffer, ThreadStats, TokenBytes


def test_buffer_of_zero_prunes_each_list_at_once():
    buf = PruneBuffer(0)
    assert buf.push((3, 9)) == [(3, 9)]
    assert buf.push((12, 20)) == [(12, 20)]


def test_buffer_keeps_the_most_recent_lists_and_a_parent_replaces_its_children():
    buf = PruneBuffer(2)
    assert buf.push((10, 20)) == [] and buf.push((30, 40)) == []
    assert buf.push((50, 60)) == [(10, 20)]
    assert buf.push((5, 70)) == []  # encloses both kept lists: they go with it
    assert buf.spans == [(5, 70)]


def test_tokens_wholly_inside_a_byte_span():
    tb = TokenBytes()
    for n in [2, 3, 1, 4, 2]:  # tokens at bytes 0-1, 2-4, 5, 6-9, 10-11
        tb.add(n)
    assert tb.inside(2, 6) == (1, 3)  # tokens 1 and 2; token 3 holds byte 6 and goes on past it
    assert tb.inside(3, 6) == (2, 3)  # token 1 starts before the span
    assert tb.inside(5, 5) == (2, 2)
    assert tb.inside(6, 12) == (3, 5)  # the span reaches the end of the stream


def test_prunable_tokens_count_nested_lists_once():
    stats = ThreadStats(prunable=[(10, 20), (5, 30), (40, 45)])
    assert stats.prunable_tokens == 25 + 5
