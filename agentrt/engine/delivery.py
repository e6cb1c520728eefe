"""Outputs from the engine thread to their callers: async consumers get one wake-up per event loop per
step, not per token (with many streams, per-token wake-ups steal the cores the forward runs on)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agentrt.engine.sequence import Output, Sequence

__all__ = ["LoopQueue", "Outbox", "drop", "in_future"]

log = logging.getLogger(__name__)


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

    def send(self, seq: Sequence, out: Output) -> bool:
        """Hold `out` for the next flush if `seq`'s consumer is async, else hand it over now; False if the
        consumer is gone (its call failed)."""
        if isinstance(seq.emit, LoopQueue):
            self._items.setdefault(seq.emit.loop, []).append((seq, seq.emit.queue, out))
            return True
        try:
            seq.emit(out)
        except Exception:
            log.warning("request %d: its consumer failed", seq.id, exc_info=True)
            return False
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


def in_future(fn: Callable[[], object]) -> tuple[concurrent.futures.Future, Callable[[], None]]:
    """A future of fn's result and the command that runs fn into it (on another thread; a no-op when the
    caller gave up before it ran)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the caller through the future
            fut.set_exception(exc)

    return fut, run


def _deliver(items: list) -> None:
    for _, q, out in items:
        q.put_nowait(out)
