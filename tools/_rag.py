"""Tool RAG: pick the few tools a query needs, so large registries still give short prompts.

TinyAgent (Erdogan et al., 2024) retrieves tools per query before planning; here retrieval is BM25
(Robertson & Zaragoza) over each tool's name, description and parameter docs, top-k above a floor,
or — where a sentence-embedding model is present — cosine similarity of embeddings.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentrt.tools._tool import Tool

__all__ = ["ToolIndex", "ScoredTool", "tokenize", "Embedder", "sentence_embedder"]

Embedder = Callable[[list[str]], Sequence[Sequence[float]]]  # texts -> one vector each

_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_STOP = frozenset(
    "a an and are as at be by for from how i in into is it its me my of on or so than that the then this "
    "to was what when where which who why will with you your do does can".split()
)


def _stem(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased, stemmed words; snake_case and camelCase identifiers are split into words."""
    words = (w.lower() for w in _WORD_RE.findall(text))
    return [_stem(w) for w in words if len(w) > 1 and w not in _STOP]


def _document(tool: Tool) -> list[str]:
    # the name counts twice: it is the densest description a tool has
    params = " ".join(f"{name} {doc}" for name, doc in tool.param_docs.items())
    props = " ".join(tool.parameters.get("properties", {}))
    return tokenize(f"{tool.name} {tool.name} {tool.description} {params} {props}")


@dataclass(frozen=True)
class ScoredTool:
    tool: Tool
    score: float


def _text(tool: Tool) -> str:
    params = "; ".join(f"{name}: {doc}" for name, doc in tool.param_docs.items())
    return f"{tool.name}: {tool.description} {params}".strip()


class ToolIndex:
    """BM25 index over tools. `search(query, k, min_score)` returns the best tools, best first.

    With `embed` (see `sentence_embedder`), tools are ranked by the cosine similarity of their
    embedded descriptions to the embedded query instead, and `min_score` is a cosine floor.
    """

    def __init__(self, tools: Iterable[Tool], *, k1: float = 1.5, b: float = 0.75,
                 embed: Embedder | None = None) -> None:
        self.tools = list(tools)
        self.k1, self.b = k1, b
        self.embed = embed
        self._vectors = _unit(embed([_text(t) for t in self.tools])) if embed and self.tools else None
        self._docs = [Counter(_document(t)) for t in self.tools]
        self._lens = [sum(d.values()) for d in self._docs]
        self._avg_len = (sum(self._lens) / len(self._lens)) if self._lens else 0.0
        df: Counter[str] = Counter()
        for d in self._docs:
            df.update(d.keys())
        n = len(self._docs)
        self._idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    def scores(self, query: str) -> list[float]:
        if self.embed is not None:
            if self._vectors is None:
                return []
            q = _unit(self.embed([query]))[0]
            return [sum(a * b for a, b in zip(q, v)) for v in self._vectors]
        terms = tokenize(query)
        out = []
        for doc, length in zip(self._docs, self._lens):
            s = 0.0
            for term in terms:
                tf = doc.get(term, 0)
                if tf:
                    norm = tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self._avg_len))
                    s += self._idf[term] * norm
            out.append(s)
        return out

    def search(self, query: str, k: int = 5, min_score: float = 0.1) -> list[ScoredTool]:
        """The top `k` tools scoring at least `min_score` (a query sharing no word with a tool scores 0)."""
        ranked = sorted(zip(self.tools, self.scores(query)), key=lambda ts: -ts[1])
        return [ScoredTool(t, s) for t, s in ranked[:k] if s >= min_score]


def _unit(vectors: Sequence[Sequence[float]]) -> list[list[float]]:
    out = []
    for v in vectors:
        norm = math.sqrt(sum(float(x) * float(x) for x in v)) or 1.0
        out.append([float(x) / norm for x in v])
    return out


def sentence_embedder(model_dir: str | Path, *, max_length: int = 256) -> Embedder:
    """Mean-pooled sentence embeddings from a local Hugging Face encoder directory (for example an
    all-MiniLM-L6-v2 checkout), for `ToolIndex(..., embed=...)`. Nothing is downloaded."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def embed(texts: list[str]) -> list[list[float]]:
        batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # [B, S, H]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()

    return embed
