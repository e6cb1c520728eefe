"""Notes: what a backend could not do as asked, said where the run can see it (RunResult.notes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["collect_notes", "note"]

log = logging.getLogger(__name__)

# What a backend could not do as asked, said where the run can see it (RunResult.notes): each run
# collects into its own list (a context variable, so concurrent runs keep theirs apart).
_NOTES: ContextVar[list[str] | None] = ContextVar("agentrt_backend_notes", default=None)


@contextmanager
def collect_notes() -> Iterator[list[str]]:
    """Collect the notes backends make while the block runs (the Agent puts them in RunResult.notes)."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(message: str) -> None:
    """Say what was not enforced as asked: logged, and kept for the run's notes (once per run)."""
    notes = _NOTES.get()
    if notes is None or message not in notes:
        log.warning("%s", message)
    if notes is not None and message not in notes:
        notes.append(message)
