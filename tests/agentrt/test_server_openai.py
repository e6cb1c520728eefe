"""The OpenAI surface beyond chat basics, through the official openai client against a real uvicorn
server on tiny-random: logprobs and top_logprobs, n > 1, penalties, legacy completions, models.retrieve,
and the 400s OpenAI gives."""

from __future__ import annotations

import math

import openai
import pytest

from agentrt.engine import SamplingParams
from agentrt.server import create_app
from agentrt.testing import LiveServer

MSGS = [{"role": "user", "content": "Tell me a story."}]
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


@pytest.fixture(scope="module")
def api():
    from agentrt.engine import Engine

    engine = Engine.load("tiny-random", device="cpu")
    live = LiveServer(create_app(engine, model_names=["tiny-random"]))
    yield openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120), engine
    live.stop()
    engine.close()


def _check_alternatives(entry, k: int) -> None:
    alts = entry.top_logprobs
    assert len(alts) == k
    values = [a.logprob for a in alts]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert sum(math.exp(v) for v in values) <= 1 + 1e-4
    assert entry.logprob <= values[0] + 1e-5


def test_chat_logprobs_with_three_alternatives(api):
    client, _ = api
    r = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        _check_alternatives(entry, 3)
        # greedy: the token taken is the most likely one, with its log-probability
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    # logprobs without alternatives, and none unless asked
    r = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=3, temperature=0, logprobs=True)
    assert [len(e.top_logprobs) for e in r.choices[0].logprobs.content] == [0, 0, 0]
    r = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


def test_streamed_logprobs_are_the_non_streamed_ones(api):
    client, _ = api
    kwargs = dict(model="tiny-random", messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kwargs)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_logprobs_come_from_the_masked_distribution(api):
    """Under json_object the first token must open an object: every alternative reported does."""
    client, _ = api
    r = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=40, temperature=0,
                                       response_format={"type": "json_object"}, logprobs=True, top_logprobs=5)
    first = r.choices[0].logprobs.content[0]
    assert first.top_logprobs and all(a.token.lstrip().startswith("{") for a in first.top_logprobs)
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_json_object_is_an_object(api):
    import json

    client, _ = api
    r = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: still an object's beginning, never a bare string
        assert choice.message.content.lstrip().startswith("{")


def test_n_choices_are_the_seeded_single_requests(api):
    client, engine = api
    kwargs = dict(model="tiny-random", messages=MSGS, max_tokens=6, temperature=1.0)
    r = client.chat.completions.create(n=2, seed=11, **kwargs)
    assert [c.index for c in r.choices] == [0, 1]
    singles = [client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (11, 12)]
    assert [c.message.content for c in r.choices] == singles  # choice i draws from seed + i
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens < r.usage.completion_tokens + 100
    streamed = client.chat.completions.create(n=2, seed=11, stream=True, **kwargs)
    texts = ["", ""]
    finished = set()
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and texts == [t or "" for t in singles]
    assert engine.pool.num_in_use == 0


def test_penalties_change_a_greedy_output(api):
    client, _ = api
    base = dict(model="tiny-random", prompt="the the the the", max_tokens=12, temperature=0)
    greedy = client.completions.create(**base).choices[0].text
    tokens = client.completions.create(**base, logprobs=0).choices[0].logprobs.tokens
    assert len(set(tokens)) < len(tokens), "precondition: tiny-random's greedy output repeats a token"
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        body = {**base, **({} if "repetition_penalty" not in extra else {"extra_body": extra})}
        penalised = client.completions.create(**body, **({} if "repetition_penalty" in extra else extra))
        assert penalised.choices[0].text != greedy, extra
    chat = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=12, temperature=0)
    chat_pen = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=12, temperature=0,
                                              presence_penalty=2.0, frequency_penalty=2.0)
    assert chat.choices[0].logprobs is None and chat_pen.usage.completion_tokens > 0


def test_completions_create(api):
    client, engine = api
    r = client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(engine.encode("Once upon a time")) and r.usage.completion_tokens == 5
    text = r.choices[0].text
    ids = engine.encode("Once upon a time")
    same = client.completions.create(model="tiny-random", prompt=ids, max_tokens=5, temperature=0)
    assert same.choices[0].text == text  # token ids are the same prompt
    echoed = client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=5, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "Once upon a time" + text
    lp = client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=5, temperature=0,
                                   logprobs=3).choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == 5
    assert all(3 <= len(top) <= 4 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(5)]
    batch = client.completions.create(model="tiny-random", prompt=["Once upon a time", "Hello"], max_tokens=3,
                                      temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == client.completions.create(
        model="tiny-random", prompt="Once upon a time", max_tokens=3, temperature=0).choices[0].text
    streamed = client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=5,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    running = list(client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=5,
                                             temperature=0, stream=True, extra_body={"stream_options": {
                                                 "include_usage": True, "continuous_usage_stats": True}}))
    counts = [c.usage.completion_tokens for c in running]  # vLLM's extension: the usage so far on every chunk
    assert counts == sorted(counts) and counts[-1] == 5 and all(c.usage.prompt_tokens > 0 for c in running)
    if text:
        stop = text[len(text) // 2:][:3] or text
        cut = client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=5,
                                        temperature=0, stop=[stop]).choices[0]
        assert stop not in cut.text and cut.finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt(api):
    """echo + logprobs: the prompt's tokens come first, the first with null, as OpenAI gives them; a prompt
    token's logprob is what the model gave that token when it generated it."""
    client, engine = api
    prompt = "Scoring a prompt nobody sent before, long enough to fill two pages of the KV cache: " * 2
    ids = engine.encode(prompt)
    gen = engine.generate_sync(ids, SamplingParams(max_tokens=2, logprobs=True))
    continued = ids + gen.token_ids
    r = client.completions.create(model="tiny-random", prompt=continued, max_tokens=2, temperature=0, echo=True,
                                  logprobs=2)
    lp, n = r.choices[0].logprobs, len(continued)
    assert lp.tokens[:n] == [engine.tokenizer.decode([t]) for t in continued]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == n + 2
    for tok, value, top in zip(lp.tokens[1:n], lp.token_logprobs[1:n], lp.top_logprobs[1:n]):
        assert value <= 0 and tok in top and len(top) <= 3 and top[tok] == value
        assert max(top.values()) >= value
    # the first generated token was sampled from the prefill's logits, which the scoring pass recomputes
    # by the same kernels; the second came from a decode step (other kernels: close, not equal)
    assert lp.token_logprobs[len(ids)] == pytest.approx(gen.logprobs[0], abs=1e-5)
    assert lp.token_logprobs[len(ids) + 1] == pytest.approx(gen.logprobs[1], abs=2e-2)
    assert r.choices[0].text.startswith(engine.tokenizer.decode(continued))
    assert lp.text_offset[:n] == [sum(map(len, lp.tokens[:i])) for i in range(n)]
    assert lp.text_offset[n] == len(engine.tokenizer.decode(continued))
    # the scoring pass changes nothing about the generation
    plain = client.completions.create(model="tiny-random", prompt=continued, max_tokens=2, temperature=0, logprobs=2)
    assert plain.choices[0].logprobs.tokens == lp.tokens[n:]
    streamed = list(client.completions.create(model="tiny-random", prompt=continued, max_tokens=2, temperature=0,
                                              echo=True, logprobs=2, stream=True))
    assert streamed[0].choices[0].logprobs.tokens[:n] == lp.tokens[:n]
    joined = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert joined == lp.token_logprobs
    # a prompt new to the cache: none of it was cached (the scoring pass puts it there, and the generation
    # reads it from there: that is not a cache hit of the request); the next request's is
    fresh = "Another prompt, never sent, as long as two pages of the cache hold. " * 3
    zero = client.completions.create(model="tiny-random", prompt=fresh, max_tokens=1, echo=True, logprobs=0)
    assert all(len(top) == 1 for top in zero.choices[0].logprobs.top_logprobs[1:])
    again = client.completions.create(model="tiny-random", prompt=fresh, max_tokens=1)
    assert zero.usage.prompt_tokens_details.cached_tokens == 0 < again.usage.prompt_tokens_details.cached_tokens
    assert engine.pool.num_in_use == 0


def test_prompt_logprobs_as_vllm_gives_them(api):
    client, engine = api
    prompts = ["A robot may not injure another robot", "My name is"]
    r = client.completions.create(model="tiny-random", prompt=prompts, max_tokens=2,
                                  extra_body={"prompt_logprobs": 2})
    for choice, prompt in zip(r.choices, prompts):
        ids = engine.encode(prompt)
        entries = choice.prompt_logprobs
        assert len(entries) == len(ids) and entries[0] is None
        for t, entry in zip(ids[1:], entries[1:]):
            assert str(t) in entry and 2 <= len(entry) <= 3  # its 2 best and the prompt's token
            assert entry[str(t)]["decoded_token"] == engine.tokenizer.decode([t])
            ranks = sorted(e["rank"] for k, e in entry.items() if k != str(t))
            assert ranks[:2] == [1, 2] or entry[str(t)]["rank"] <= 2
            best = max(entry.values(), key=lambda e: e["logprob"])
            assert best["rank"] == 1 and entry[str(t)]["logprob"] <= best["logprob"]
    assert getattr(client.completions.create(model="tiny-random", prompt="My name is", max_tokens=1).choices[0],
                   "prompt_logprobs", None) is None
    chat = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.prompt_logprobs) == chat.usage.prompt_tokens and chat.prompt_logprobs[0] is None
    assert all(len(e) == 1 for e in chat.prompt_logprobs[1:])
    stream = list(client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=2, stream=True,
                                                 extra_body={"prompt_logprobs": 0}))
    assert stream[0].prompt_logprobs == chat.prompt_logprobs
    assert all(getattr(c, "prompt_logprobs", None) is None for c in stream[1:])
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-random", prompt="My name is", extra_body={"prompt_logprobs": -1})
    assert err.value.body["param"] == "prompt_logprobs"


def test_usage_says_how_many_prompt_tokens_the_prefix_cache_gave(api):
    client, _ = api
    msgs = [{"role": "user", "content": "A prompt long enough to fill whole KV pages. " * 8 + "Go on."}]
    first = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=2, temperature=0)
    before = first.usage.prompt_tokens_details.cached_tokens  # the template's opening, cached by earlier tests
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert before < cached < again.usage.prompt_tokens  # this prompt's own pages now, never the whole prompt
    assert before % 16 == cached % 16 == 0  # whole pages
    stream = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    assert [c.usage for c in stream if c.usage][-1].prompt_tokens_details.cached_tokens == cached


def test_models_retrieve(api):
    client, _ = api
    assert client.models.retrieve("tiny-random").id == "tiny-random"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


@pytest.mark.parametrize("kwargs,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tool_choice": {}, "tools": [ADD]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "sub"}}, "tools": [ADD]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"n": 0}, "n"),
])
def test_chat_requests_openai_refuses_are_400s(api, kwargs, param):
    client, engine = api
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=3, **kwargs)
    assert err.value.body["param"] == param
    assert engine.pool.num_in_use == 0


@pytest.mark.parametrize("kwargs,param", [
    ({"suffix": "the end"}, "suffix"),
    ({"logprobs": 21}, "top_logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
])
def test_completion_requests_openai_refuses_are_400s(api, kwargs, param):
    client, _ = api
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-random", **{"prompt": "Hello", "max_tokens": 3, **kwargs})
    assert err.value.body["param"] == param


def test_leaving_an_n_stream_early_frees_every_choice(api):
    import time

    client, engine = api
    stream = client.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=400, temperature=1.0,
                                            n=3, seed=1, stream=True)
    for count, _ in enumerate(stream):  # the three role chunks, then the choices decoding side by side
        if count == 12:
            break
    stream.close()
    for _ in range(200):
        if engine.num_active == 0 and engine.pool.num_in_use == 0:
            break
        time.sleep(0.05)
    assert engine.num_active == 0 and engine.pool.num_in_use == 0


def test_the_compile_timeout_comes_from_the_environment(api, monkeypatch):
    _, engine = api
    assert create_app(engine).state.compiler.timeout == 30.0
    monkeypatch.setenv("AGENTRT_COMPILE_TIMEOUT", "120")  # a 151k vocabulary on a busy CPU
    assert create_app(engine).state.compiler.timeout == 120.0
    assert create_app(engine, compile_timeout=5).state.compiler.timeout == 5


def test_a_whitespace_only_reply_is_its_content_streamed_and_not(api):
    """A reply of whitespace alone is the reply (not null); streamed, the chunk with the finish_reason
    carries it, and the chunks join to the non-streamed content."""
    client, _ = api
    kwargs = dict(model="tiny-random", messages=MSGS, max_tokens=10, temperature=0,
                  extra_body={"guided_grammar": 'root ::= "\\n\\n" " "'})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.content == "\n\n " and whole.finish_reason == "stop"
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop" and last.delta.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
