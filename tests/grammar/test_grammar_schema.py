"""Schema normalisation: BFCL types, nullable, strict, $ref, allOf, and warnings for every keyword
the grammar cannot enforce (checked against what the compiled grammar really accepts)."""

from __future__ import annotations

import pytest

from agentrt.errors import GrammarError
from agentrt.grammar import CompileCache, GrammarCompiler, JsonSchema, normalize_schema


def test_bfcl_types_map_to_json_schema(accepts):
    bfcl = {
        "type": "dict",
        "properties": {
            "x": {"type": "float"},
            "pair": {"type": "tuple", "items": {"type": "integer"}},
            "anything": {"type": "any"},
            "flag": {"type": "Boolean"},
        },
        "required": ["x"],
    }
    norm = normalize_schema(bfcl).schema
    assert norm["type"] == "object"
    assert norm["properties"]["x"]["type"] == "number"
    assert norm["properties"]["pair"]["type"] == "array"
    assert "type" not in norm["properties"]["anything"]
    assert norm["properties"]["flag"]["type"] == "boolean"
    c = JsonSchema(bfcl)
    assert accepts(c, '{"x":1.5,"pair":[1,2],"anything":{"k":[null]},"flag":true}')
    assert not accepts(c, '{"x":"1.5"}')
    with pytest.raises(GrammarError, match="unknown schema type"):
        normalize_schema({"type": "quaternion"})


def test_nullable_adds_null(accepts):
    s = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "nullable": True},
            "b": {"enum": ["x", "y"], "nullable": True},
        },
    }
    c = JsonSchema(s)
    assert accepts(c, '{"a":null,"b":null}')
    assert accepts(c, '{"a":"s","b":"y"}')
    assert not accepts(c, '{"a":1}')
    assert normalize_schema({"nullable": True, "properties": {"q": {}}}).schema["anyOf"][1] == {
        "type": "null"
    }


def test_strict_makes_every_property_required_and_closed(accepts):
    s = {
        "type": "object",
        "strict": True,
        "properties": {"a": {"type": "integer"}, "o": {"type": "object", "properties": {"k": {}}}},
    }
    norm = normalize_schema(s).schema
    assert norm["required"] == ["a", "o"] and norm["additionalProperties"] is False
    assert norm["properties"]["o"]["required"] == ["k"]
    c = JsonSchema(s, allow_undeclared=True)  # strict wins over the JSON Schema default
    assert accepts(c, '{"a":1,"o":{"k":2}}')
    assert not accepts(c, '{"a":1}')
    assert not accepts(c, '{"a":1,"o":{"k":2},"z":0}')


def test_refs_and_defs_resolve(accepts):
    s = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    }
    c = JsonSchema(s)
    assert accepts(c, '{"v":1,"kids":[{"v":2,"kids":[]},{"v":3}]}')
    assert not accepts(c, '{"v":1,"kids":[{"kids":[]}]}')


@pytest.mark.parametrize(
    "keyword, schema, violating",
    [
        ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
        ("not", {"not": {"type": "string"}}, '"s"'),
        ("if", {"type": "string", "if": {"minLength": 1}, "then": {"maxLength": 2}}, '"abc"'),
        (
            "dependentRequired",
            {"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}},
            '{"a":1}',
        ),
        ("contains", {"type": "array", "contains": {"type": "integer"}}, '["x"]'),
        ("multipleOf", {"type": "number", "multipleOf": 0.5}, "1.2"),
        ("format", {"type": "string", "format": "made-up-format"}, None),
        ("oneOf", {"oneOf": [{"type": "integer"}, {"minimum": 0}]}, None),
        ("maxLength", {"type": "string", "format": "email", "maxLength": 5}, '"abcdef@x.com"'),
        ("maxLength", {"type": "string", "pattern": "^a+$", "maxLength": 2}, '"aaaa"'),
        ("multipleOf", {"type": "integer", "multipleOf": 3, "minimum": 0}, "4"),
        ("lookaround", {"type": "string", "pattern": "^(?!x)[a-z]+$"}, '"xyz"'),
    ],
)
def test_unenforced_keywords_are_reported_not_silently_loosened(
    accepts, compiler, tokenizer, keyword, schema, violating
):
    xgr_only = GrammarCompiler(tokenizer, vocab_size=49152, cache=CompileCache(), backend="xgrammar")
    compiled = xgr_only.compile(JsonSchema(schema))
    assert any(keyword in w for w in compiled.warnings), compiled.warnings
    if violating is not None:  # the warning is true: xgrammar's grammar does let the violation through
        assert _accepts(compiled, tokenizer, violating)
    served = compiler.compile(JsonSchema(schema))  # the default policy: llguidance where it enforces the keyword
    if served.backend == "llguidance":
        assert served.warnings == [] and (violating is None or not accepts(JsonSchema(schema), violating))
    else:
        assert any(keyword in w for w in served.warnings), served.warnings


def _accepts(compiled, tokenizer, text: str) -> bool:
    m = compiled.matcher()
    return all(m.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and m.accept_token(
        tokenizer.eos_token_id)


def test_enforced_keywords_raise_no_warning(compiler, accepts):
    s = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 5},
            "s": {"type": "string", "pattern": "^[a-c]+$", "format": "email"},
            "l": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        },
    }
    assert compiler.compile(JsonSchema({"type": "string", "format": "date"})).warnings == []
    assert compiler.compile(JsonSchema(s["properties"]["n"])).warnings == []
    assert not accepts(JsonSchema(s["properties"]["n"]), "6")
    assert not accepts(JsonSchema(s["properties"]["l"]), "[1,2,3]")


def test_all_of_is_merged_and_conflicts_warn(accepts):
    s = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}},
            {"required": ["a"]},
            {"properties": {"a": {"minimum": 3}}},
        ]
    }
    norm = normalize_schema(s)
    assert "allOf" not in norm.schema and norm.warnings == []
    assert accepts(JsonSchema(s), '{"a":4}')
    assert not accepts(JsonSchema(s), '{"a":2}')
    assert not accepts(JsonSchema(s), "{}")
    conflict = normalize_schema({"allOf": [{"const": 1}, {"const": 2}]})
    assert any("allOf" in w for w in conflict.warnings)


def test_unanchored_patterns_match_anywhere(accepts):
    assert accepts(JsonSchema({"type": "string", "pattern": "ab"}), '"xxabyy"')
    assert not accepts(JsonSchema({"type": "string", "pattern": "^ab"}), '"xab"')
    assert accepts(JsonSchema({"type": "string", "pattern": "^ab"}), '"abz"')


def test_draft4_tuple_items_and_array_enum(accepts):
    t = {"type": "array", "items": [{"type": "integer"}, {"type": "string"}], "additionalItems": False}
    assert accepts(JsonSchema(t), '[1,"a"]')
    assert not accepts(JsonSchema(t), '["a",1]')
    bfcl = {"type": "array", "items": {"type": "string"}, "enum": ["view", "buzz"]}  # BFCL's habit
    norm = normalize_schema(bfcl)
    assert norm.schema["items"]["enum"] == ["view", "buzz"] and norm.warnings
    assert accepts(JsonSchema(bfcl), '["view","buzz"]')
    assert not accepts(JsonSchema(bfcl), '["other"]')


def test_false_property_is_forbidden_or_reported(accepts):
    s = {"type": "object", "properties": {"a": {"type": "integer"}, "b": False}}
    assert normalize_schema(s).warnings == []  # closed by default: dropping `b` forbids it
    assert not accepts(JsonSchema(s), '{"b":1}')
    assert normalize_schema(s, allow_undeclared=True).warnings  # open: it could still slip in
    with pytest.raises(GrammarError, match="required but forbidden"):
        normalize_schema({"type": "object", "properties": {"b": False}, "required": ["b"]})


def test_integer_digit_cap_bounds_unbounded_integers_only():
    norm = normalize_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "maximum": 10}}},
        max_integer_digits=3,
    ).schema
    assert norm["properties"]["a"] == {"type": "integer", "minimum": -999, "maximum": 999}
    assert norm["properties"]["b"]["maximum"] == 10


def test_normalisation_does_not_mutate_the_input():
    s = {"type": "dict", "properties": {"a": {"type": "float", "nullable": True}}}
    before = repr(s)
    normalize_schema(s, strict=True)
    assert repr(s) == before
