"""File tools confined to a workspace root: `read_file`, `list_dir`, `write_file`.

Every path is resolved (symlinks included) and must stay inside the root; reads are size-capped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from agentrt.tools._tool import Tool, tool

__all__ = ["workspace_tools"]

RelPath = Annotated[str, Field(min_length=1, max_length=500)]


def workspace_tools(root: str | Path, *, max_bytes: int = 200_000, allow_write: bool = True) -> list[Tool]:
    """`read_file`, `list_dir` (and `write_file` unless `allow_write=False`) over `root` only."""
    base = Path(root).resolve()

    def inside(path: str) -> Path:
        p = (base / path).resolve()
        if p != base and base not in p.parents:
            raise PermissionError(f"{path!r} is outside the workspace")
        return p

    @tool
    def read_file(path: RelPath) -> str:
        """Read a text file from the workspace.

        Args:
            path: file path relative to the workspace root.
        """
        p = inside(path)
        data = p.read_bytes()[: max_bytes + 1]
        text = data[:max_bytes].decode("utf-8", errors="replace")
        return text + ("\n...[truncated]" if len(data) > max_bytes else "")

    @tool
    def list_dir(path: RelPath = ".") -> list[dict[str, Any]]:
        """List the entries of a workspace directory with their kind and size.

        Args:
            path: directory path relative to the workspace root.
        """
        p = inside(path)
        return [
            {"name": e.name, "kind": "dir" if e.is_dir() else "file", "size": e.stat().st_size if e.is_file() else None}
            for e in sorted(p.iterdir())
        ]

    @tool(side_effects=True)
    def write_file(path: RelPath, content: str) -> dict[str, Any]:
        """Write a text file in the workspace, creating parent directories.

        Args:
            path: file path relative to the workspace root.
            content: the full new text of the file.
        """
        if len(content.encode()) > max_bytes:
            raise ValueError(f"content is larger than the {max_bytes}-byte limit")
        p = inside(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content, encoding="utf-8")
        return {"path": str(p.relative_to(base)), "bytes": len(content.encode())}

    return [read_file, list_dir, write_file] if allow_write else [read_file, list_dir]
