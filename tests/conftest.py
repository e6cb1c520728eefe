"""Shared fixtures: the tiny-random model (milliseconds a step) and, for slow tests, smollm2-135m."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or a skip with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared benchmark data sits beside the checkout (../shared/data)")
    return path


@pytest.fixture(scope="session")
def tiny_parts():
    """(model, tokenizer, eos ids) of tiny-random, loaded once per session."""
    from transformers import AutoTokenizer

    from agentrt.model import load_transformer, read_generation_eos
    from agentrt.models import resolve_model

    path = resolve_model("tiny-random")
    return load_transformer(path), AutoTokenizer.from_pretrained(path), read_generation_eos(path)


@pytest.fixture
def make_engine(tiny_parts):
    """Build engines over the shared tiny-random weights; each is closed after the test."""
    from agentrt.engine import Engine

    engines = []

    def make(**kwargs):
        model, tok, eos = tiny_parts
        engine = Engine(model, tok, eos_token_ids=eos, name="tiny-random", **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def tiny_engine(make_engine):
    return make_engine()


@pytest.fixture(scope="session")
def smol_engine():
    from agentrt.engine import Engine

    engine = Engine.load("smollm2-135m", device="cpu")
    yield engine
    engine.close()
