"""Shared fixtures for the grammar tests: the SmolLM2 tokenizer (tiny-random), one compiler with
its own cache, and `accepts`, which feeds text token by token to a fresh matcher."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agentrt.grammar import CompileCache, Constraint, GrammarCompiler

VOCAB = 49152


@pytest.fixture(scope="session")
def tokenizer():
    from agentrt.engine.models import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture(scope="session")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=VOCAB, cache=CompileCache(max_bytes=256 << 20))


@pytest.fixture(scope="session")
def accepts(compiler, tokenizer) -> Callable[..., bool]:
    """accepts(constraint, text, complete=True): every token of `text` is accepted and, when
    `complete`, the grammar may end right after it (end-of-sequence accepted)."""

    def run(constraint: Constraint, text: str, complete: bool = True) -> bool:
        matcher = compiler.compile(constraint).matcher()
        for t in tokenizer.encode(text, add_special_tokens=False):
            if not matcher.accept_token(t):
                return False
        return matcher.accept_token(tokenizer.eos_token_id) if complete else True

    return run


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
