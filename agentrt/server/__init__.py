"""OpenAI-compatible HTTP server (FastAPI): chat completions with tools and structured output.

Follows the Chat Completions contract as vLLM and SGLang implement it: `tools` / `tool_choice` /
`parallel_tool_calls` and `response_format` are enforced by grammars, streaming uses SSE with
tool-call deltas, errors use OpenAI's `{"error": {...}}` shape. A client that disconnects cancels
its generation, which frees its KV pages.

Hostile input is bounded: bodies over 8 MB (chunked ones too) get a 413, prompts are tokenised and
grammars compiled off the event loop (compiles in worker processes killed at their deadline), every
error, including 404/405 and faults, is OpenAI-shaped, and keywords a schema grammar cannot enforce
come back in the `x-agentrt-grammar-warnings` header (`strict: true` refuses them instead).

    app.py        create_app (the routes) and serve
    _protocol.py  request bodies, and the checks a request passes before work is spent on it
    _choices.py   running a request's n choices; their answers, streamed (SSE) or whole
    _runs.py      /v1/agent/runs: plan, dta, react and hogwild runs through Agent.stream; thread runs
    _http.py      OpenAI-shaped errors, the body-size and API-key guard, SSE framing
"""

from agentrt.server._protocol import ChatCompletionRequest, CompletionRequest
from agentrt.server.app import create_app, resolve_api_key, serve

__all__ = ["create_app", "ChatCompletionRequest", "CompletionRequest", "resolve_api_key", "serve"]
