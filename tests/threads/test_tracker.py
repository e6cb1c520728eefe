"""The structure tracker: the same events wherever the stream is split, at the bytes they belong to."""

from __future__ import annotations

import json
import random

import pytest

from agentrt.threads import StructureTracker

TREE = {"reasoning": [
    {"thought": 'quote " and ] and } inside é', "tooluse": {
        "tool_name": "calc", "parameters": {"expression": "[1, {2}]", "n": [1, {"a": None}]},
        "tool_result": 5},
     "subtasks": [
         {"thought": "x", "tooluse": None, "subtasks": None, "conclusion": "y"},
         {"thought": "x2", "tooluse": None, "subtasks": [
             {"thought": "deep", "tooluse": {"tool_name": "t", "parameters": {}, "tool_result": "s]\\"},
              "subtasks": None, "conclusion": "c"}], "conclusion": "y2"}],
     "conclusion": "five"}],
    "answer": {"v": [1, 2]}}


def events_of(text: str, chunks: list[int]) -> list:
    data, tracker, out, i = text.encode(), StructureTracker(), [], 0
    for n in chunks:
        out += tracker.feed(data[i:i + n])
        i += n
    assert i >= len(data) and tracker.finished
    return out


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_events_are_the_same_however_the_stream_is_split(separators):
    text = json.dumps(TREE, separators=separators, ensure_ascii=False)
    whole = events_of(text, [len(text.encode())])
    rng = random.Random(0)
    for _ in range(5):
        assert events_of(text, [rng.randint(1, 4) for _ in range(len(text))]) == whole
    kinds = [(e.kind, e.path) for e in whole]
    assert kinds == [
        ("task", (0,)), ("thought", (0,)), ("tool_call", (0,)), ("tool_result", (0,)),
        ("subtasks_open", (0,)),
        ("task", (0, 0)), ("thought", (0, 0)), ("conclusion_start", (0, 0)), ("conclusion", (0, 0)),
        ("task_end", (0, 0)), ("task", (0, 1)), ("thought", (0, 1)), ("subtasks_open", (0, 1)),
        ("task", (0, 1, 0)), ("thought", (0, 1, 0)), ("tool_call", (0, 1, 0)), ("tool_result", (0, 1, 0)),
        ("conclusion_start", (0, 1, 0)), ("conclusion", (0, 1, 0)), ("task_end", (0, 1, 0)),
        ("subtasks_close", (0, 1)), ("conclusion_start", (0, 1)), ("conclusion", (0, 1)),
        ("task_end", (0, 1)),
        ("subtasks_close", (0,)), ("conclusion_start", (0,)), ("conclusion", (0,)), ("task_end", (0,)),
        ("answer_start", ()), ("answer", ()), ("end", ())]
    by = {(e.kind, e.path): e for e in whole}
    assert by["thought", (0,)].data == TREE["reasoning"][0]["thought"]
    params = TREE["reasoning"][0]["tooluse"]["parameters"]
    assert by["tool_call", (0,)].data == {"tool_name": "calc", "arguments": params}
    assert by["tool_result", (0, 1, 0)].data == "s]\\"
    assert by["answer", ()].data == {"v": [1, 2]}


def test_subtask_spans_are_the_bytes_inside_the_brackets():
    text = json.dumps(TREE, separators=(", ", ": "), ensure_ascii=False)
    data = text.encode()
    for e in events_of(text, [7] * len(data)):
        if e.kind == "subtasks_close":
            a, b = e.data
            assert data[a - 1:a] == b"[" and data[b:b + 1] == b"]"
            inner = json.loads(b"[" + data[a:b] + b"]")
            assert all(set(t) == {"thought", "tooluse", "subtasks", "conclusion"} for t in inner)
        if e.kind == "conclusion_start":  # it carries the span of the list that just closed
            assert e.data is None or data[e.data[1]:e.data[1] + 1] == b"]"
        if e.kind == "tool_call":  # offset: the "}" that closes the parameters
            assert data[e.offset:e.offset + 1] == b"}"
