"""Agent against a real third-party server: llama-cpp-python's OpenAI-compatible server on loopback,
serving the embedded model's own GGUF (SmolLM2-135M-Instruct Q4_1).

Every constraint is either kept or refused with a clear error, none silently broken: a required call
is made (the server keeps only a named choice: agentrt picks the tool under a grammar, then names it),
output_type comes back validated (`response_format` as json_object + schema), a plan is decoded
under our grammar translated to GBNF (and checked against it), two runs then close() work, and a
stream the server leaves empty (`chatml-function-calling` with a streamed "required") is an error.

llama_cpp is never a dependency: without it these tests skip, saying how to install it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time

import anyio
import httpx
import pytest
from pydantic import BaseModel

import agentrt
from agentrt.remote import RemoteBackend
from agentrt.chat import ChatOptions
from agentrt.errors import EngineError
from agentrt.notes import collect_notes
from agentrt.engine.sampling import SamplingParams

INSTALL = ('pip install "../shared/peers/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl[server]" '
           "(llama-cpp-python with its server extra; never an agentrt dependency)")
try:
    import llama_cpp  # noqa: F401
    import llama_cpp.server  # noqa: F401  (the [server] extra: sse-starlette, starlette-context, ...)
except ImportError:
    pytest.skip(f"llama_cpp.server is not importable: {INSTALL}", allow_module_level=True)

pytestmark = pytest.mark.slow  # serves the embedded smollm2-135m model (its GGUF, fetched once, then cached)


def _gguf() -> str:
    # agentrt.engine.models has no public accessor for the embedded GGUF yet (asked of its owner): the
    # cached, hash-checked file of the default model
    from agentrt.engine.models import EMBEDDED, fetch_gguf

    return str(fetch_gguf("smollm2-135m", EMBEDDED["smollm2-135m"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(chat_format: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_ctx", "4096",
           "--chat_format", chat_format]
    log = tempfile.TemporaryFile()  # not a pipe: the server's logging would fill it and block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama_cpp.server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama_cpp.server did not answer /v1/models within 180 s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def chatml():
    proc, url = _serve("chatml")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@agentrt.tool
def get_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city's name.
    """
    return f"sunny in {city}"


@agentrt.tool
def get_time(city: str) -> str:
    """Get the local time of a city.

    Args:
        city: The city's name.
    """
    return f"12:00 in {city}"


class City(BaseModel):
    name: str
    country: str


def test_the_server_is_probed_as_llama_cpp_python(chatml):
    backend = RemoteBackend(chatml, "smollm2")
    assert anyio.run(backend.dialect).name == "llama-cpp-python"


def test_a_required_tool_call_is_made_though_the_server_ignores_required(chatml):
    with agentrt.Agent(f"openai:{chatml}#smollm2", tools=[get_weather, get_time], tool_choice="required",
                       max_steps=2, max_tokens=24) as agent:
        result = agent.run_sync("What is the weather in Paris?")
    assert result.tool_calls and all(c.name in ("get_weather", "get_time") and c.ok for c in result.tool_calls)
    assert any("does not enforce tool_choice 'required'" in n for n in result.notes), result.notes


def test_a_named_tool_choice_calls_that_tool(chatml):
    with agentrt.Agent(f"openai:{chatml}#smollm2", tools=[get_weather, get_time], tool_choice="get_time",
                       max_steps=2, max_tokens=24) as agent:
        result = agent.run_sync("What is the weather in Paris?")
    assert [c.name for c in result.tool_calls][:1] == ["get_time"] and result.tool_calls[0].ok


def test_output_type_comes_back_validated(chatml):
    with agentrt.Agent(f"openai:{chatml}#smollm2", output_type=City, max_tokens=48) as agent:
        result = agent.run_sync("Which city is the capital of France? One sentence.")
    assert isinstance(result.output, City) and result.output.name


def test_a_plan_grammar_is_enforced_by_the_server_as_gbnf(chatml):
    backend = RemoteBackend(chatml, "smollm2")
    grammar = 'root ::= "1. pick(" [a-z] [a-z]? [a-z]? ")\\n2. join()"'

    async def go():
        try:
            return "".join([t async for t in backend.text("Write a plan.", grammar, SamplingParams(max_tokens=24))])
        finally:
            await backend.aclose()

    assert re.fullmatch(r"1\. pick\([a-z]{1,3}\)\n2\. join\(\)", anyio.run(go))


def test_plan_mode_runs_a_constrained_plan_on_the_server(chatml):
    with agentrt.Agent(f"openai:{chatml}#smollm2", tools=[get_weather], mode="plan", max_tokens=64) as agent:
        result = agent.run_sync("What is the weather in Paris?")
    # every plan and joiner output was checked against its grammar on the way (else BackendCapabilityError)
    assert result.messages and all(c.name == "get_weather" for c in result.tool_calls)
    assert not any("grammar" in n for n in result.notes)


def test_two_runs_then_close(chatml):
    agent = agentrt.Agent(f"openai:{chatml}#smollm2", max_tokens=4)
    first, second = agent.run_sync("Hi"), agent.run_sync("Hello")
    assert isinstance(first.text, str) and isinstance(second.text, str)
    agent.close()
    agent.close()


def test_logprobs_penalties_and_top_k_reach_the_server(chatml):
    """Sent in llama-cpp-python's fields (top_k, repeat_penalty, min_p off): its logprobs come back per token
    with 3 alternatives, a penalty changes the greedy text (and the run says how the server counts it),
    and top_k=1 samples the greedy text at temperature 1."""
    backend = RemoteBackend(chatml, "smollm2")
    msgs = [{"role": "user", "content": "Tell me a story about a cat."}]

    async def turn(max_tokens=12, **kwargs):
        with collect_notes() as notes:
            events = [ev async for ev in backend.chat(msgs, ChatOptions(), SamplingParams(max_tokens, **kwargs))]
        return events[-1], notes

    async def go():
        try:  # few tokens with logprobs: the server sorts the whole vocabulary for each (seconds on 2 cores)
            (plain, _), (logged, _) = await turn(), await turn(max_tokens=4, logprobs=True, top_logprobs=3)
            (penalized, notes), (top1, _) = await turn(presence_penalty=2.0), await turn(temperature=1.0, top_k=1,
                                                                                         seed=7)
            return plain, logged, penalized, notes, top1
        finally:
            await backend.aclose()

    plain, logged, penalized, notes, top1 = anyio.run(go)
    assert plain.content.startswith(logged.content) and len(logged.logprobs) == 4  # (it streams no usage)
    assert "".join(e["token"] for e in logged.logprobs) == logged.content
    for entry in logged.logprobs:
        alts = [a["logprob"] for a in entry["top_logprobs"]]
        assert len(alts) == 3 and alts == sorted(alts, reverse=True) and entry["logprob"] == pytest.approx(alts[0])
    assert penalized.content != plain.content and any("last_n_tokens_size" in n for n in notes)
    assert top1.content == plain.content


def test_an_empty_stream_from_the_function_calling_format_is_an_error():
    proc, url = _serve("chatml-function-calling")
    try:
        # sent as an unknown server would get it (tool_choice "required", streamed): this handler
        # answers 200 and an empty stream, which must not read as an empty answer
        raw = RemoteBackend(url, "smollm2", dialect="openai")
        options = ChatOptions(tools=[{"type": "function", "function": get_weather.spec()}], tool_choice="required")

        async def go():
            try:
                return [ev async for ev in raw.chat([{"role": "user", "content": "Weather in Paris?"}], options,
                                                    SamplingParams(max_tokens=16))]
            finally:
                await raw.aclose()

        with pytest.raises(EngineError, match="ended before the reply finished"):
            anyio.run(go)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_grammar_we_send_parses_as_gbnf_in_llama_cpp():
    """The planner's, joiner's, ReAct's and thread tree's grammars (with embedded JSON schemas, whose
    xgrammar text has lookaheads and unbounded repetition) pass llama.cpp's own grammar parser."""
    from agentrt.gbnf import ebnf_to_gbnf
    from agentrt.planner._grammar import joiner_grammar, plan_grammar, react_grammar
    from agentrt.threads import ThreadSchema

    llm = llama_cpp.Llama(model_path=_gguf(), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)

    def parses(gbnf: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")  # NULL when it does not parse
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    assert not parses("root ::= not_a_gbnf_name")  # the check can fail
    grammars = {"plan": plan_grammar([get_weather, get_time]), "joiner": joiner_grammar(),
                "react": react_grammar([get_weather], step_id=1),
                "thread": ThreadSchema([get_weather], max_depth=2, answer_schema=City).ebnf()[0],
                "resume": ThreadSchema([get_weather], max_depth=2).ebnf(resume_at=(0,))[0]}
    assert {name for name, g in grammars.items() if not parses(ebnf_to_gbnf(g))} == set()
