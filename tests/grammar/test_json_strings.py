"""Length-bounded JSON strings under xgrammar: what the matcher accepts is JSON that `json.loads`
reads and the schema validates (no raw control character), and every string of an allowed length
is accepted however `json.dumps` escapes it (an escape counts as one character)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrt.grammar import CompileCache, GrammarCompiler, JsonSchema

# quotes, backslashes, control characters (raw or escaped), ASCII, and a few wider characters
CHARS = st.sampled_from(['"', "\\", "\n", "\t", "\x01", "\x1f", "\x7f", "/", "a", "b", " ", "é", "€", "😀"])
# the pieces a text between the quotes is made of: characters written raw, and escapes (some invalid,
# some lone surrogates, which json.loads reads but the grammar refuses)
PIECES = st.one_of(CHARS, st.sampled_from(['\\"', "\\\\", "\\n", "\\u0041", "\\u00e9", "\\x", "\\u12", "\\a",
                                           "\\ud83d\\ude00", "\\ud83d", "\\ude00"]))
BOUNDS = st.tuples(st.integers(0, 2), st.integers(0, 4)).map(lambda b: (b[0], b[0] + b[1]))


@pytest.fixture(scope="module")
def xgrammar_compiler(compiler) -> GrammarCompiler:
    return GrammarCompiler(compiler.info, backend="xgrammar", cache=CompileCache(max_bytes=64 << 20))


def _schema(lo: int, hi: int) -> dict:
    return {"type": "object", "properties": {"s": {"type": "string", "minLength": lo, "maxLength": hi}},
            "required": ["s"]}


def _accepts(compiler: GrammarCompiler, schema: dict, text: str) -> bool:
    compiled = compiler.compile(JsonSchema(schema))
    assert compiled.backend == "xgrammar"
    matcher = compiled.matcher()
    return matcher.accept_string(text) and matcher.is_completed()


def _valid(schema: dict, text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bounds=BOUNDS, pieces=st.lists(PIECES, max_size=7))
def test_what_a_bounded_string_accepts_is_valid_json(xgrammar_compiler, bounds, pieces):
    schema = _schema(*bounds)
    text = '{"s":"' + "".join(pieces) + '"}'
    if _accepts(xgrammar_compiler, schema, text):
        assert _valid(schema, text), f"accepted {text!r} under {bounds}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bounds=BOUNDS, value=st.lists(CHARS, max_size=7).map("".join), ascii_only=st.booleans())
def test_a_bounded_string_takes_every_escape(xgrammar_compiler, bounds, value, ascii_only):
    schema = _schema(*bounds)
    text = json.dumps({"s": value}, separators=(",", ":"), ensure_ascii=ascii_only)
    # a surrogate pair's two escapes (ensure_ascii, "😀") are one character
    assert _accepts(xgrammar_compiler, schema, text) == (bounds[0] <= len(value) <= bounds[1]), f"{text!r} under {bounds}"


@pytest.mark.parametrize("text,ok", [
    ('{"s":"a\\"b"}', True), ('{"s":"a\\nb"}', True), ('{"s":"\\u00e9"}', True),
    ('{"s":"\\ud83d\\ude00"}', True), ('{"s":"a\x01b"}', False), ('{"s":"a\nb"}', False), ('{"s":"abcd"}', False),
])
def test_bounded_string_examples(xgrammar_compiler, text, ok):
    assert _accepts(xgrammar_compiler, _schema(0, 3), text) is ok
