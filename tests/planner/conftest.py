from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (tiny-random shares it), loaded once."""
    from agentrt.engine.models import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture(scope="session")
def compiler(tokenizer):
    """An xgrammar compiler over that tokenizer."""
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
