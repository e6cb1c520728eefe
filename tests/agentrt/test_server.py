"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1 driven by the official openai client,
plus in-process httpx (ASGITransport) tests for every documented error."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

import httpx
import jsonschema
import pytest
from pydantic import Field

from agentrt.server import create_app
from agentrt.testing import LiveServer
from agentrt.tools import tool

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def smol_server(smol_engine):
    live = LiveServer(create_app(smol_engine, model_names=["smollm2-135m"]))
    yield live
    live.stop()


@pytest.fixture
def tiny_server(tiny_engine):
    live = LiveServer(create_app(tiny_engine, model_names=["tiny-random"]))
    yield live
    live.stop()


def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120)


# --- the openai client against smollm2-135m ---------------------------------------------------


@pytest.mark.slow
def test_plain_chat(smol_server, smol_knows_trivia):
    r = client(smol_server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24)
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason == "stop"
    assert "Paris" in r.choices[0].message.content or not smol_knows_trivia
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client(smol_server).models.list().data] == ["smollm2-135m"]


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_follows_the_schema(smol_server, choice):
    r = client(smol_server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER, ADD], tool_choice=choice, parallel_tool_calls=False, temperature=0, max_tokens=60)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
    jsonschema.validate(args, schema)


@pytest.mark.slow
def test_tool_choice_none_never_calls(smol_server):
    r = client(smol_server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_parallel_calls_are_allowed_or_forbidden_by_the_grammar(smol_server):
    ask = [{"role": "user", "content": "Weather in Paris and in Rome?"}]
    one = client(smol_server).chat.completions.create(
        model="smollm2-135m", messages=ask, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=80)
    assert len(one.choices[0].message.tool_calls) == 1


@pytest.mark.slow
def test_streamed_tool_call_concatenates_to_the_non_streamed_one(smol_server):
    kwargs = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Add 17 and 25."}],
                  tools=[ADD], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    whole = client(smol_server).chat.completions.create(**kwargs)
    chunks = list(client(smol_server).chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                              **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    named = [d for d in deltas if d.function and d.function.name]
    assert len(named) == 1 and named[0].id and named[0].type == "function"
    assert named[0].function.name == whole.choices[0].message.tool_calls[0].function.name
    args = "".join(d.function.arguments or "" for d in deltas)
    assert args == whole.choices[0].message.tool_calls[0].function.arguments
    json.loads(args)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["tool_calls"]
    assert chunks[-1].usage is not None and not chunks[-1].choices


@pytest.mark.slow
def test_json_schema_response_validates(smol_server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client(smol_server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Describe Ann, aged 30, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        temperature=0, max_tokens=60)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


# --- tiny-random: concurrency, disconnects ------------------------------------------------------


def test_32_concurrent_streams_complete_and_free_the_pool(tiny_server, tiny_engine):
    from openai import AsyncOpenAI

    async def one(i, c):
        stream = await c.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": f"request {i} " * (1 + i % 5)}],
            max_tokens=8 + i % 7, temperature=0, stream=True)
        reasons, text = [], ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                if chunk.choices[0].finish_reason:
                    reasons.append(chunk.choices[0].finish_reason)
        return reasons

    async def main():
        async with AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(i, c) for i in range(32)))

    results = asyncio.run(main())
    assert all(len(r) == 1 and r[0] in ("stop", "length") for r in results)
    assert tiny_engine.pool.num_in_use == 0 and tiny_engine.num_active == 0


def _wait_idle(engine, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while engine.num_active and time.time() < deadline:
        time.sleep(0.02)


def test_client_disconnect_mid_stream_frees_its_pages(tiny_server, tiny_engine):
    # no max_tokens: the whole context (~2000 tokens), far longer than the test reads
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "go"}], "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", tiny_server.base_url + "/chat/completions",
                                                 json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert tiny_engine.num_active == 1 and tiny_engine.pool.num_in_use > 0
    _wait_idle(tiny_engine)
    assert tiny_engine.num_active == 0 and tiny_engine.pool.num_in_use == 0


def test_client_disconnect_without_streaming_cancels_too(tiny_server, tiny_engine):
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "go"}], "temperature": 0,
            "max_tokens": 2000}
    steps = tiny_engine.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.base_url + "/chat/completions", json=body, timeout=0.5)
    _wait_idle(tiny_engine)
    assert tiny_engine.num_active == 0 and tiny_engine.pool.num_in_use == 0
    assert tiny_engine.steps - steps < 1900  # stopped early, not run to max_tokens


# --- errors, in process ---------------------------------------------------------------------------


def post(app, body, headers=None, raw: bytes | None = None):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            if raw is not None:
                return await c.post("/v1/chat/completions", content=raw,
                                    headers={"content-type": "application/json", **(headers or {})})
            return await c.post("/v1/chat/completions", json=body, headers=headers)

    return asyncio.run(go())


OK = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("change,status,param", [
    ({"model": "gpt-9"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 3}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 0}, 400, "n"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     400, None),
    ({"response_format": {"type": "yaml"}}, 400, "response_format"),
    ({"max_tokens": 10**9}, 400, "messages"),
    ({"tools": [WEATHER], "grammar_options": {"max_length": 3}}, 400, "grammar_options"),
    ({"tools": [WEATHER], "grammar_options": {"max_string_length": 0}}, 400, "max_string_length"),
])
def test_bad_requests_get_openai_shaped_errors(tiny_engine, change, status, param):
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), {**OK, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    assert tiny_engine.pool.num_in_use == 0


def test_grammar_options_cap_this_requests_tool_arguments(tiny_engine):
    app = create_app(tiny_engine, model_names=["tiny-random"])
    body = {**OK, "max_tokens": 120, "temperature": 1.0, "seed": 0, "tools": [WEATHER], "tool_choice": "required"}
    cities = []
    for cap in (3, None):  # None: this request lifts the default cap (the schema's maxLength 40 stays)
        r = post(app, {**body, "grammar_options": {"max_string_length": cap}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        cities.append(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["city"])
    assert len(cities[0]) <= 3 < len(cities[1]) <= 40
    assert tiny_engine.pool.num_in_use == 0


def test_malformed_json_is_a_400(tiny_engine):
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), None, raw=b'{"model": ')
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_over_long_input_is_rejected_with_both_numbers(tiny_engine):
    long = {**OK, "messages": [{"role": "user", "content": "word " * 5000}]}
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), long)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert str(tiny_engine.max_context) in r.json()["error"]["message"]


def test_huge_body_is_a_413(tiny_engine):
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), None, raw=b"x" * (9 << 20))
    assert r.status_code == 413


def test_api_key_is_enforced(tiny_engine):
    app = create_app(tiny_engine, api_key="sekret", model_names=["tiny-random"])
    assert post(app, OK).status_code == 401
    assert post(app, OK, headers={"authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
    assert post(app, OK, headers={"authorization": "Bearer sekret"}).status_code == 200


def test_health(tiny_engine):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(tiny_engine)),
                                     base_url="http://t") as c:
            return await c.get("/health")

    assert asyncio.run(go()).json()["status"] == "ok"


# --- the agent-runs extension -------------------------------------------------------------------


def _events(app, body) -> tuple[int, list]:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            async with c.stream("POST", "/v1/agent/runs", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                return r.status_code, lines

    status, lines = asyncio.run(go())
    if status != 200:
        return status, lines
    assert lines[-1] == "data: [DONE]"
    return status, [json.loads(line[6:]) for line in lines[:-1]]


def test_agent_run_streams_task_and_tool_events(tiny_engine):
    from agentrt.tools import calculator

    app = create_app(tiny_engine, model_names=["tiny-random"], tools=[calculator])
    status, events = _events(app, {"input": "what is 2 + 2?", "max_replans": 0, "max_tokens": 80})
    assert status == 200
    kinds = [e["type"] for e in events]
    assert kinds[-1] in ("final", "error")
    for e in events:  # each task is announced before it starts, and starts before it ends
        if e["type"] == "tool_end":
            assert kinds.index("task") < kinds.index("tool_end")
    assert tiny_engine.pool.num_in_use == 0


@pytest.mark.parametrize("mode", ["react", "dta"])
def test_an_agent_run_that_fails_ends_its_stream_with_an_error_event(tiny_engine, mode):
    # a random model's joiner answer cut at max_tokens does not parse: the run fails, the stream still ends
    from agentrt.tools import calculator

    app = create_app(tiny_engine, model_names=["tiny-random"], tools=[calculator])
    status, events = _events(app, {"input": "add 1 and 2", "mode": mode, "max_tokens": 32})
    assert status == 200 and events[-1]["type"] in ("final", "error")
    if events[-1]["type"] == "error":
        assert events[-1]["error"]["message"] and events[-1]["error"]["type"]
    assert tiny_engine.pool.num_in_use == 0


def test_agent_run_without_tools_is_a_400(tiny_engine):
    app = create_app(tiny_engine, model_names=["tiny-random"])
    status, _ = _events(app, {"input": "hi"})
    assert status == 400


@pytest.mark.slow
def test_agent_run_on_smollm2_runs_a_real_tool(smol_engine):
    from agentrt.tools import calculator

    app = create_app(smol_engine, model_names=["smollm2-135m"], tools=[calculator])
    status, events = _events(app, {"input": "Use the calculator: what is 12 * 7?", "max_replans": 0,
                                   "max_tokens": 120})
    assert status == 200
    ends = [e for e in events if e["type"] == "tool_end"]
    assert ends and all(e["tool"] == "calculator" for e in ends)
    ids = {e["id"] for e in events if e["type"] == "task"}
    assert {e["id"] for e in ends} <= ids
    assert events[-1]["type"] == "final" and events[-1]["tasks"] == len(ids)


def test_agent_run_in_hogwild_mode(tiny_engine):
    app = create_app(tiny_engine, model_names=["tiny-random"])
    status, events = _events(app, {"input": "count", "mode": "hogwild", "workers": 3, "max_tokens": 24,
                                   "temperature": 1.0})
    assert status == 200 and events[-1]["type"] == "final"
    assert len(events[-1]["workers"]) == 3 and events[-1]["generated_tokens"] <= 24
    assert tiny_engine.pool.num_in_use == 0


@tool
def double(n: Annotated[int, Field(ge=0, le=9)]) -> int:
    """Double a digit."""
    return 2 * n


def test_agent_run_in_thread_mode_streams_tree_events_and_the_whole_tree(tiny_engine):
    app = create_app(tiny_engine, model_names=["tiny-random"], tools=[double])
    options = {"max_depth": 2, "max_text_chars": 3, "max_items": 2, "require_tool": True, "buffer": 0}
    status, events = _events(app, {"input": "double a digit", "mode": "thread", "max_tokens": 600,
                                   "thread": options})
    assert status == 200
    kinds = [e["type"] for e in events]
    assert kinds[0] == "task" and kinds[-1] == "final", events[-1]
    assert kinds.index("tool_start") < kinds.index("tool_end")
    tree = events[-1]["tree"]
    use = tree["reasoning"][0]["tooluse"]
    assert use["tool_name"] == "double" and use["tool_result"] == 2 * use["parameters"]["n"]
    assert events[-1]["answer"] == tree["answer"] and events[-1]["stats"]["tool_calls"] >= 1
    assert tiny_engine.pool.num_in_use == 0
    status, _ = _events(app, {"input": "x", "mode": "thread", "thread": {"depth": 2}})
    assert status == 400


# --- hostile requests: a quick OpenAI-shaped 4xx each, and the server stays well -------------------

SELF_REF = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


def _tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


def _schema_format(schema: dict, strict: bool = False) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": strict}}


HOSTILE = [
    ("self-required tool schema", {"tools": [_tool("f", SELF_REF)], "tool_choice": "required"}, 400, "tools",
     "can never finish"),
    ("self-required response_format", {"response_format": _schema_format(SELF_REF)}, 400, "response_format",
     "can never finish"),
    ("5,000 properties", {"tools": [_tool("f", {"type": "object", "properties": {
        f"p{i}": {"type": "integer"} for i in range(5000)}})], "tool_choice": "required"}, 400, "tools", "too large"),
    ("strict drops a pattern", {"response_format": _schema_format(
        {"type": "string", "pattern": "^[a-z]+$", "format": "email"}, strict=True)}, 400, "schema", "'pattern'"),
    ("strict not", {"response_format": _schema_format({"type": "integer", "not": {"const": 3}}, strict=True)},
     400, "schema", "'not'"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("required without tools", {"tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ("seed 2**70", {"seed": 2**70}, 400, "seed", None),
    ("seed 2**70 streamed", {"seed": 2**70, "stream": True}, 400, "seed", None),
    ("tool_calls not a list", {"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": None, "tool_calls": "oops"}]},
     400, "messages[1].tool_calls", None),
    ("tool call without a function", {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]},
     400, "messages[0].tool_calls[0]", None),
    ("tool name with spaces", {"tools": [_tool("get weather")]}, 400, "tools[0].function.name", None),
    ("tool name of 300 characters", {"tools": [_tool("f" * 300)]}, 400, "tools[0].function.name", None),
    ("content of a wrong type", {"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", None),
    ("a prompt that cannot fit", {"messages": [{"role": "user", "content": "x" * (3 << 20)}]}, 400, "messages",
     "cannot fit"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_get_a_quick_openai_shaped_4xx(tiny_engine, case):
    _, change, status, param, words = case
    t0 = time.perf_counter()
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), {**OK, **change})
    assert time.perf_counter() - t0 < 30  # generous on a shared machine: these never reach a long compile
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param
    if words:
        assert words in err["message"]
    assert tiny_engine.num_active == 0 and tiny_engine.pool.num_in_use == 0


def test_strict_is_served_where_a_backend_enforces_every_keyword(tiny_engine):
    # xgrammar drops patternProperties; llguidance enforces it (tests/grammar/test_llguidance_backend.py),
    # so strict is met and the request served, with nothing reported unenforced
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), {**OK, "max_tokens": 4, "response_format": _schema_format(
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, strict=True)})
    assert r.status_code == 200, r.text
    assert "x-agentrt-grammar-warnings" not in r.headers
    assert tiny_engine.num_active == 0 and tiny_engine.pool.num_in_use == 0


def test_unenforced_keywords_come_back_in_a_header(tiny_engine):
    r = post(create_app(tiny_engine, model_names=["tiny-random"]),
             {**OK, "max_tokens": 4, "response_format": _schema_format({"type": "integer", "not": {"const": 3}})})
    assert r.status_code == 200, r.text
    assert any("'not'" in w for w in json.loads(r.headers["x-agentrt-grammar-warnings"]))
    assert "x-agentrt-grammar-warnings" not in post(create_app(tiny_engine, model_names=["tiny-random"]), OK).headers


def test_malformed_json_names_no_parameter(tiny_engine):
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), None, raw=b'{"model": "tiny-random", "mess')
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert "not valid JSON" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_are_openai_shaped(tiny_engine):
    async def go():
        app = create_app(tiny_engine, model_names=["tiny-random"])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/v1/nope"), await c.get("/v1/chat/completions")

    missing, wrong = asyncio.run(go())
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong.status_code == 405 and "POST" not in wrong.json()["error"]["message"].split()[-1:]
    assert wrong.headers["allow"] == "POST"


def test_a_chunked_body_over_the_cap_is_a_413(tiny_engine):
    async def chunks():
        for _ in range(12):
            yield b" " * (1 << 20)

    async def go():
        app = create_app(tiny_engine, model_names=["tiny-random"])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            big = await c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})

            async def small():
                yield json.dumps(OK).encode()

            return big, await c.post("/v1/chat/completions", content=small(),
                                     headers={"content-type": "application/json"})

    big, small = asyncio.run(go())
    assert "content-length" not in big.request.headers
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200, small.text  # a chunked body under the cap is read whole


def test_engine_errors_inside_the_task_group_are_openai_shaped(tiny_engine, monkeypatch):
    from agentrt.errors import EngineError

    async def broken(*args, **kwargs):
        raise EngineError("the engine fell over")
        yield  # an async generator, like the real one

    monkeypatch.setattr("agentrt.server._choices.stream_chat", broken)
    app = create_app(tiny_engine, model_names=["tiny-random"])
    r = post(app, OK)
    assert r.status_code == 500 and r.json()["error"] == {"message": "the engine fell over", "type": "server_error",
                                                         "param": None, "code": None}
    r = post(app, {**OK, "stream": True})
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(lines[-2][6:])["error"]["message"] == "the engine fell over" and lines[-1] == "data: [DONE]"


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from agentrt.errors import InvalidRequestError
    from agentrt.server import resolve_api_key

    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv("AGENTRT_API_KEY", "from-env")
    assert resolve_api_key(api_key_file=tmp_path / "key") == "from-file"
    assert resolve_api_key() == "from-env"
    assert resolve_api_key("given") == "given"
    monkeypatch.delenv("AGENTRT_API_KEY")
    assert resolve_api_key() is None
    (tmp_path / "empty").write_text("")
    with pytest.raises(InvalidRequestError, match="empty"):
        resolve_api_key(api_key_file=tmp_path / "empty")
