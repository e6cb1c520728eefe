"""Tool RAG with embeddings: cosine ranking with a floor, and mean-pooled sentence embeddings."""

from __future__ import annotations

import pytest

from agentrt.tools import ToolIndex, ToolRegistry, sentence_embedder, tool
from agentrt.tools._rag import _text


@tool
def get_weather(city: str) -> str:
    """Current weather and temperature.

    Args:
        city: City name.
    """
    return city


@tool
def send_email(to: str, body: str) -> str:
    """Send an email message.

    Args:
        to: Recipient address.
        body: Message text.
    """
    return to


@tool
def stock_price(ticker: str) -> float:
    """Latest stock price of a company.

    Args:
        ticker: Exchange ticker symbol.
    """
    return 1.0


TOOLS = [get_weather, send_email, stock_price]
AXES = ["weather", "temperature", "email", "message", "stock", "price"]


def keyword_embed(texts: list[str]) -> list[list[float]]:
    """A transparent embedding: one axis per keyword (enough to check the ranking and the floor)."""
    return [[float(t.lower().count(a)) for a in AXES] for t in texts]


def test_cosine_ranking_and_floor():
    index = ToolIndex(TOOLS, embed=keyword_embed)
    hits = index.search("what's the temperature and weather today", k=3, min_score=0.5)
    assert [h.tool.name for h in hits] == ["get_weather"] and hits[0].score > 0.9
    assert [h.tool.name for h in index.search("email a message to Bob", k=1)] == ["send_email"]
    assert index.search("zzz", k=3, min_score=0.5) == []


def test_registry_select_with_embeddings():
    reg = ToolRegistry(TOOLS)
    assert reg.select("stock price of ACME", k=2, min_score=0.5, embed=keyword_embed).names == ["stock_price"]


def test_sentence_embedder_mean_pools_a_local_model():
    from agentrt.engine.models import resolve_model

    embed = sentence_embedder(resolve_model("tiny-random"))  # any local encoder directory works
    a, b = embed(["hello world", "a longer sentence about something else"])
    assert len(a) == len(b) == 64 and a != b
    assert embed(["hello world"])[0] == pytest.approx(a, abs=1e-5)  # padding does not leak in
    # a query that is a tool's own description finds that tool first
    index = ToolIndex(TOOLS, embed=embed)
    hit = index.search(_text(send_email), k=1, min_score=0.0)[0]
    assert hit.tool.name == "send_email" and hit.score == pytest.approx(1.0, abs=1e-4)
