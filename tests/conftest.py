"""Shared fixtures: the tiny-random model (milliseconds a step) and, for slow tests, smollm2-135m.

`AGENTRT_DTYPE=bfloat16 python -m pytest` (or float32) runs the suite as on a CPU whose default is that
dtype: every engine built with dtype "auto" (smollm2-135m's included) takes it, so a developer on an
fp32-only CPU still exercises the bf16 path (slowly: emulated there). tiny-random stays in fp32, as it
loads on every machine (its tolerance tests are written for fp32); test_invariance runs it in both."""

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
    """(model, tokenizer, eos ids) of tiny-random (fp32), loaded once per session."""
    from transformers import AutoTokenizer

    from agentrt.engine.loader import load_transformer, read_generation_eos
    from agentrt.engine.models import resolve_model

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


@pytest.fixture(scope="session")
def smol_knows_trivia(smol_engine) -> bool:
    """Whether tests may assert what smollm2-135m knows ("Paris"): only in fp32, where its greedy answers
    are the ones those tests were written for. In bf16 they assert structure only (the tokens depend on
    the CPU's bf16 kernels; tests/agentrt/test_invariance.py checks the runtime's invariance there)."""
    import torch

    return smol_engine.model.embed.weight.dtype == torch.float32
