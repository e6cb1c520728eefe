"""Every error a user of agentrt can hit, in one small hierarchy.

    AgentrtError
    ├── ModelNotFoundError        unknown model name, path or hub id (lists the choices)
    ├── ModelFetchError           the embedded model could not be fetched or failed its hash check
    ├── UnsupportedModelError     an architecture our own forward does not implement
    ├── InvalidRequestError       a bad argument; `.param` names it
    │   ├── SamplingParamError    temperature, top_p, top_k, max_tokens, ... out of range
    │   ├── ContextLengthError    prompt (plus room to generate) longer than the context window
    │   └── GrammarError          a constraint (schema, regex, grammar, tools) that cannot be compiled
    ├── EngineError               the engine failed while running a request (a fault, not bad input)
    │   ├── EngineClosedError     the engine was shut down
    │   └── BackendCapabilityError  a backend (a remote server) cannot enforce what was asked (a required
    │                             tool call, a schema, a grammar) and agentrt could not make up for it;
    │                             `.feature` names it
    ├── OverloadedError           the server is at a limit of concurrent work (e.g. grammar compiles); retry
    ├── RunTimeoutError           an agent run took longer than its `timeout`
    ├── KVCacheError              misuse of the paged KV cache (double free, pruning outside a sequence)
    ├── ToolError                 a tool is defined or registered wrongly (bad signature, duplicate name)
    └── PlanError                 a plan does not parse, names an unknown tool or refers to a later or
                                  unknown task; `.line` is the offending plan line

A tool's exception is never raised through this hierarchy: it is data the model sees.
"""

from __future__ import annotations

__all__ = [
    "AgentrtError",
    "ModelNotFoundError",
    "ModelFetchError",
    "UnsupportedModelError",
    "InvalidRequestError",
    "SamplingParamError",
    "ContextLengthError",
    "GrammarError",
    "EngineError",
    "EngineClosedError",
    "BackendCapabilityError",
    "OverloadedError",
    "KVCacheError",
    "RunTimeoutError",
    "ToolError",
    "PlanError",
]


class AgentrtError(Exception):
    """Base class of every agentrt error."""


class ModelNotFoundError(AgentrtError):
    def __init__(self, name: str, choices: list[str], detail: str = "") -> None:
        self.name = name
        self.choices = choices
        msg = f"unknown model {name!r}: use one of {', '.join(choices)}, a local Hugging Face directory, or a hub id"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ModelFetchError(AgentrtError):
    pass


class UnsupportedModelError(AgentrtError):
    pass


class InvalidRequestError(AgentrtError):
    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class SamplingParamError(InvalidRequestError):
    pass


class ContextLengthError(InvalidRequestError):
    def __init__(self, prompt_tokens: int, max_context: int, requested: int = 0, *,
                 message: str | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context
        need = f"{prompt_tokens} prompt tokens" + (f" + {requested} to generate" if requested else "")
        default = f"input too long: {need} exceed the model's context of {max_context} tokens; shorten the prompt"
        super().__init__(message or default, param="messages")


class GrammarError(InvalidRequestError):
    """A constraint could not be turned into a grammar: bad syntax, an unsatisfiable schema, or a
    compile that ran past its timeout. The message says which constraint and what to change."""


class EngineError(AgentrtError):
    pass


class EngineClosedError(EngineError):
    pass


class BackendCapabilityError(EngineError):
    """The backend could not enforce a constraint (`feature`: "tool_choice", "response_format",
    "grammar", "stream") and neither could agentrt on its side (a named call, a retry with the error fed
    back): the run stops here rather than return an unconstrained answer as if it were constrained."""

    def __init__(self, message: str, feature: str | None = None) -> None:
        self.feature = feature
        super().__init__(message)


class OverloadedError(AgentrtError):
    """Too much of some bounded work is running already (grammar compiles): retry later."""


class KVCacheError(AgentrtError):
    pass


class ToolError(AgentrtError):
    pass


class PlanError(AgentrtError):
    def __init__(self, message: str, line: str | None = None) -> None:
        self.line = line
        super().__init__(f"{message} (in plan line {line!r})" if line else message)


class RunTimeoutError(AgentrtError):
    pass
