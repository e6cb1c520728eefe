"""A property-based fuzzer against a real server on loopback: hypothesis writes chat-completion bodies
(fields of the wrong type and out of range), hostile JSON schemas (recursive, huge, deeply nested,
unusual keywords) as response formats and tool parameters, malformed bodies and unknown routes.

Every reply must be below 500 and come within a generous bound, /health must answer after each
case, the KV pool must be full again at the end, and once the cases are over the idle server
(its grammar workers included) must burn no CPU. The default run is bounded (AGENTRT_FUZZ_EXAMPLES,
default 30 bodies, 10 schemas, 10 raw bodies and routes); a longer run is `AGENTRT_FUZZ_EXAMPLES=2000 pytest -s tests/agentrt/test_server_fuzz.py`
(AGENTRT_FUZZ_SLOW=1 prints every case slower than 2 s).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrt.grammar import RestartBudget
from agentrt.server import create_app
from agentrt.testing import LiveServer

EXAMPLES = int(os.environ.get("AGENTRT_FUZZ_EXAMPLES", "30"))
REPLY_WITHIN = 60.0  # seconds: generous for two shared cores; compiles are stopped at 10 s
COUNTS: Counter = Counter()
FAILURES: list[str] = []


@pytest.fixture(scope="module")
def fuzz_server(tiny_parts):
    from agentrt.engine import Engine

    model, tok, eos = tiny_parts
    engine = Engine(model, tok, eos_token_ids=eos, name="tiny-random")
    app = create_app(engine, model_names=["tiny-random"], compile_timeout=10)
    app.state.compiler.restarts = RestartBudget(limit=10**6)  # every hostile schema compiles (no 429s)
    live = LiveServer(app)
    with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=REPLY_WITHIN + 30) as client:
        yield live, engine, client
    live.stop()
    engine.close()
    print(f"\nfuzz cases by kind: {dict(COUNTS)}; failures: {FAILURES or 'none'}")


def _check(client: httpx.Client, kind: str, method: str, path: str, **kwargs) -> httpx.Response:
    COUNTS[kind] += 1
    t0 = time.perf_counter()
    r = client.request(method, path, **kwargs)
    elapsed = time.perf_counter() - t0
    if os.environ.get("AGENTRT_FUZZ_SLOW") and elapsed > 2:
        print(f"\n{elapsed:.1f}s {r.status_code} {r.text[:150]} <- {str(kwargs)[:200]}")
    if r.status_code >= 500 or elapsed > REPLY_WITHIN:
        FAILURES.append(f"{kind}: {r.status_code} in {elapsed:.1f}s for {str(kwargs)[:300]}")
    assert r.status_code < 500, (r.status_code, r.text[:500], str(kwargs)[:1000])
    assert elapsed < REPLY_WITHIN, (elapsed, str(kwargs)[:1000])
    if r.status_code >= 400 and path.startswith("/v1/"):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:300]
    health = client.get("/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    return r


# --- strategies ------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(allow_nan=False),
                    st.text(max_size=20))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)
NAMES = st.one_of(st.sampled_from(["get_weather", "f", "a-b_c"]), st.text(max_size=70))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard"])},
    optional={"content": st.one_of(st.text(max_size=40), ANY_JSON),
              "tool_calls": st.one_of(ANY_JSON, st.lists(st.fixed_dictionaries(
                  {"id": st.text(max_size=5), "type": st.just("function"),
                   "function": st.fixed_dictionaries({"name": NAMES}, optional={"arguments": st.one_of(
                       st.text(max_size=20), ANY_JSON)})}), max_size=2))})

TYPES = st.sampled_from(["object", "string", "integer", "number", "boolean", "array", "null", "dict", "any",
                         "bogus"])
KEYWORDS = {
    "type": st.one_of(TYPES, st.lists(TYPES, max_size=3), ANY_JSON),
    "$ref": st.sampled_from(["#", "#/$defs/n", "#/nope", "http://x/y", "#/properties/a"]),
    "required": st.one_of(st.lists(st.sampled_from(["a", "b", "n"]), max_size=3), ANY_JSON),
    "pattern": st.sampled_from(["^[a-z]+$", "(", "a{2,1}", "(?=x)y", "\\d{1,400}", ".*"]),
    "format": st.sampled_from(["email", "date", "uri", "uuid", "no-such-format"]),
    "minLength": st.integers(-5, 10**6), "maxLength": st.integers(-5, 10**6),
    "minimum": st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False)),
    "maximum": st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False)),
    "minItems": st.integers(-2, 10**5), "maxItems": st.integers(-2, 10**5),
    "enum": st.lists(SCALARS, max_size=4), "const": SCALARS, "multipleOf": st.sampled_from([0, -1, 0.5, 3]),
    "uniqueItems": st.booleans(), "strict": st.booleans(), "nullable": st.booleans(),
}


def _schema_tree(leaf):
    sub = {k: leaf for k in ("properties", "$defs", "patternProperties")}
    one = {k: leaf for k in ("items", "additionalProperties", "not", "if", "then", "else", "contains")}
    many = {k: st.lists(leaf, max_size=3) for k in ("anyOf", "oneOf", "allOf", "prefixItems")}
    return st.fixed_dictionaries({}, optional={
        **KEYWORDS, **{k: st.dictionaries(st.sampled_from(["a", "b", "n", "^x"]), v, max_size=3)
                       for k, v in sub.items()}, **one, **many})


SCHEMA = st.recursive(st.fixed_dictionaries({}, optional=KEYWORDS) | st.booleans(), _schema_tree, max_leaves=12)


@st.composite
def big_schema(draw):
    shape = draw(st.sampled_from(["wide", "deep", "deep-array", "self-required", "mutual"]))
    n = draw(st.sampled_from([3, 300, 2500]))  # 2,500: over the size cap, refused before any compile
    if shape == "wide":
        return {"type": "object", "properties": {f"p{i}": {"type": draw(TYPES)} for i in range(n)}}
    if shape == "deep":
        schema: dict = {"type": "integer"}
        for _ in range(min(n, 300)):
            schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
        return schema
    if shape == "deep-array":
        schema = {"type": "string"}
        for _ in range(min(n, 300)):
            schema = {"type": "array", "items": schema, "minItems": 1}
        return schema
    if shape == "self-required":
        return {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    return {"$defs": {"x": {"type": "object", "properties": {"y": {"$ref": "#/$defs/y"}}, "required": ["y"]},
                      "y": {"type": "array", "items": {"$ref": "#/$defs/x"}, "minItems": draw(st.integers(0, 2))}},
            "$ref": "#/$defs/x"}


BODY = st.fixed_dictionaries(
    {"model": st.one_of(st.just("tiny-random"), st.text(max_size=10)),
     "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), ANY_JSON),
     "max_completion_tokens": st.one_of(st.integers(-2, 6), st.just(10**9), SCALARS)},
    optional={"tools": st.one_of(ANY_JSON, st.lists(st.fixed_dictionaries(
                  {"type": st.just("function"), "function": st.fixed_dictionaries(
                      {"name": NAMES}, optional={"parameters": SCHEMA})}), max_size=2)),
              "tool_choice": st.one_of(st.sampled_from(["auto", "required", "none", "sometimes"]), ANY_JSON),
              "response_format": st.one_of(ANY_JSON, st.fixed_dictionaries(
                  {"type": st.sampled_from(["json_schema", "json_object", "text", "yaml"]),
                   "json_schema": st.fixed_dictionaries({"name": st.just("x"), "schema": SCHEMA},
                                                        optional={"strict": st.booleans()})})),
              "temperature": SCALARS, "top_p": SCALARS, "seed": SCALARS, "n": SCALARS, "stop": ANY_JSON,
              "stream": st.booleans(), "stream_options": ANY_JSON, "parallel_tool_calls": SCALARS,
              "max_tokens": st.one_of(st.integers(-2, 6), SCALARS), "grammar_options": ANY_JSON,
              "guided_grammar": st.sampled_from(['root ::= "a" root', 'root ::= "x"', "root ::= (", "nonsense"])})

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


# --- the properties ---------------------------------------------------------------------------------

@FUZZ
@given(body=BODY)
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, body):
    _, _, client = fuzz_server
    # json.dumps writes inf and nan as Infinity and NaN, which Python's parser (the server's) reads back
    _check(client, "body", "POST", "/v1/chat/completions", content=json.dumps(body).encode(),
           headers={"content-type": "application/json"})


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(schema=st.one_of(big_schema(), SCHEMA), as_tool=st.booleans(), strict=st.booleans())
def test_hostile_schemas_never_get_a_5xx(fuzz_server, schema, as_tool, strict):
    _, _, client = fuzz_server
    base = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
    if as_tool:
        body = {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": schema,
                                                                    "strict": strict}}], "tool_choice": "required"}
    else:
        body = {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                  "strict": strict}}}
    _check(client, "schema", "POST", "/v1/chat/completions", json=body)


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       path=st.sampled_from(["/v1/chat/completions", "/v1/agent/runs", "/v1/models", "/v1/nope", "/health"]),
       method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]))
def test_raw_bytes_and_routes_never_get_a_5xx(fuzz_server, raw, path, method):
    _, _, client = fuzz_server
    _check(client, "raw", method, path, content=raw, headers={"content-type": "application/json"})


def test_after_the_fuzzing_the_pool_is_full_and_the_idle_server_burns_no_cpu(fuzz_server):
    live, engine, client = fuzz_server
    assert sum(COUNTS.values()) > 0, "run with the fuzz tests before this one"
    deadline = time.time() + 30
    while engine.num_active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_active == 0 and engine.pool.num_in_use == 0
    me = psutil.Process()
    time.sleep(1.0)  # let the last replies settle

    def cpu() -> float:  # this process (the server's threads) and its grammar workers
        procs = [me, *me.children(recursive=True)]
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    # a worker that replaced a killed one may still be starting (seconds of imports); a compile that
    # kept running would burn a core for minutes: the server must fall quiet well within 60 s
    windows = []
    for _ in range(30):
        before = cpu()
        time.sleep(2.0)
        windows.append(round(cpu() - before, 2))
        if windows[-1] < 0.3:
            break
    assert windows[-1] < 0.3, f"CPU seconds used in each 2 s window while idle: {windows}: a compile is still running"
    assert client.get("/health").json()["status"] == "ok"


# --- compile-worker restarts per client, and the startup warm-up --------------------------------------

def _slow_tools(n: int = 1500) -> list[dict]:
    # optional integer properties: xgrammar takes ~15 s here; tool grammars have no llguidance reserve
    params = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}
    return [{"type": "function", "function": {"name": "f", "parameters": params}}]


def _openai(live: LiveServer, local_address: str):
    import openai

    transport = httpx.HTTPTransport(local_address=local_address)  # loopback: any 127.x address is a client
    return openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=transport, timeout=REPLY_WITHIN + 30))


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}


def test_a_client_whose_compiles_keep_being_killed_gets_429s_and_others_do_not(tiny_parts):
    import openai

    from agentrt.engine import Engine

    model, tok, eos = tiny_parts
    engine = Engine(model, tok, eos_token_ids=eos, name="tiny-random")
    app = create_app(engine, model_names=["tiny-random"], compile_timeout=2)
    app.state.compiler.restarts = RestartBudget(limit=1, window=600)
    hi = [{"role": "user", "content": "hi"}]
    with LiveServer(app) as live, _openai(live, "127.0.0.1") as bad, _openai(live, "127.0.0.2") as other:
        with pytest.raises(openai.BadRequestError, match="was stopped"):  # killed at the deadline: one restart
            bad.chat.completions.create(model="tiny-random", messages=hi, tools=_slow_tools(), max_tokens=4)
        t0 = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as info:  # past the limit: refused before any compile
            bad.chat.completions.create(model="tiny-random", messages=hi, max_tokens=4,
                                        response_format=_schema_format({"type": "integer", "minimum": 3}))
        assert time.perf_counter() - t0 < REPLY_WITHIN
        retry = int(info.value.response.headers["retry-after"])
        assert 1 <= retry <= 600
        assert info.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        # what is compiled already still serves it; other clients compile as before
        served = bad.chat.completions.create(model="tiny-random", messages=hi, max_tokens=4,
                                             response_format={"type": "json_object"})
        assert served.choices[0].finish_reason in ("stop", "length")
        served = other.chat.completions.create(model="tiny-random", messages=hi, max_tokens=4,
                                               response_format=_schema_format({"type": "integer", "minimum": 3}))
        assert served.choices[0].finish_reason in ("stop", "length")
    engine.close()


def test_the_first_json_object_request_after_startup_does_not_compile(tiny_parts):
    from agentrt.engine import Engine
    from agentrt.server.app import WARM_FORMATS

    model, tok, eos = tiny_parts
    engine = Engine(model, tok, eos_token_ids=eos, name="tiny-random")
    app = create_app(engine, model_names=["tiny-random"])
    compiler = app.state.compiler
    with LiveServer(app) as live, _openai(live, "127.0.0.1") as client:
        assert client.models.list().data  # the server answers while (or before) the formats compile
        deadline = time.time() + 200
        # the warm-up claimed each format (compiled it, or found it in the process's cache) and is done
        while (sum(compiler.stats.values()) < len(WARM_FORMATS) or compiler._inflight) and time.time() < deadline:
            time.sleep(0.1)
        compiled = compiler.stats["compiled"]
        for fmt in [*WARM_FORMATS, _schema_format({"type": "object"})]:
            client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, response_format=fmt)
        assert compiler.stats["compiled"] == compiled  # every compile was the startup's
        assert compiler.stats["cached"] >= len(WARM_FORMATS) + 1
    engine.close()
