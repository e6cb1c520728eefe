"""Outputs from the engine thread to their callers: async consumers get one wake-up per event loop per
step, not per token (with many streams, per-token wake-ups steal the cores the forward runs on)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agentrt.engine.sequence import Output, Sequence

__all__ = ["LoopQueue", "Outbox", "drop"]


@dataclass(frozen=True)
class LoopQueue:
    """`emit` of an async consumer: Outputs go to `queue` on `loop`, batched per engine step."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, out: Output) -> None:  # direct use outside the engine loop
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)


def drop(_: Output) -> None:
    """The `emit` of a request whose consumer is gone."""


class Outbox:
    """The step's Outputs for async consumers, grouped by their event loop."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, asyncio.Queue, Output]]] = {}

    def put(self, seq: Sequence, out: Output) -> bool:
        """Hold `out` for the next flush if `seq`'s consumer is async; False if it is not."""
        if not isinstance(seq.emit, LoopQueue):
            return False
        self._items.setdefault(seq.emit.loop, []).append((seq, seq.emit.queue, out))
        return True

    def flush(self) -> list[Sequence]:
        """Wake each event loop once with its Outputs; returns the sequences whose loop is closed."""
        gone = []
        while self._items:
            loop, items = self._items.popitem()
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: its consumers are gone
                gone += [seq for seq, _, _ in items]
        return gone


def _deliver(items: list) -> None:
    for _, q, out in items:
        q.put_nowait(out)
