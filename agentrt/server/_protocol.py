"""The request bodies the server takes and the checks a request passes before any work is spent on it."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agentrt.errors import ContextLengthError, InvalidRequestError
from agentrt.grammar import TOOL_ARGUMENT_CAPS
from agentrt.grammar._schema import json_extent
from agentrt.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from agentrt.threads import ThreadOptions

log = logging.getLogger(__name__)


MAX_BODY_BYTES = 8 << 20


API_KEY_ENV = "AGENTRT_API_KEY"


COMPILE_TIMEOUT_ENV = "AGENTRT_COMPILE_TIMEOUT"


TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what OpenAI accepts


WARNINGS_HEADER = "x-agentrt-grammar-warnings"


MAX_NESTING = 128  # objects and lists in one request field (the schema normaliser allows 64)


SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as vLLM takes it (torch generators take these)


MAX_N = 16  # choices per request (each a request of its own; they share the prompt's KV pages)


class SamplingRequest(BaseModel):
    """The sampling fields chat and legacy completions share (OpenAI's names; extensions marked)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1)  # extension (vLLM's): -1 or 0 is off
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM's): over prompt and output tokens
    # extension (vLLM's): each prompt token's logprob with its k most likely alternatives
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    guided_grammar: str | None = None  # extension (vLLM's name): decode under this EBNF
    ebnf: str | None = None  # the same extension under SGLang's name
    # extension: caps on tool arguments and json_schema replies for this request, e.g.
    # {"max_string_length": 512} or {"max_string_length": null} (defaults: grammar.TOOL_ARGUMENT_CAPS)
    grammar_options: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)  # extension: calls one reply may make (default 8)


class CompletionRequest(SamplingRequest):
    """Legacy `/v1/completions`: plain text (or token ids) in, continuation out, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # the top alternatives per token (0..20); 0 reports the sampled token only
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint


class AgentRunRequest(BaseModel):
    """Extension: run a server-side agent over the server's registered tools."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1)
    mode: str = "plan"  # plan | dta | react | hogwild | thread
    max_replans: int = Field(2, ge=0, le=10)
    workers: int = Field(4, ge=1, le=16)  # hogwild only
    max_tokens: int = Field(512, ge=1)
    temperature: float = 0.0
    thread: dict[str, Any] | None = None  # thread only: agentrt.threads.ThreadOptions fields


def grammar_options(fields: dict[str, Any] | None) -> dict[str, Any]:
    """The request's caps (each a positive integer or null: checked where the grammar is built)."""
    unknown = sorted(set(fields or {}) - set(TOOL_ARGUMENT_CAPS))
    if unknown:
        raise InvalidRequestError(f"grammar_options: unknown {', '.join(unknown)}; the caps are "
                                  f"{', '.join(TOOL_ARGUMENT_CAPS)}", param="grammar_options")
    return dict(fields or {})


def thread_options(fields: dict[str, Any] | None):
    try:
        return ThreadOptions(**(fields or {}))
    except TypeError as exc:
        raise InvalidRequestError(f"thread: {exc}", param="thread") from None


def check_request(body: ChatCompletionRequest, engine) -> None:
    """Refuse what OpenAI refuses, and prompts that cannot fit, before any CPU work is spent on them."""
    for field in ("messages", "tools", "response_format", "tool_choice", "stop", "grammar_options"):
        value = getattr(body, field)
        if value is not None and json_extent(value, 1 << 30)[1] > MAX_NESTING:
            raise InvalidRequestError(f"{field} is nested more than {MAX_NESTING} levels deep", param=field)
    for i, tool in enumerate(body.tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and not TOOL_NAME.fullmatch(name):
            raise InvalidRequestError(f"tools[{i}].function.name {name[:80]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                                      param=f"tools[{i}].function.name")
    check_common(body)
    check_tool_choice(body.tool_choice, body.tools)
    size = 0
    for i, m in enumerate(body.messages):
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"messages[{i}].content must be a string, a list of parts or null",
                                      param=f"messages[{i}].content")
        size += len(json.dumps(content, ensure_ascii=False)) if content is not None else 0
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls is not None:
            check_tool_calls(calls, f"messages[{i}].tool_calls")
    # a token is at most a few dozen bytes: a prompt this long cannot fit, so it is never tokenised
    if size > engine.max_context * 64:
        raise ContextLengthError(size // 64, engine.max_context,
                                 message=f"input too long: {size} characters cannot fit the model's context of "
                                         f"{engine.max_context} tokens; shorten the prompt")


def check_common(body: SamplingRequest) -> None:
    """What OpenAI refuses in the fields chat and completions share."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
    if (body.model_extra or {}).get("use_beam_search"):  # vLLM's extension: refused, not ignored
        raise InvalidRequestError("use_beam_search: agentrt has no beam search (ask for n sampled choices)",
                                  param="use_beam_search")


def check_tool_choice(choice: Any, tools: list | None) -> None:
    """OpenAI's rules: a string is none, auto or required; an object names a function of `tools`."""
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice {choice!r} is not one of none, auto, required or a named "
                                      "function", param="tool_choice")
        if choice == "required" and not tools:
            raise InvalidRequestError("tool_choice 'required' needs tools; this request has none", param="tool_choice")
        return
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError('tool_choice must be {"type": "function", "function": {"name": ...}}',
                                  param="tool_choice")
    if not tools:
        raise InvalidRequestError(f"tool_choice names {name!r} but this request has no tools", param="tool_choice")
    offered = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
    if name not in offered:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not one of the request's tools",
                                  param="tool_choice")


def check_tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRequestError(f"{param} must be a list of tool calls", param=param)
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"{param}[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                      "\"arguments\": ...}}}", param=f"{param}[{k}]")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise InvalidRequestError(f"{param}[{k}].function.arguments must be a JSON string",
                                      param=f"{param}[{k}].function.arguments")


def sampling_params_of(body: SamplingRequest, prompt_len: int, max_context: int, *, limit: int | None, logprobs: bool,
              top_logprobs: int) -> list[SamplingParams]:
    """One SamplingParams per choice: choice i draws from seed + i (each its own seed stream)."""
    room = max_context - prompt_len
    if room < 1:
        raise ContextLengthError(prompt_len, max_context)
    if limit is not None and limit > room:
        raise ContextLengthError(prompt_len, max_context, requested=limit)
    if body.stop is not None and not isinstance(body.stop, (str, list)):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    fields = dict(
        max_tokens=limit if limit is not None else room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        logprobs=logprobs, top_logprobs=top_logprobs,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
    )
    seeds = [None if body.seed is None else shift_seed(body.seed, i) for i in range(body.n)]
    return [SamplingParams(seed=seed, **fields) for seed in seeds]


def shift_seed(seed: int, i: int) -> int:
    return seed + i if seed + i <= SEED_RANGE[1] else seed - i


def completion_prompts(engine, prompt: Any) -> list[list[int]]:
    """The prompts of a completions request as token ids: a string, ids, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if len(prompt) > MAX_N:
        raise InvalidRequestError(f"at most {MAX_N} prompts per request", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = engine.encode(p) if p else []
        if not ids:
            raise InvalidRequestError(f"prompt[{i}] is empty", param="prompt")
        out.append(ids)
    return out
