"""ToolRegistry: the set of tools an agent may call, by name, with per-query selection (Tool RAG).

Besides tools and plain functions it takes tool sources such as `MCPServerStdio`: their tools are
listed (the server started) the first time the registry is read, and `close()` stops them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from agentrt.errors import ToolError
from agentrt.tools._mcp import MCPServerStdio
from agentrt.tools._rag import ToolIndex
from agentrt.tools._tool import Tool

__all__ = ["ToolRegistry"]


class ToolRegistry:
    """Tools by name. Plain functions are wrapped with `@tool` defaults when added; an
    `MCPServerStdio` adds the server's tools, on first read."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any] | MCPServerStdio] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._index: ToolIndex | None = None
        self._pending: list[MCPServerStdio] = []  # sources whose tools are not listed yet
        self.sources: list[MCPServerStdio] = []  # what close() stops
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable[..., Any] | MCPServerStdio, *, replace: bool = False) -> Tool | None:
        if isinstance(t, MCPServerStdio):
            self._pending.append(t)
            self.sources.append(t)
            return None
        t = t if isinstance(t, Tool) else Tool(t)
        self._expand()
        if t.name in self._tools and not replace:
            raise ToolError(f"a tool named {t.name!r} is already registered; pass replace=True to override it")
        self._tools[t.name] = t
        self._index = None
        return t

    def _expand(self) -> None:
        while self._pending:
            source = self._pending.pop(0)
            for t in source.tools():
                if t.name in self._tools:
                    raise ToolError(f"{source!r} has a tool named {t.name!r}, which is already registered; "
                                    "give the server a prefix")
                self._tools[t.name] = t
            self._index = None

    async def start(self) -> None:
        """List the tool sources' tools (starting their servers) off the event loop."""
        if self._pending:
            import anyio

            await anyio.to_thread.run_sync(self._expand)

    def close(self) -> None:
        """Stop the tool sources (MCP servers) this registry started."""
        for source in self.sources:
            source.close()
        self._pending = list(self.sources)  # a later read starts them again
        for name in [n for n, t in self._tools.items() if getattr(t, "server", None) in self.sources]:
            del self._tools[name]

    async def aclose(self) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.close)

    def remove(self, name: str) -> None:
        self._expand()
        self._tools.pop(name)
        self._index = None

    def get(self, name: str) -> Tool | None:
        self._expand()
        return self._tools.get(name)

    def __getitem__(self, name: str) -> Tool:
        self._expand()
        try:
            return self._tools[name]
        except KeyError:
            raise KeyError(f"no tool named {name!r}; registered: {', '.join(self._tools) or '(none)'}") from None

    def __contains__(self, name: object) -> bool:
        self._expand()
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        self._expand()
        return iter(self._tools.values())

    def __len__(self) -> int:
        self._expand()
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        self._expand()
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self]

    def select(self, query: str, k: int = 5, min_score: float = 0.1, *, embed=None) -> ToolRegistry:
        """A registry holding only the (at most k) tools relevant to `query`: BM25, or with `embed`
        (an `Embedder`, see `sentence_embedder`) cosine similarity above `min_score`."""
        self._expand()
        if embed is not None:
            index = ToolIndex(self._tools.values(), embed=embed)
        else:
            if self._index is None:
                self._index = ToolIndex(self._tools.values())
            index = self._index
        return ToolRegistry(st.tool for st in index.search(query, k=k, min_score=min_score))
