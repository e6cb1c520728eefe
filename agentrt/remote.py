"""RemoteBackend: any OpenAI-compatible server, in the dialect it takes constraints in (vLLM, SGLang,
llama-cpp-python, llama.cpp, agentrt), probed once; what a server cannot enforce is made up for on our
side, checked, or refused, and said in the run's notes."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio.lowlevel
import httpx
import xgrammar as xgr

from agentrt.chat import ChatEvent, ChatOptions, ChatResult, ToolCall
from agentrt.errors import BackendCapabilityError, EngineError, InvalidRequestError
from agentrt.gbnf import ebnf_to_gbnf
from agentrt.notes import note
from agentrt.engine.sampling import SamplingParams

__all__ = ["RemoteBackend", "RemoteChatResult", "Dialect", "DIALECTS", "grammar_accepts"]

log = logging.getLogger(__name__)

# --- remote servers: how each one takes constraints ----------------------------------------------------
#
# Sources, read for the exact request fields (none of their code is used here):
#   vLLM       docs/features/structured_outputs.md: `structured_outputs: {json, regex, choice, grammar}`
#              (https://docs.vllm.ai/en/latest/features/structured_outputs/); the `guided_json`/`guided_grammar`
#              fields it replaced were removed in v0.12.0 (same page), so servers before 0.10.2 get those.
#              docs/features/tool_calling.md: named choice, `auto`, `none`, and `required` as of vllm>=0.8.3.
#              `/version` answers {"version": ...}; ModelCard `owned_by: str = "vllm"`
#              (vllm/entrypoints/openai/protocol.py).
#   SGLang     docs/advanced_features/structured_outputs.md (https://docs.sglang.io): one of `json_schema`,
#              `regex` or `ebnf` per request (xgrammar's EBNF by default) beside OpenAI's response_format;
#              docs/advanced_features/tool_parser.md: tool_choice auto, required and named.
#              ModelCard `owned_by: str = "sglang"` (python/sglang/srt/entrypoints/openai/protocol.py).
#   llama-cpp-python  llama_cpp/server/types.py: chat requests take `grammar` (GBNF text, parsed by
#              llama_cpp.LlamaGrammar.from_string in llama_cpp/server/app.py) and response_format
#              {"type": "json_object", "schema": ...} (llama_cpp/llama_types.py, ChatCompletionRequestResponseFormat:
#              type is "text" or "json_object" only); llama_cpp/llama_chat_format.py builds a grammar only for a
#              *named* tool_choice (from that tool's schema; a "required" choice is ignored by the chatml
#              handlers). `/v1/models` answers `"owned_by": "me"` (llama_cpp/server/app.py).
#   llama.cpp  tools/server/README.md (ggml-org/llama.cpp): `grammar` (GBNF), `json_schema`, response_format
#              json_object/json_schema; tool calls need `--jinja`, tool_choice "auto", "none" or "required" (an
#              object is read as "auto": a named choice is not kept); `/props` answers its settings;
#              `"owned_by": "llamacpp"` (tools/server/server-context.cpp).
# Sampling beyond OpenAI's fields: vLLM's and SGLang's chat requests take `top_k` (-1: off) and
# `repetition_penalty` (docs: "extra parameters"), and fill what a request leaves out from the model's
# generation_config; llama-cpp-python (llama_cpp/server/types.py) takes `top_k` (default 40), `repeat_penalty`
# (default 1.1) and `min_p` (default 0.05); llama.cpp's server takes the same plus `repeat_last_n` (the
# penalties' window, default 64; -1: the whole context). So they are always sent, with agentrt's values.

@dataclass(frozen=True)
class Dialect:
    """How one kind of server takes constraints."""

    name: str
    grammar: str | None  # how an EBNF grammar travels: structured_outputs, guided_grammar, ebnf, gbnf; None: unknown
    json_object_schema: bool = False  # json_schema replies travel as {"type": "json_object", "schema": ...}
    required: bool = True  # enforces tool_choice "required"
    named: bool = True  # enforces a named tool_choice
    # sampling beyond OpenAI's fields (every dialect takes frequency/presence penalties, logprobs, top_logprobs):
    top_k_off: int | None = -1  # the top_k that means "off" (None: no top_k field)
    repetition: str | None = "repetition_penalty"  # the field of a repetition penalty (None: none)
    llama_sampler: bool = False  # llama.cpp's samplers: min_p 0.05 by default (turned off), penalties over a window


DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    Dialect("agentrt", "guided_grammar"),
    Dialect("vllm", "structured_outputs"),
    Dialect("vllm-guided", "guided_grammar"),  # vLLM before 0.10.2 (its `guided_*` fields)
    Dialect("sglang", "ebnf"),
    Dialect("llama-cpp-python", "gbnf", json_object_schema=True, required=False, top_k_off=0,
            repetition="repeat_penalty", llama_sampler=True),
    Dialect("llama.cpp", "gbnf", named=False, top_k_off=0, repetition="repeat_penalty", llama_sampler=True),
    # a server we do not know: OpenAI's fields, nothing assumed enforced
    Dialect("openai", None, top_k_off=None, repetition=None),
)}
_OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama.cpp", "agentrt": "agentrt",
             "me": "llama-cpp-python"}


def _version(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        nums.append(int(digits))
    return tuple(nums)


class RemoteBackend:
    """Any OpenAI-compatible server. The server's dialect (vLLM, SGLang, llama-cpp-python, llama.cpp,
    agentrt, or an unknown OpenAI-compatible one) is probed once (`/v1/models`, `/version`, `/props`) or
    given as `dialect=`; constraints travel in the fields that server reads. What it cannot enforce is
    made up for here (a named call instead of `required`, a grammar-picked tool, one retry with the
    problem fed back), checked (a plan grammar against the text that came back), or refused with
    BackendCapabilityError; what was done instead is said in the run's notes."""

    kv_features = False

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 600.0,
                 dialect: str | Dialect | None = None, transport: Any = None) -> None:
        self.name = model
        self.base_url = base_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._transport = transport  # an httpx transport (tests: httpx.MockTransport)
        self._http: Any = None  # an httpx.AsyncClient, made in (and only used from) one event loop
        self._http_loop: Any = None
        if isinstance(dialect, str):
            if dialect not in DIALECTS:
                raise InvalidRequestError(f"dialect {dialect!r} is not one of {', '.join(DIALECTS)}",
                                          param="dialect")
            dialect = DIALECTS[dialect]
        self._dialect: Dialect | None = dialect

    @property
    def http(self):
        """The httpx client of the running event loop. Its connections belong to the loop that opened
        them, so a client made in another loop (one `run_sync` started and closed) is not reused."""

        loop = anyio.lowlevel.current_token()
        if self._http is not None and self._http_loop != loop:
            log.debug("event loop changed: a new httpx client for %s", self.base_url)
            self._http = None
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                           transport=self._transport)
            self._http_loop = loop
        return self._http

    async def release(self) -> None:
        """Close the connections of the running loop's client (before that loop ends); the next request
        opens new ones. The backend stays usable."""

        client, loop, self._http, self._http_loop = self._http, self._http_loop, None, None
        if client is not None and loop == anyio.lowlevel.current_token():
            await client.aclose()  # a client of a loop that has ended has nothing left to close there

    async def aclose(self) -> None:
        await self.release()

    # --- which server --------------------------------------------------------------------------------
    async def dialect(self) -> Dialect:
        """The server's dialect, probed on first use and kept."""
        if self._dialect is None:
            self._dialect = await self._probe()
            log.info("%s speaks the %s dialect", self.base_url, self._dialect.name)
        return self._dialect

    async def _get_json(self, url: str) -> Any:

        try:
            r = await self.http.get(url)
        except httpx.HTTPError as exc:
            raise EngineError(f"{self.base_url}: cannot reach the server ({exc!r})") from exc
        if r.status_code != 200:
            return None
        try:
            return r.json()
        except ValueError:
            return None

    async def _probe(self) -> Dialect:
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        listing = await self._get_json(self.base_url + "/models")
        owners = [m.get("owned_by") for m in (listing or {}).get("data", []) if isinstance(m, dict)] \
            if isinstance(listing, dict) else []
        kind = next((_OWNED_BY[o] for o in owners if o in _OWNED_BY), None)
        if kind == "vllm":
            info = await self._get_json(root + "/version")
            version = _version(str(info.get("version", ""))) if isinstance(info, dict) else ()
            if version and version < (0, 10, 2):
                return replace(DIALECTS["vllm-guided"], required=version >= (0, 8, 3))
            return DIALECTS["vllm"]
        if kind is not None:
            return DIALECTS[kind]
        props = await self._get_json(root + "/props")
        if isinstance(props, dict) and ("default_generation_settings" in props or "build_info" in props):
            return DIALECTS["llama.cpp"]
        return DIALECTS["openai"]

    # --- requests ------------------------------------------------------------------------------------
    def _body(self, messages: list[dict], params: SamplingParams, **extra: Any) -> dict:
        if self._dialect is not None and self._dialect.name == "llama-cpp-python":
            messages = [_string_content(m) for m in messages]
        body = {"model": self.name, "messages": messages, "stream": True, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p,
                **self._sampling_fields(self._dialect or DIALECTS["openai"], params), **extra}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        return body

    def _sampling_fields(self, d: Dialect, params: SamplingParams) -> dict:
        """Penalties, top_k and logprobs in the fields `d` takes them in: the ones a server would default
        otherwise (llama.cpp's top_k 40, a model's generation_config in vLLM) always; one `d` has no field for,
        asked for, is refused."""
        fields: dict[str, Any] = {}
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(params, name):
                fields[name] = getattr(params, name)
        if d.top_k_off is not None:
            fields["top_k"] = params.top_k or d.top_k_off
        elif params.top_k:
            self._refuse(d, "top_k", params.top_k, [o.name for o in DIALECTS.values() if o.top_k_off is not None])
        if d.repetition is not None:
            fields[d.repetition] = params.repetition_penalty
        elif params.repetition_penalty != 1.0:
            self._refuse(d, "repetition_penalty", params.repetition_penalty,
                         [o.name for o in DIALECTS.values() if o.repetition is not None])
        if d.llama_sampler:
            fields["min_p"] = 0.0
            if d.name == "llama.cpp":
                fields["repeat_last_n"] = -1  # the penalties over the whole context (prompt too)
            if d.name == "llama-cpp-python" and params.penalized:
                note("llama-cpp-python applies its penalties over the last last_n_tokens_size tokens (a server "
                     "setting, 64 by default); agentrt's repetition penalty counts every prompt and output token, "
                     "its frequency and presence penalties the output's")
            elif params.frequency_penalty or params.presence_penalty:
                note(f"{d.name} applies frequency and presence penalties over prompt and output tokens; "
                     "agentrt's count the output's only")
        if params.logprobs or params.top_logprobs:
            fields["logprobs"] = True
            if params.top_logprobs:
                fields["top_logprobs"] = params.top_logprobs
        return fields

    def _refuse(self, d: Dialect, name: str, value: Any, having: list[str]) -> None:
        raise BackendCapabilityError(f"{self.base_url} ({d.name}) takes no {name} (asked: {value}); the dialects "
                                     f"that have one: {', '.join(having)} (RemoteBackend(dialect=...))",
                                     feature="sampling")

    @staticmethod
    def _grammar_fields(d: Dialect, grammar: str) -> dict:
        if d.grammar == "structured_outputs":
            return {"structured_outputs": {"grammar": grammar}}
        if d.grammar == "guided_grammar":
            return {"guided_grammar": grammar}
        if d.grammar == "ebnf":
            return {"ebnf": grammar}
        if d.grammar == "gbnf":
            return {"grammar": ebnf_to_gbnf(grammar)}
        note("the server's dialect is unknown: the grammar was sent as guided_grammar and ebnf, which it may "
             "ignore; what came back is checked against it")
        return {"guided_grammar": grammar, "ebnf": grammar}

    def _response_format(self, d: Dialect, fmt: dict) -> dict:
        if d.json_object_schema and fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            return {"type": "json_object", "schema": schema} if isinstance(schema, dict) else {"type": "json_object"}
        return fmt

    async def _chunks(self, body: dict) -> AsyncIterator[dict]:
        """The parsed SSE chunks of one streamed request. A stream that stops before any choice finished
        (a server that failed mid-reply and closed it) is an error, not an empty success."""

        finished = False
        try:
            async with self.http.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:500]
                    raise (InvalidRequestError if r.status_code < 500 else EngineError)(
                        f"{self.base_url} answered {r.status_code}: {detail}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise EngineError(f"{self.base_url} streamed a chunk that is not JSON: {data[:200]!r}") from exc
                    if not isinstance(obj, dict):
                        raise EngineError(f"{self.base_url} streamed a chunk that is not an object: {data[:200]!r}")
                    if obj.get("error"):
                        err = obj["error"]
                        raise EngineError(f"{self.base_url}: {err.get('message') if isinstance(err, dict) else err}")
                    finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                               for c in obj.get("choices") or [])
                    yield obj
        except httpx.HTTPError as exc:
            raise EngineError(f"{self.base_url}: the stream broke off ({exc!r})") from exc
        if not finished:
            raise EngineError(f"{self.base_url}: the stream ended before the reply finished (no finish_reason): "
                              "the server failed while answering")

    async def _turn(self, body: dict) -> tuple[list[ChatEvent], ChatResult]:
        """One streamed chat request, as the events it makes and its result."""
        events: list[ChatEvent] = []
        content, calls, reason, usage = "", [], "stop", {}
        logprobs: list[dict] | None = [] if body.get("logprobs") else None
        async for obj in self._chunks(body):
            usage = obj.get("usage") or usage
            for choice in obj.get("choices", []):
                delta = choice.get("delta") or {}
                if logprobs is not None:
                    logprobs += _token_logprobs(choice.get("logprobs"))
                if delta.get("content"):
                    content += delta["content"]
                    events.append(ChatEvent("content", delta["content"]))
                for tc in delta.get("tool_calls") or []:
                    i, fn = tc.get("index", 0), tc.get("function") or {}
                    if i >= len(calls):
                        calls.append(ToolCall(tc.get("id") or f"call_{i}", fn.get("name", ""), ""))
                        events.append(ChatEvent("call_start", index=i, call_id=calls[i].id, name=calls[i].name))
                    if fn.get("arguments"):
                        calls[i].arguments += fn["arguments"]
                        events.append(ChatEvent("call_args", fn["arguments"], index=i))
                reason = choice.get("finish_reason") or reason
        for i, call in enumerate(calls):  # a server reports a cut-short call only through finish_reason
            call.complete = not (reason == "length" and i == len(calls) - 1)
        return events, RemoteChatResult(content, calls, reason, usage.get("prompt_tokens", 0),
                                        usage.get("completion_tokens", 0), logprobs=logprobs)

    async def _tool_fields(self, d: Dialect, messages: list[dict], options: ChatOptions,
                           params: SamplingParams) -> dict:
        """`tools` and `tool_choice` as this server enforces them; what it cannot is made up for."""
        tools, choice = options.tools, options.tool_choice
        named = _named_choice(choice)
        if named is not None and not d.named:
            tools = [t for t in tools if (t.get("function") or t).get("name") == named]
            if d.required:  # one tool offered and a call required is that tool's call
                choice = "required"
                note(f"{d.name} does not keep a named tool_choice: only {named!r} was offered, with "
                     "tool_choice 'required'")
            else:
                choice = "auto"
        elif choice == "required" and not d.required:
            names = [(t.get("function") or t).get("name") for t in tools]
            if d.named and len(names) == 1:
                choice = {"type": "function", "function": {"name": names[0]}}
                note(f"{d.name} does not enforce tool_choice 'required': asked for a call of {names[0]!r}, "
                     "the only tool, by name")
            elif d.named and d.grammar is not None:
                pick = await self._pick_tool(d, messages, tools, params)
                choice = {"type": "function", "function": {"name": pick}}
                note(f"{d.name} does not enforce tool_choice 'required': the model first picked {pick!r} "
                     "under a grammar of the tool names, then that call was asked for by name")
        return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": options.parallel_tool_calls}

    async def _pick_tool(self, d: Dialect, messages: list[dict], tools: list[dict], params: SamplingParams) -> str:
        """Which tool the model calls, decoded under a grammar that allows only the tools' names."""
        specs = [t.get("function") or t for t in tools]
        names = [s["name"] for s in specs]
        listing = "\n".join(f"- {s['name']}: {s.get('description', '')}" for s in specs)
        ask = [*messages, {"role": "user", "content": f"Which of these tools must be called now?\n{listing}\n"
                                                      "Answer with the tool's name only."}]
        grammar = "root ::= " + " | ".join(json.dumps(n) for n in names)
        body = self._body(ask, replace(params, max_tokens=max(16, max(len(n) for n in names) + 4), logprobs=False,
                                       top_logprobs=0), **self._grammar_fields(d, grammar))
        _, result = await self._turn(body)
        pick = result.content.strip()
        if pick not in names:
            raise BackendCapabilityError(f"{self.base_url} ({d.name}): asked to pick one of {names} under a grammar, "
                                         f"it answered {pick[:80]!r}", feature="tool_choice")
        return pick

    async def chat(self, messages: list[dict], options: ChatOptions, params: SamplingParams
                   ) -> AsyncIterator[ChatEvent | ChatResult]:
        d = await self.dialect()
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}}
        forced = bool(options.tools) and options.tool_choice not in ("auto", "none")
        if options.tools:
            extra.update(await self._tool_fields(d, messages, options, params))
        if options.response_format:
            extra["response_format"] = self._response_format(d, options.response_format)
        if options.grammar is not None:
            extra.update(self._grammar_fields(d, options.grammar))
        events, result = await self._turn(self._body(messages, params, **extra))
        want = _named_choice(options.tool_choice)
        if forced and result.finish_reason != "length" and not _has_call(result, want):
            # the server did not keep the choice: once more, with what was wrong said to the model
            what = f"a call of the tool {want!r}" if want else "a call of one of the tools"
            got = f"calls of {[c.name for c in result.tool_calls]}" if result.tool_calls else "no tool call"
            note(f"{d.name} answered a turn that had to call a tool with {got}: asked once more")
            retry = [*messages, {"role": "assistant", "content": result.content or ""},
                     {"role": "user", "content": f"That answer made {got}. Answer now with {what} only."}]
            events, result = await self._turn(self._body(retry, params, **extra))
        for ev in events:  # a forced turn's text is shown only for the turn that is kept
            yield ev
        yield result

    async def text(self, prompt: str, grammar: str | None, params: SamplingParams) -> AsyncIterator[str]:
        """Text chunks for `prompt`, decoded under `grammar` (EBNF) by the server. A stream that ran to
        its end is checked against the grammar: text it does not accept (a server that ignored it) is
        BackendCapabilityError, never a plan or tree that merely looks like one."""
        d = await self.dialect()
        extra = self._grammar_fields(d, grammar) if grammar is not None else {}
        parts: list[str] = []
        reason = None
        async for obj in self._chunks(self._body([{"role": "user", "content": prompt}], params, **extra)):
            for choice in obj.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                reason = choice.get("finish_reason") or reason
                if text:
                    parts.append(text)
                    yield text
        if grammar is not None and not grammar_accepts(grammar, "".join(parts), complete=reason != "length"):
            raise BackendCapabilityError(
                f"{self.base_url} ({d.name}) answered text its grammar does not accept: the server did not "
                f"enforce the grammar (sent as {d.grammar or 'guided_grammar/ebnf'}); text: "
                f"{''.join(parts)[:200]!r}", feature="grammar")


@dataclass
class RemoteChatResult(ChatResult):
    """A remote turn's ChatResult; `logprobs`, when the request asked for them: per token the server
    streamed, {"token", "logprob", "top_logprobs": [{"token", "logprob"}]}."""

    logprobs: list[dict] | None = None


def _token_logprobs(logprobs: Any) -> list[dict]:
    """The tokens of one chunk's `logprobs` (OpenAI's chat shape: {"content": [...]}), without bytes."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return [{"token": e.get("token"), "logprob": e.get("logprob"),
             "top_logprobs": [{"token": a.get("token"), "logprob": a.get("logprob")}
                              for a in e.get("top_logprobs") or [] if isinstance(a, dict)]}
            for e in content or [] if isinstance(e, dict)]


def _string_content(message: dict) -> dict:
    """llama-cpp-python takes an assistant message's content only as a string (llama_cpp/llama_types.py,
    ChatCompletionRequestAssistantMessage), and its chatml formatters show the model only the content: a
    message that made calls says them in its content."""
    if message.get("role") != "assistant" or isinstance(message.get("content"), str) and message["content"]:
        return message
    calls = [c.get("function") or {} for c in message.get("tool_calls") or []]
    said = "\n".join(f"{c.get('name')}({c.get('arguments') or '{}'})" for c in calls)
    return {**message, "content": said}


def _named_choice(choice: Any) -> str | None:
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else choice
        return fn.get("name") if isinstance(fn, dict) else None
    return None


def _has_call(result: ChatResult, name: str | None) -> bool:
    calls = [c for c in result.tool_calls if c.complete]
    return bool(calls) and (name is None or any(c.name == name for c in calls))


def grammar_accepts(grammar: str, text: str, *, complete: bool = True) -> bool:
    """Whether `text` is a sentence of the EBNF `grammar` (`complete=False`: a prefix of one), checked by
    xgrammar over bytes (no tokenizer needed)."""

    matcher = xgr.GrammarMatcher(_byte_compiled(grammar), terminate_without_stop_token=True)
    if not matcher.accept_string(text):
        return False
    return matcher.is_terminated() or not complete


@functools.lru_cache(maxsize=32)  # a thread or plan checks the same grammar request after request
def _byte_compiled(grammar: str):

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]), cache_enabled=False)  # bytes only: no vocabulary
    return compiler.compile_grammar(xgr.Grammar.from_ebnf(grammar))
