"""Fixtures for thread mode: one tiny-random engine and backend (grammar compiler included) per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_backend(tiny_parts):
    from agentrt.backends import LocalBackend
    from agentrt.engine import Engine

    model, tok, eos = tiny_parts
    engine = Engine(model, tok, eos_token_ids=eos, name="tiny-random")
    yield LocalBackend(engine)
    engine.close()


@pytest.fixture(scope="session")
def add():
    """A tool with small, bounded-digit arguments: even a random model finishes its call."""
    from agentrt.tools import tool

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    return tool(add)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
