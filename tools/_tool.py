"""`@tool`: turn a typed Python function (sync or async) into a tool a model can call.

Name, description and per-parameter docs come from the signature and a Google-style docstring;
the argument schema comes from pydantic, so `Annotated[..., Field(...)]` constraints are honoured.
Invoking a tool never raises for the tool's own failures: they become a `ToolResult` (LLMCompiler's
executor hangs on a tool exception; ours reports it to the model as an observation).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import threading
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import pydantic
from pydantic_core import PydanticSerializationError, to_jsonable_python

from agentrt.errors import ToolError

__all__ = ["Tool", "ToolContext", "ToolResult", "tool"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_SECTION_RE = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Yields|Raises|Examples?|Notes?)\s*:\s*$")
_PARAM_RE = re.compile(r"^\s*(\*{0,2}[A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?\s*:\s*(.*)$")

ResultKind = Literal["ok", "invalid_args", "error", "timeout", "bad_result", "refused", "skipped", "bad_reference"]


@dataclass
class ToolContext:
    """Passed as the first argument to tools that declare a parameter annotated `ToolContext`.

    `cancelled` is set when the call is cancelled or times out: a synchronous tool running in a
    worker thread cannot be interrupted, so a long one should check `ctx.cancelled.is_set()`.
    """

    tool_name: str = ""
    task_id: int | None = None
    attempt: int = 1
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    """What one tool call produced: a JSON-able value, or an error the model will see."""

    kind: ResultKind
    value: Any = None
    error: str | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def observation(self, max_chars: int = 2000) -> str:
        """The text the model sees for this result (truncated to `max_chars`)."""
        if self.ok:
            text = self.value if isinstance(self.value, str) else json.dumps(self.value, ensure_ascii=False)
        else:
            text = f"Error ({self.kind}): {self.error}"
        return text if len(text) <= max_chars else text[: max_chars - 15] + " ...[truncated]"

    def size(self) -> int:
        """Bytes of the JSON encoding of the value (0 on error)."""
        return len(json.dumps(self.value, ensure_ascii=False).encode()) if self.ok else 0


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Google-style docstring -> (description, {param: doc}). Continuation lines are joined."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    desc: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    base_indent = 0
    for line in lines:
        m = _SECTION_RE.match(line)
        if m:
            section, current = m.group(1).lower(), None
            continue
        if section is None:
            desc.append(line)
        elif section in ("args", "arguments", "parameters") and line.strip():
            indent = len(line) - len(line.lstrip())
            pm = _PARAM_RE.match(line)
            if pm and (current is None or indent <= base_indent):
                current, base_indent = pm.group(1).lstrip("*"), indent
                params[current] = pm.group(3).strip()
            elif current is not None:
                params[current] = (params[current] + " " + line.strip()).strip()
    paragraphs = " ".join(desc).strip()
    return re.sub(r"\s+", " ", paragraphs), params


def _strip_titles(node: Any) -> Any:
    """Drop pydantic's auto-generated `title` keys (schema nodes only, not property names)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "title" and isinstance(v, str):
                continue
            if k in ("properties", "$defs", "patternProperties") and isinstance(v, dict):
                out[k] = {name: _strip_titles(sub) for name, sub in v.items()}
            else:
                out[k] = _strip_titles(v)
        return out
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


class Tool:
    """A callable tool: the wrapped function plus its schema and execution options.

    Calling the Tool object calls the original function unchanged; `await tool.invoke(args)` is what
    the planner uses: it validates, applies the timeout and retries, and never raises for tool faults.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        max_concurrency: int | None = None,
        retries: int = 0,
        side_effects: bool = False,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME_RE.match(self.name):
            raise ToolError(f"tool name {self.name!r} must be an identifier (letters, digits, _), at most 64 chars")
        if retries < 0 or (max_concurrency is not None and max_concurrency < 1):
            raise ToolError(f"tool {self.name!r}: retries must be >= 0 and max_concurrency >= 1")
        if timeout is not None and timeout <= 0:
            raise ToolError(f"tool {self.name!r}: timeout must be positive seconds")
        doc_desc, param_docs = _parse_docstring(fn.__doc__)
        self.description = description if description is not None else doc_desc
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.side_effects = side_effects
        self.is_async = inspect.iscoroutinefunction(fn)
        self.takes_context, self.args_model = self._build_model(param_docs)
        self.parameters: dict[str, Any] = _strip_titles(self.args_model.model_json_schema())
        self.param_docs = param_docs
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def _build_model(self, param_docs: dict[str, str]) -> tuple[bool, type[pydantic.BaseModel]]:
        sig = inspect.signature(self.fn)
        try:
            hints = typing.get_type_hints(self.fn, include_extras=True)
        except Exception as e:  # unresolved forward references
            raise ToolError(f"tool {self.name!r}: cannot resolve type hints ({e})") from e
        params = list(sig.parameters.values())
        takes_context = bool(params) and hints.get(params[0].name) is ToolContext
        if takes_context:
            params = params[1:]
        fields: dict[str, Any] = {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise ToolError(f"tool {self.name!r}: parameter {p.name!r} must be a plain or keyword parameter")
            if p.name not in hints:
                raise ToolError(f"tool {self.name!r}: parameter {p.name!r} needs a type annotation")
            ann = hints[p.name]
            if p.name in param_docs:
                ann = typing.Annotated[ann, pydantic.Field(description=param_docs[p.name])]
            fields[p.name] = (ann, ... if p.default is p.empty else p.default)
        model = pydantic.create_model(  # type: ignore[call-overload]
            f"{self.name}_args", __config__=pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True), **fields
        )
        return takes_context, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def spec(self) -> dict[str, Any]:
        """OpenAI-style function spec: {"name", "description", "parameters"}."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def validate(self, args: Mapping[str, Any]) -> pydantic.BaseModel:
        """Validate arguments; raises pydantic.ValidationError (see `format_validation_error`)."""
        return self.args_model.model_validate(dict(args))

    async def invoke(
        self,
        args: Mapping[str, Any],
        *,
        context: ToolContext | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float = 0.05,
        thread_limiter: anyio.CapacityLimiter | None = None,
    ) -> ToolResult:
        """Validate `args`, call the tool with timeout and bounded retries; never raises for tool faults.

        Cancellation of the caller propagates (and sets `context.cancelled` for sync tools).
        """
        kwargs = self._arguments(args)
        if isinstance(kwargs, ToolResult):
            return kwargs
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        ctx = context or ToolContext(tool_name=self.name)
        ctx.tool_name = self.name
        result = ToolResult("error", error="not run")
        for attempt in range(1, retries + 2):
            ctx.attempt = attempt
            result = await self._attempt(kwargs, ctx, timeout, thread_limiter)
            result.attempts = attempt
            if result.kind not in ("error", "timeout") or attempt > retries:
                break
            delay = backoff * (2 ** (attempt - 1))
            log.debug("tool %s attempt %d failed (%s); retrying in %.3fs", self.name, attempt, result.error, delay)
            await anyio.sleep(delay)
        return result

    def _arguments(self, args: Mapping[str, Any]) -> dict[str, Any] | ToolResult:
        """The keyword arguments of a call, or the invalid_args result the model sees."""
        try:
            model = self.validate(args)
        except pydantic.ValidationError as e:
            return ToolResult("invalid_args", error=format_validation_error(self.name, e))
        return {name: getattr(model, name) for name in type(model).model_fields}

    async def _call(self, ctx: ToolContext, kwargs: dict[str, Any],
                    thread_limiter: anyio.CapacityLimiter | None) -> Any:
        """Run the function once (a sync one in a worker thread); its value, or a ToolResult as is."""
        call_args = (ctx,) if self.takes_context else ()
        if self.is_async:
            return await self.fn(*call_args, **kwargs)
        return await anyio.to_thread.run_sync(functools.partial(self.fn, *call_args, **kwargs),
                                              abandon_on_cancel=True, limiter=thread_limiter)

    async def _attempt(
        self, kwargs: dict[str, Any], ctx: ToolContext, timeout: float | None,
        thread_limiter: anyio.CapacityLimiter | None,
    ) -> ToolResult:
        ctx.cancelled.clear()
        try:
            with anyio.move_on_after(timeout) as scope:
                raw = await self._call(ctx, kwargs, thread_limiter)
        except anyio.get_cancelled_exc_class():
            ctx.cancelled.set()
            raise
        except Exception as e:
            log.debug("tool %s raised", self.name, exc_info=True)
            return ToolResult("error", error=f"{type(e).__name__}: {e}")
        if scope.cancelled_caught:
            ctx.cancelled.set()
            return ToolResult("timeout", error=f"tool {self.name!r} did not finish within {timeout:g} s")
        return raw if isinstance(raw, ToolResult) else to_result(self.name, raw)


def to_result(tool_name: str, raw: Any) -> ToolResult:
    """Turn a tool's return value into a JSON-able ToolResult (pydantic models, dataclasses, ...)."""
    try:
        value = to_jsonable_python(raw)
        json.dumps(value, allow_nan=False)
    except (PydanticSerializationError, TypeError, ValueError) as e:
        return ToolResult(
            "bad_result",
            error=f"tool {tool_name!r} returned a value that is not JSON-serialisable ({type(raw).__name__}: {e})",
        )
    return ToolResult("ok", value=value)


def format_validation_error(tool_name: str, err: pydantic.ValidationError) -> str:
    """A short, model-readable account of what was wrong with the arguments."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"]) or "(arguments)"
        parts.append(f"{loc}: {e['msg']}")
    return f"invalid arguments for {tool_name}: " + "; ".join(parts)


@typing.overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@typing.overload
def tool(
    *, name: str | None = None, description: str | None = None, timeout: float | None = None,
    max_concurrency: int | None = None, retries: int = 0, side_effects: bool = False,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_concurrency: int | None = None,
    retries: int = 0,
    side_effects: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorate a typed function as a tool: `@tool` or `@tool(timeout=5, retries=2, ...)`.

    Args:
        fn: the function (when used bare).
        name: tool name; defaults to the function's name.
        description: defaults to the docstring's summary.
        timeout: seconds per attempt; None means the executor's default.
        max_concurrency: at most this many calls of this tool run at once.
        retries: extra attempts after an exception or a timeout (with exponential backoff).
        side_effects: the tool changes the world; it needs approval before it runs.
    """
    options = dict(name=name, description=description, timeout=timeout, max_concurrency=max_concurrency,
                   retries=retries, side_effects=side_effects)
    if fn is not None:
        return Tool(fn, **options)  # type: ignore[arg-type]
    return lambda f: Tool(f, **options)  # type: ignore[arg-type]
