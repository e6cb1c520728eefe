"""RemoteBackend's dialects against recorded exchanges: each fake server answers the request and
response shapes its project documents (vLLM, SGLang, llama.cpp, llama-cpp-python, an unknown
OpenAI-compatible server) through an httpx.MockTransport, and asserts the fields each dialect must
send. No server runs; CI covers every dialect.

Shapes, from the projects' docs and code (see the comments in agentrt/backends.py):
  - `/v1/models` cards: `owned_by` "vllm", "sglang", "llamacpp", "me" (llama-cpp-python); vLLM's
    `/version` answers {"version": "x.y.z"}; llama.cpp's `/props` answers its settings.
  - streamed chat chunks: `chat.completion.chunk` objects with `choices[].delta` (content or
    `tool_calls[]` with index, id, type, function name, then argument fragments) and a last
    `finish_reason`, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import re

import anyio
import httpx
import pytest
from pydantic import BaseModel

import agentrt
from agentrt.gbnf import ebnf_to_gbnf
from agentrt.notes import collect_notes
from agentrt.remote import DIALECTS, RemoteBackend, grammar_accepts
from agentrt.chat import ChatOptions, ChatResult
from agentrt.errors import BackendCapabilityError, EngineError, GrammarError, InvalidRequestError
from agentrt.engine.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=32, temperature=0.0)
PLAN_GRAMMAR = 'root ::= "1. pick(" [a-z] [a-z]? [a-z]? ")"'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time of a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def chunk(delta: dict | None = None, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]}


def text_reply(text: str, finish: str = "stop") -> list[dict]:
    return [chunk({"role": "assistant", "content": ""}), chunk({"content": text}), chunk({}, finish)]


def call_reply(name: str, arguments: str) -> list[dict]:
    return [chunk({"role": "assistant", "content": None}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
            chunk({}, "tool_calls")]


def sse(chunks: list[dict], done: bool = True) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + (b"data: [DONE]\n\n" if done else b"")


class FakeServer:
    """A recorded server: probe answers by kind, then the queued replies, in order, to chat requests."""

    def __init__(self, kind: str, version: str | None = None) -> None:
        self.kind, self.version = kind, version
        self.bodies: list[dict] = []
        self.gets: list[str] = []
        self.replies: list[bytes | httpx.Response] = []

    def reply(self, chunks: list[dict], done: bool = True) -> FakeServer:
        self.replies.append(sse(chunks, done))
        return self

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET":
            self.gets.append(path)
            owner = {"vllm": "vllm", "sglang": "sglang", "llama.cpp": "llamacpp", "llama-cpp-python": "me",
                     "openai": "organization-owner"}[self.kind]
            if path == "/v1/models":
                return httpx.Response(200, json={"object": "list", "data": [
                    {"id": "m", "object": "model", "created": 1, "owned_by": owner}]})
            if path == "/version" and self.kind == "vllm":
                return httpx.Response(200, json={"version": self.version or "0.11.0"})
            if path == "/props" and self.kind == "llama.cpp":
                return httpx.Response(200, json={"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1,
                                                 "build_info": "b6000"})
            return httpx.Response(404, json={"detail": "Not Found"})
        assert path == "/v1/chat/completions", path
        self.bodies.append(json.loads(request.content))
        reply = self.replies.pop(0)
        if isinstance(reply, httpx.Response):
            return reply
        return httpx.Response(200, content=reply, headers={"content-type": "text/event-stream"})

    def backend(self, **kwargs) -> RemoteBackend:
        return RemoteBackend("http://fake:8000/v1", "m", transport=httpx.MockTransport(self.handler), **kwargs)


def chat(backend: RemoteBackend, messages: list[dict], options: ChatOptions) -> tuple[ChatResult, list[str]]:
    async def go():
        with collect_notes() as notes:
            events = [ev async for ev in backend.chat(messages, options, PARAMS)]
            return events[-1], notes

    return anyio.run(go)


def text(backend: RemoteBackend, grammar: str | None) -> tuple[str, list[str]]:
    async def go():
        with collect_notes() as notes:
            return "".join([t async for t in backend.text("make a plan", grammar, PARAMS)]), notes

    return anyio.run(go)


USER = [{"role": "user", "content": "weather in Paris?"}]


# --- probing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,version,dialect", [
    ("vllm", "0.11.0", "vllm"), ("vllm", "0.9.1", "vllm-guided"), ("sglang", None, "sglang"),
    ("llama.cpp", None, "llama.cpp"), ("llama-cpp-python", None, "llama-cpp-python"), ("openai", None, "openai")])
def test_the_dialect_is_probed_once_from_models_version_and_props(kind, version, dialect):
    server = FakeServer(kind, version).reply(text_reply("hi")).reply(text_reply("again"))
    backend = server.backend()
    chat(backend, USER, ChatOptions())
    chat(backend, USER, ChatOptions())
    assert anyio.run(backend.dialect).name == dialect
    assert server.gets[0] == "/v1/models" and len(server.gets) == len(set(server.gets))  # once each
    assert len(server.gets) <= 3


def test_a_given_dialect_is_not_probed_and_an_unknown_one_is_refused():
    server = FakeServer("vllm").reply(text_reply("hi"))
    chat(server.backend(dialect="sglang"), USER, ChatOptions())
    assert server.gets == []
    with pytest.raises(InvalidRequestError) as err:
        RemoteBackend("http://fake/v1", "m", dialect="tgi")
    assert err.value.param == "dialect" and "vllm" in str(err.value)


def test_vllm_before_0_8_3_gets_a_named_call_instead_of_required():
    server = FakeServer("vllm", "0.8.0").reply(call_reply("get_weather", '{"city": "Paris"}'))
    result, notes = chat(server.backend(), USER, ChatOptions(tools=[WEATHER], tool_choice="required"))
    assert server.bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert result.tool_calls[0].name == "get_weather" and any("by name" in n for n in notes)


# --- vLLM -----------------------------------------------------------------------------------------------
def test_vllm_takes_a_grammar_in_structured_outputs_and_the_text_is_checked_against_it():
    server = FakeServer("vllm").reply(text_reply("1. pick(ab)"))
    out, notes = text(server.backend(), PLAN_GRAMMAR)
    body = server.bodies[0]
    assert body["structured_outputs"] == {"grammar": PLAN_GRAMMAR}
    assert "guided_grammar" not in body and "ebnf" not in body and "grammar" not in body
    assert out == "1. pick(ab)" and notes == []


def test_vllm_before_0_10_2_takes_guided_grammar():
    server = FakeServer("vllm", "0.9.1").reply(text_reply("1. pick(ab)"))
    text(server.backend(), PLAN_GRAMMAR)
    assert server.bodies[0]["guided_grammar"] == PLAN_GRAMMAR and "structured_outputs" not in server.bodies[0]


def test_vllm_required_tool_choice_and_json_schema_travel_as_openai_fields():
    server = FakeServer("vllm").reply(call_reply("get_time", '{"city": "Paris"}'))
    result, notes = chat(server.backend(), USER, ChatOptions(tools=[WEATHER, TIME], tool_choice="required"))
    body = server.bodies[0]
    assert body["tool_choice"] == "required" and [t["function"]["name"] for t in body["tools"]] == [
        "get_weather", "get_time"]
    assert body["stream"] is True
    assert [(c.name, c.arguments, c.complete) for c in result.tool_calls] == [("get_time", '{"city": "Paris"}', True)]
    assert result.finish_reason == "tool_calls" and notes == []

    fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}}
    server.reply(text_reply('{"a": 1}'))
    chat(server.backend(dialect="vllm"), USER, ChatOptions(response_format=fmt))
    assert server.bodies[-1]["response_format"] == fmt


# --- SGLang ---------------------------------------------------------------------------------------------
def test_sglang_takes_ebnf_and_named_tool_choice_as_is():
    server = FakeServer("sglang").reply(text_reply("1. pick(xyz)"))
    out, _ = text(server.backend(), PLAN_GRAMMAR)
    assert server.bodies[0]["ebnf"] == PLAN_GRAMMAR and "structured_outputs" not in server.bodies[0]
    named = {"type": "function", "function": {"name": "get_time"}}
    server.reply(call_reply("get_time", '{"city": "Oslo"}'))
    result, notes = chat(server.backend(), USER, ChatOptions(tools=[WEATHER, TIME], tool_choice=named))
    assert server.bodies[-1]["tool_choice"] == named and len(server.bodies[-1]["tools"]) == 2
    assert result.tool_calls[0].name == "get_time" and notes == []


def test_a_server_that_ignores_the_grammar_is_caught_not_reported_as_a_plan():
    server = FakeServer("sglang").reply(text_reply("Sure! Here is a plan: call weather()"))
    with pytest.raises(BackendCapabilityError, match="grammar does not accept") as err:
        text(server.backend(), PLAN_GRAMMAR)
    assert err.value.feature == "grammar"


def test_text_cut_at_max_tokens_is_checked_as_a_prefix():
    server = FakeServer("sglang").reply(text_reply("1. pi", finish="length"))
    assert text(server.backend(), PLAN_GRAMMAR)[0] == "1. pi"
    server.reply(text_reply("2. pi", finish="length"))
    with pytest.raises(BackendCapabilityError):
        text(server.backend(), PLAN_GRAMMAR)


# --- llama.cpp and llama-cpp-python -------------------------------------------------------------------
def test_llama_cpp_takes_gbnf_and_a_named_choice_becomes_the_one_tool_required():
    server = FakeServer("llama.cpp").reply(text_reply("1. pick(ab)"))
    text(server.backend(), PLAN_GRAMMAR)
    assert server.bodies[0]["grammar"] == ebnf_to_gbnf(PLAN_GRAMMAR)
    server.reply(call_reply("get_time", "{}"))
    _, notes = chat(server.backend(), USER, ChatOptions(tools=[WEATHER, TIME],
                                                        tool_choice={"type": "function", "function": {"name": "get_time"}}))
    body = server.bodies[-1]
    assert body["tool_choice"] == "required" and [t["function"]["name"] for t in body["tools"]] == ["get_time"]
    assert any("named tool_choice" in n for n in notes)


def test_llama_cpp_python_gets_json_object_with_schema_and_string_contents():
    server = FakeServer("llama-cpp-python").reply(text_reply('{"a": 1}'))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}]
    chat(server.backend(), history, ChatOptions(response_format={"type": "json_schema",
                                                                 "json_schema": {"name": "o", "schema": schema}}))
    body = server.bodies[0]
    assert body["response_format"] == {"type": "json_object", "schema": schema}
    assert body["messages"][1]["content"] == 'get_weather({"city": "Paris"})'  # never None there


def test_llama_cpp_python_required_over_several_tools_picks_under_a_grammar_then_names_it():
    server = (FakeServer("llama-cpp-python").reply(text_reply("get_time"))
              .reply(call_reply("get_time", '{"city": "Rome"}')))
    result, notes = chat(server.backend(), USER, ChatOptions(tools=[WEATHER, TIME], tool_choice="required"))
    pick, call = server.bodies
    assert pick["grammar"] == ebnf_to_gbnf('root ::= "get_weather" | "get_time"') and "tools" not in pick
    assert call["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert result.tool_calls[0].name == "get_time" and any("picked 'get_time'" in n for n in notes)


# --- never silent ---------------------------------------------------------------------------------------
def test_a_required_turn_without_a_call_is_asked_once_more_with_the_problem_said():
    server = FakeServer("openai").reply(text_reply("I think it is sunny.")).reply(call_reply("get_weather", "{}"))
    result, notes = chat(server.backend(), USER, ChatOptions(tools=[WEATHER], tool_choice="required"))
    retry = server.bodies[1]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "I think it is sunny."}
    assert "no tool call" in retry[-1]["content"] and retry[-1]["role"] == "user"
    assert result.tool_calls and any("asked once more" in n for n in notes)


def test_the_agent_refuses_a_required_turn_that_never_calls(tmp_path):
    server = FakeServer("openai").reply(text_reply("No.")).reply(text_reply("Still no."))

    @agentrt.tool
    def get_weather(city: str) -> str:
        """Weather.

        Args:
            city: The city.
        """
        return "sunny"

    agent = agentrt.Agent(server.backend(), tools=[get_weather], tool_choice="required")
    with pytest.raises(BackendCapabilityError, match="tool_choice"):
        agent.run_sync("weather?")
    assert len(server.bodies) == 2


@pytest.mark.parametrize("stream", [
    [chunk({"role": "assistant", "content": ""})],  # the server raised mid-reply and closed the stream
    [],
])
def test_a_stream_that_ends_without_finishing_is_an_error_not_an_empty_answer(stream):
    server = FakeServer("vllm").reply(stream, done=False)
    with pytest.raises(EngineError, match="ended before the reply finished"):
        chat(server.backend(), USER, ChatOptions(tools=[WEATHER], tool_choice="required"))


def test_an_error_event_in_the_stream_and_a_bad_chunk_are_errors():
    server = FakeServer("vllm")
    server.replies.append(b'data: {"error": {"message": "tool parser failed", "code": 500}}\n\n')
    with pytest.raises(EngineError, match="tool parser failed"):
        chat(server.backend(), USER, ChatOptions())
    server.replies.append(b"data: {not json\n\n")
    with pytest.raises(EngineError, match="not JSON"):
        chat(server.backend(), USER, ChatOptions())
    server.replies.append(httpx.Response(400, json={"error": {"message": "response_format: Input should be 'text'"}}))
    with pytest.raises(InvalidRequestError, match="400"):
        chat(server.backend(), USER, ChatOptions())


def test_an_unknown_server_gets_both_grammar_fields_and_a_note():
    server = FakeServer("openai").reply(text_reply("1. pick(ab)"))
    out, notes = text(server.backend(), PLAN_GRAMMAR)
    assert server.bodies[0]["guided_grammar"] == server.bodies[0]["ebnf"] == PLAN_GRAMMAR
    assert any("unknown" in n for n in notes)


class City(BaseModel):
    name: str
    country: str


def test_the_agent_over_a_recorded_vllm_required_call_then_answer_with_notes_and_close():
    server = (FakeServer("vllm", "0.8.0")  # no "required" yet: a named call stands in, and the run says so
              .reply(call_reply("get_weather", '{"city": "Paris"}'))
              .reply(text_reply("It is sunny in Paris."))
              .reply(text_reply('{"name": "Paris", "country": "France"}')))

    @agentrt.tool
    def get_weather(city: str) -> str:
        """Weather.

        Args:
            city: The city.
        """
        return f"sunny in {city}"

    with agentrt.Agent(server.backend(), tools=[get_weather], tool_choice="required", output_type=City) as agent:
        result = agent.run_sync("weather in Paris?")
    assert result.output == City(name="Paris", country="France")
    assert [(c.name, c.observation) for c in result.tool_calls] == [("get_weather", "sunny in Paris")]
    assert any("by name" in n for n in result.notes)
    assert server.bodies[2]["response_format"]["type"] == "json_schema"


# --- sampling beyond OpenAI's fields -------------------------------------------------------------------
SAMPLED = SamplingParams(max_tokens=8, temperature=0.7, top_k=5, frequency_penalty=0.5, presence_penalty=0.25,
                         repetition_penalty=1.3, logprobs=True, top_logprobs=3)
ASKED = {"frequency_penalty": 0.5, "presence_penalty": 0.25, "logprobs": True, "top_logprobs": 3}


def sampled_body(kind: str, params: SamplingParams) -> tuple[dict, list[str]]:
    server = FakeServer(kind).reply(text_reply("hi"))

    async def go():
        with collect_notes() as notes:
            [ev async for ev in server.backend().chat(USER, ChatOptions(), params)]
            return notes

    notes = anyio.run(go)
    return server.bodies[0], notes


@pytest.mark.parametrize("kind,fields", [
    ("vllm", {"top_k": 5, "repetition_penalty": 1.3}),
    ("sglang", {"top_k": 5, "repetition_penalty": 1.3}),
    ("llama.cpp", {"top_k": 5, "repeat_penalty": 1.3, "min_p": 0.0, "repeat_last_n": -1}),
    ("llama-cpp-python", {"top_k": 5, "repeat_penalty": 1.3, "min_p": 0.0}),
    ("openai", {})])
def test_penalties_top_k_and_logprobs_travel_in_each_dialects_fields(kind, fields):
    params = SAMPLED if kind != "openai" else SamplingParams(max_tokens=8, frequency_penalty=0.5,
                                                             presence_penalty=0.25, logprobs=True, top_logprobs=3)
    body, notes = sampled_body(kind, params)
    extra = {k: v for k, v in body.items() if k in {*ASKED, "top_k", "repetition_penalty", "repeat_penalty", "min_p",
                                                    "repeat_last_n"}}
    assert extra == {**ASKED, **fields}
    # llama.cpp's penalties count the prompt's tokens too: the run says so
    assert any("penalties" in n for n in notes) == kind.startswith("llama")


@pytest.mark.parametrize("kind,fields", [
    ("vllm", {"top_k": -1, "repetition_penalty": 1.0}),  # else vLLM fills them from the model's generation_config
    ("llama.cpp", {"top_k": 0, "repeat_penalty": 1.0, "min_p": 0.0, "repeat_last_n": -1}),  # its defaults: 40, 0.05
    ("llama-cpp-python", {"top_k": 0, "repeat_penalty": 1.0, "min_p": 0.0}),  # its defaults: 40, 1.1, 0.05
    ("openai", {})])
def test_plain_sampling_overrides_a_servers_own_defaults_and_asks_no_logprobs(kind, fields):
    body, notes = sampled_body(kind, PARAMS)
    assert {k: body[k] for k in fields} == fields and not notes
    assert not {*ASKED} & set(body) and ("top_k" in body) == (kind != "openai")


@pytest.mark.parametrize("params,name", [(SamplingParams(top_k=5), "top_k"),
                                         (SamplingParams(repetition_penalty=1.2), "repetition_penalty")])
def test_an_unknown_server_is_refused_what_openai_has_no_field_for_before_any_request(params, name):
    server = FakeServer("openai").reply(text_reply("hi"))

    async def go():
        [ev async for ev in server.backend().chat(USER, ChatOptions(), params)]

    with pytest.raises(BackendCapabilityError, match=name):
        anyio.run(go)
    assert server.bodies == []


def test_streamed_logprobs_come_back_on_the_result_per_token():
    def token(t: str, lp: float, alts: list[tuple[str, float]]) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode()),
                "top_logprobs": [{"token": a, "logprob": alp, "bytes": None} for a, alp in alts]}

    reply = text_reply("Hi")
    reply[1]["choices"][0]["logprobs"] = {"content": [token("Hi", -0.1, [("Hi", -0.1), ("Hello", -2.5)])]}
    reply.insert(2, chunk({"content": " there"}))
    reply[2]["choices"][0]["logprobs"] = {"content": [token(" there", -0.7, [(" there", -0.7), ("!", -1.0)])],
                                          "refusal": None}
    server = FakeServer("vllm").reply(reply).reply(text_reply("plain"))
    backend = server.backend()

    async def go(params):
        return [ev async for ev in backend.chat(USER, ChatOptions(), params)][-1]

    result = anyio.run(go, SamplingParams(max_tokens=8, logprobs=True, top_logprobs=2))
    assert result.content == "Hi there"
    assert result.logprobs == [
        {"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1},
                                                          {"token": "Hello", "logprob": -2.5}]},
        {"token": " there", "logprob": -0.7, "top_logprobs": [{"token": " there", "logprob": -0.7},
                                                              {"token": "!", "logprob": -1.0}]}]
    assert anyio.run(go, PARAMS).logprobs is None  # not asked: none kept


def test_a_real_agentrt_server_samples_as_the_local_engine_with_what_the_remote_sends(tiny_engine):
    """Against `agentrt serve` (real uvicorn, dialect probed): each penalty and top_k gives the text the
    local engine gives with it (and a penalty changes tiny-random's repeating greedy text), and the
    server's logprobs come back per token with their alternatives."""
    from agentrt.backends import LocalBackend
    from agentrt.server import create_app
    from agentrt.testing import LiveServer

    msgs = [{"role": "user", "content": "Tell me a story."}]

    async def turn(backend, **kwargs):
        return [ev async for ev in backend.chat(msgs, ChatOptions(), SamplingParams(max_tokens=24, **kwargs))][-1]

    async def go(remote, local):
        assert (await remote.dialect()).name == "agentrt"
        plain = (await turn(local)).content
        for kwargs in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"repetition_penalty": 1.5},
                       {"temperature": 1.0, "top_k": 1, "seed": 3}):
            there, here = (await turn(remote, **kwargs)).content, (await turn(local, **kwargs)).content
            assert there == here, kwargs
            assert (there == plain) == ("top_k" in kwargs), kwargs  # top_k=1 is greedy whatever the temperature
        result = await turn(remote, logprobs=True, top_logprobs=3)
        assert len(result.logprobs) == result.completion_tokens == 24
        assert "".join(e["token"] for e in result.logprobs) == result.content
        for entry in result.logprobs:
            alts = [a["logprob"] for a in entry["top_logprobs"]]
            assert len(alts) == 3 and alts == sorted(alts, reverse=True)
            assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the best one was taken
        await remote.aclose()

    with LiveServer(create_app(tiny_engine, model_names=["tiny-random"])) as live:
        anyio.run(go, RemoteBackend(live.base_url, "tiny-random"), LocalBackend(tiny_engine))


# --- the GBNF translation ------------------------------------------------------------------------------
def test_ebnf_to_gbnf_renames_rules_and_rewrites_escapes_and_repetition():
    out = ebnf_to_gbnf('root ::= a_b{0, 3} "\\"x\\"\\n" (= "q")\na_b ::= [^"\\\\\\0-\\x1f] | "é" a_b*\n')
    assert "_" not in out and "a-b {0,3}" in out
    assert '"\\x22x\\x22\\n"' in out and "[^\"\\x5C\\x00-\\x1F]" in out and '"é"' in out
    assert "(=" not in out and out.startswith("root ::=")
    with pytest.raises(GrammarError):
        ebnf_to_gbnf("root ::= undefined_rule")


def test_grammar_accepts_sentences_and_prefixes():
    assert grammar_accepts(PLAN_GRAMMAR, "1. pick(abc)")
    assert not grammar_accepts(PLAN_GRAMMAR, "1. pick(abcd)")
    assert grammar_accepts(PLAN_GRAMMAR, "1. pi", complete=False) and not grammar_accepts(PLAN_GRAMMAR, "1. pi")


def test_every_dialect_is_listed_with_how_grammars_travel():
    assert {d.grammar for d in DIALECTS.values()} == {"structured_outputs", "guided_grammar", "ebnf", "gbnf", None}
    assert not DIALECTS["llama-cpp-python"].required and not DIALECTS["llama.cpp"].named
    assert re.fullmatch(r"[a-z.\-]+", "|".join(DIALECTS).replace("|", "-"))
