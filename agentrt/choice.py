"""tool_choice in the SDK: what `Agent(tool_choice=...)` accepts, and what a turn that was told to call a
tool must have done (a turn without its call is an error, never an answer)."""

from __future__ import annotations

from typing import Any

from agentrt.chat import ChatResult
from agentrt.errors import BackendCapabilityError, InvalidRequestError

__all__ = ["normalize_tool_choice", "check_forced_call"]


def normalize_tool_choice(choice: Any, registry) -> str | dict:
    """"auto", "required", or one registered tool as OpenAI's {"type": "function", "function": {"name"}}."""
    if choice in ("auto", "required"):
        return choice
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    else:
        raise InvalidRequestError('tool_choice is "auto", "required", a tool\'s name or {"type": "function", '
                                  f'"function": {{"name": ...}}}}, got {choice!r}', param="tool_choice")
    if not isinstance(name, str) or name not in registry:
        tools = ", ".join(registry.names) or "none registered"
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not one of the agent's tools "
                                  f"({tools}); use 'auto', 'required' or one of them", param="tool_choice")
    return {"type": "function", "function": {"name": name}}


def check_forced_call(choice: str | dict, calls: list, result: ChatResult, backend: str, max_tokens: int) -> None:
    """A turn asked for a call (required or named) that came back without it is an error, never an answer."""
    want = choice["function"]["name"] if isinstance(choice, dict) else None
    if calls and (want is None or any(c.name == want for c in calls)):
        return
    if result.finish_reason == "length":
        raise InvalidRequestError(f"the tool call was cut at max_tokens={max_tokens}: raise max_tokens",
                                  param="max_tokens")
    what = f"a call of {want!r}" if want else "a tool call"
    got = f"calls of {[c.name for c in calls]}" if calls else f"text {result.content[:120]!r}"
    raise BackendCapabilityError(f"{backend}: tool_choice asked for {what} and the model's turn gave {got}",
                                 feature="tool_choice")
