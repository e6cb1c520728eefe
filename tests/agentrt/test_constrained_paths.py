"""One policy for every constrained path: json_schema replies get the tool arguments' default caps and
close near max_tokens; a reply cut before its grammar could end says so (finish_reason "length" and
the `agentrt.incomplete` extension on the choice), streamed or not."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

from agentrt.chat import ChatOptions, chat_constraint
from agentrt.grammar import TOOL_ARGUMENT_CAPS
from agentrt.server import create_app

NOTE = {"type": "object", "properties": {"title": {"type": "string"}, "words": {"type": "array", "items": {
    "type": "string"}}}, "required": ["title", "words"]}
BODY = {"model": "tiny-random", "messages": [{"role": "user", "content": "Write a note."}], "temperature": 1.0,
        "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "note", "schema": NOTE}}}


def post(app, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json=body)

    return asyncio.run(go())


def test_json_replies_get_the_default_caps_unless_asked_otherwise():
    fmt = BODY["response_format"]
    assert chat_constraint(ChatOptions(response_format=fmt)).max_string_length == TOOL_ARGUMENT_CAPS["max_string_length"]
    assert chat_constraint(ChatOptions(response_format={"type": "json_object"})).max_array_items == 16
    lifted = chat_constraint(ChatOptions(response_format=fmt), max_string_length=None)
    assert lifted.max_string_length is None


@pytest.mark.parametrize("max_tokens", [40, 90])
def test_a_random_model_finishes_a_json_reply_within_its_budget(tiny_engine, max_tokens):
    r = post(create_app(tiny_engine, model_names=["tiny-random"]), {**BODY, "max_tokens": max_tokens})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["agentrt"]["incomplete"] is False
    jsonschema.validate(json.loads(choice["message"]["content"]), NOTE)
    assert r.json()["usage"]["completion_tokens"] <= max_tokens


def test_a_cut_reply_is_flagged_incomplete_streamed_or_not(tiny_engine):
    app = create_app(tiny_engine, model_names=["tiny-random"])
    choice = post(app, {**BODY, "max_tokens": 4}).json()["choices"][0]  # too few to close anything
    assert choice["finish_reason"] == "length" and choice["agentrt"]["incomplete"] is True
    r = post(app, {**BODY, "max_tokens": 4, "stream": True})
    chunks = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    last = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert last["finish_reason"] == "length" and last["agentrt"]["incomplete"] is True
    plain = post(app, {**BODY, "max_tokens": 4, "response_format": None}).json()["choices"][0]
    assert plain["finish_reason"] == "length" and plain["agentrt"]["incomplete"] is False  # text: nothing to finish
