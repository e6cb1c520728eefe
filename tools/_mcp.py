"""MCP tools: the tools of a Model Context Protocol server, run over stdio, as agentrt tools.

`MCPServerStdio(command, args)` goes in `Agent(tools=[...])` beside Python tools. The server process
starts on first use (when the agent first needs the tool list), its tools' input schemas become
tool schemas (decoded under the same grammars as Python tools), each call goes through the
executor like any tool (its timeout and retries apply; a timed-out call is cancelled on the
server), and a result's text, or its `is_error` text as an error, is the observation the model
sees. The process stops on `close()` (the agent's `close()` closes it) or when the interpreter exits.

The client session lives on an event loop of its own, in a thread: tools are called from any loop
(`Agent.run_sync` starts a new one per run) without tying the session to one of them.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import logging
import re
import shlex
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.from_thread

from agentrt.errors import ToolError
from agentrt.tools._tool import Tool, ToolContext, ToolResult, to_result

__all__ = ["MCPServerStdio", "MCPTool"]

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_LIVE: weakref.WeakSet[MCPServerStdio] = weakref.WeakSet()


class MCPServerStdio:
    """An MCP server started as a subprocess and spoken to over its stdin/stdout.

    `timeout`: seconds per tool call unless the executor sets one (None: the executor's default);
    `startup_timeout`: seconds the server may take to start and list its tools; `prefix`: put before
    every tool name (e.g. "fs_"); `side_effects`: mark every tool as needing approval."""

    def __init__(self, command: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None, *,
                 cwd: str | None = None, timeout: float | None = 60.0, startup_timeout: float = 30.0,
                 prefix: str = "", side_effects: bool = False) -> None:
        if not command:
            raise ToolError("MCPServerStdio needs a command to start the server")
        self.command, self.args = command, [str(a) for a in args]
        self.env = dict(env) if env is not None else None
        self.cwd, self.timeout, self.startup_timeout = cwd, timeout, startup_timeout
        self.prefix, self.side_effects = prefix, side_effects
        self._lock = threading.Lock()
        self._portal_cm = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._session = None
        self._stop: anyio.Event | None = None
        self._runner: concurrent.futures.Future | None = None
        self._tools: list[MCPTool] | None = None

    @classmethod
    def from_command_line(cls, line: str, **kwargs: Any) -> MCPServerStdio:
        """`"CMD ARGS"` as a shell would split it (what `--mcp` takes)."""
        words = shlex.split(line)
        if not words:
            raise ToolError("--mcp needs a command, e.g. --mcp \"python my_server.py\"")
        return cls(words[0], words[1:], **kwargs)

    def __repr__(self) -> str:
        return f"MCPServerStdio({shlex.join([self.command, *self.args])!r})"

    @property
    def running(self) -> bool:
        return self._session is not None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server process and initialise the session (nothing if it runs already)."""
        with self._lock:
            if self._session is not None:
                return
            cm = anyio.from_thread.start_blocking_portal()
            portal = cm.__enter__()
            try:
                self._runner, _ = portal.start_task(self._serve, name=repr(self))
            except BaseException as exc:
                cm.__exit__(None, None, None)
                raise ToolError(f"{self!r} did not start: {_reason(exc)}") from None
            self._portal_cm, self._portal = cm, portal
            _LIVE.add(self)
            log.info("%r started", self)

    async def _serve(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Holds the stdio transport and the session open until close() sets the stop event."""
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=self.command, args=self.args, env=self.env, cwd=self.cwd)
        self._stop = anyio.Event()
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            with anyio.fail_after(self.startup_timeout):
                await session.initialize()
            self._session = session
            try:
                task_status.started()
                await self._stop.wait()
            finally:
                self._session = None

    def close(self) -> None:
        """Stop the server process (a later use starts it again)."""
        with self._lock:
            portal, cm, self._portal, self._portal_cm = self._portal, self._portal_cm, None, None
            self._tools = None
            if portal is None:
                return
            try:
                if self._stop is not None:
                    portal.call(self._stop.set)
                if self._runner is not None:
                    self._runner.result(timeout=10)
            except Exception as exc:  # noqa: BLE001 - closing must not fail the caller
                log.warning("%r did not stop cleanly: %s", self, _reason(exc))
            finally:
                cm.__exit__(None, None, None)
                _LIVE.discard(self)
                log.info("%r stopped", self)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> MCPServerStdio:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> MCPServerStdio:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # --- tools ----------------------------------------------------------------------------------
    def tools(self) -> list[MCPTool]:
        """The server's tools as agentrt tools (starts the server on first use; listed once)."""
        if self._tools is None:
            self.start()
            try:
                listed = self._submit(lambda s: s.list_tools()).result(timeout=self.startup_timeout)
            except Exception as exc:
                raise ToolError(f"{self!r}: listing its tools failed: {_reason(exc)}") from None
            self._tools = [MCPTool(self, t) for t in listed.tools]
        return list(self._tools)

    def _submit(self, request) -> concurrent.futures.Future:
        """Run `request(session)` on the session's loop; a Future of its result."""
        self.start()
        portal = self._portal
        if portal is None or self._session is None:
            raise ToolError(f"{self!r} is not running")
        session = self._session
        return portal.start_task_soon(request, session)


class MCPTool(Tool):
    """One tool of an MCP server; invoking it calls the server (validation is the server's)."""

    def __init__(self, server: MCPServerStdio, spec: Any) -> None:  # noqa: D107 - no function to wrap
        self.server = server
        self.remote_name: str = spec.name
        name = server.prefix + _UNSAFE.sub("_", spec.name)
        if not name[:1].isalpha() and not name.startswith("_"):
            name = "t_" + name
        self.name = name[:64]
        self.description = spec.description or spec.title or ""
        self.timeout = server.timeout
        self.max_concurrency = None
        self.retries = 0
        self.side_effects = server.side_effects
        self.is_async = True
        self.takes_context = False
        self.args_model = None
        schema = dict(spec.input_schema or {})
        schema.setdefault("type", "object")
        schema.setdefault("properties", {})
        self.parameters: dict[str, Any] = schema
        self.param_docs = {k: v.get("description", "") for k, v in schema["properties"].items()
                           if isinstance(v, dict) and v.get("description")}
        self.fn = self._call_sync

    def __repr__(self) -> str:
        return f"MCPTool({self.name!r} of {self.server!r})"

    def _call_sync(self, **kwargs: Any) -> Any:
        """Calling the tool object directly: the server's answer, or ToolError for is_error."""
        result = _observation(self.name, self.server._submit(lambda s: s.call_tool(self.remote_name, kwargs))
                              .result(timeout=self.timeout))
        if not result.ok:
            raise ToolError(result.error or "failed")
        return result.value

    def validate(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return dict(args)  # the server checks its own arguments; an error comes back as is_error

    def _arguments(self, args: Mapping[str, Any]) -> dict[str, Any] | ToolResult:
        if not isinstance(args, Mapping):
            return ToolResult("invalid_args", error=f"invalid arguments for {self.name}: expected a JSON object")
        return dict(args)

    async def _call(self, ctx: ToolContext, kwargs: dict[str, Any],
                    thread_limiter: anyio.CapacityLimiter | None) -> ToolResult:
        future = await anyio.to_thread.run_sync(
            self.server._submit, lambda s: s.call_tool(self.remote_name, kwargs))
        try:
            raw = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True, limiter=thread_limiter)
        except anyio.get_cancelled_exc_class():
            future.cancel()  # a timed-out or cancelled call is cancelled on the session's loop too
            raise
        return _observation(self.name, raw)


def _observation(name: str, result: Any) -> ToolResult:
    """A CallToolResult as a ToolResult: its text (a JSON value when the text is one), structured
    content when there is no text, and is_error as an error with the server's text."""
    texts = []
    for part in getattr(result, "content", None) or []:
        kind = getattr(part, "type", "")
        if kind == "text":
            texts.append(part.text)
        elif kind == "resource" and getattr(part.resource, "text", None) is not None:
            texts.append(part.resource.text)
        else:
            texts.append(f"[{kind} content: {getattr(part, 'mime_type', None) or 'binary'}]")
    text = "\n".join(texts)
    if getattr(result, "is_error", False):
        return ToolResult("error", error=text or f"tool {name!r} failed")
    if not texts and getattr(result, "structured_content", None) is not None:
        return to_result(name, result.structured_content)
    try:
        return to_result(name, json.loads(text))
    except ValueError:
        return ToolResult("ok", value=text)


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@atexit.register
def _close_all() -> None:
    for server in list(_LIVE):
        server.close()
