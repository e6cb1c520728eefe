"""llguidance as the second grammar backend, for JSON schemas xgrammar serves badly.

llguidance (Guidance's Earley parser over a lazily built regex lexer) compiles a JSON schema in
milliseconds and enforces keywords xgrammar's grammar drops (`pattern` next to `format`,
`patternProperties` without duplicate keys, `maxProperties`, ...); xgrammar's masks are faster once
compiled. `GrammarCompiler` picks per grammar (see its `backend`): xgrammar unless it would loosen a
keyword llguidance enforces, cannot compile the schema, or runs past its share of the deadline.

What a matcher here does differently from xgrammar's, behind the same `Matcher`:
- the bitmask is xgrammar's layout (int32 words, bit `t % 32` of word `t // 32` = token t allowed),
  filled in place in the engine's buffer;
- a rejected token leaves the state as it was (llguidance itself would enter an error state);
- the stop tokens are accepted only where the grammar can end, and end it (`is_terminated`), as
  xgrammar's do; rollback steps back over them as over any token;
- jump-forward is llguidance's forced bytes (cut to whole UTF-8 characters);
- `accept_string` (text without tokens) is not offered: the engine never needs it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch
import xgrammar as xgr

from agentrt.errors import GrammarError

if TYPE_CHECKING:
    from agentrt.grammar._constraints import JsonSchema

__all__ = ["LLGuidanceGrammar", "LLGuidanceMatcher", "compile_schema", "llguidance_tokenizer", "schema_grammar"]

log = logging.getLogger(__name__)

WHITESPACE = "[\\x20\\x0A\\x0D\\x09]"  # JSON's whitespace characters, as llguidance's regex reads them
_TOKENIZERS: dict[tuple[str, tuple[int, ...]], llguidance.LLTokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()


def llguidance_tokenizer(hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                         fingerprint: str) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer with these stop tokens (~1 s to build;
    one per tokenizer and stop set)."""
    key = (fingerprint, tuple(stop_token_ids))
    with _TOKENIZERS_LOCK:
        known = _TOKENIZERS.get(key)
    if known is None:
        try:
            known = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids))
        except ValueError as e:  # not a fast tokenizer
            raise GrammarError(f"llguidance cannot use this tokenizer: {e}", param="grammar") from e
        with _TOKENIZERS_LOCK:
            known = _TOKENIZERS.setdefault(key, known)
    return known


def schema_grammar(constraint: JsonSchema, *, lenient: bool) -> tuple[str, list[str]]:
    """llguidance's grammar for a `JsonSchema` (its layout and caps), with the normalisation's
    warnings except those about keywords only xgrammar drops. `lenient`: llguidance ignores the
    keywords it cannot enforce (and says so) instead of refusing the schema."""
    norm = constraint.normalized(collect=True, rewrite=False)
    schema = _capped(norm.schema, constraint)
    options: dict[str, Any] = {"item_separator": constraint.separators[0], "key_separator": constraint.separators[1],
                               "whitespace_flexible": constraint.max_whitespace is not None,
                               "coerce_one_of": lenient, "lenient": lenient}
    if constraint.max_whitespace is not None:
        options["whitespace_pattern"] = f"{WHITESPACE}{{0,{int(constraint.max_whitespace)}}}"
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except ValueError as e:
        raise GrammarError(f"llguidance cannot read the JSON schema: {e}", param="response_format") from e
    return grammar, [w for w in norm.warnings if w not in norm.loosened]


def _capped(schema: Any, c: JsonSchema) -> Any:
    """The schema with the constraint's caps written into it as keywords llguidance enforces:
    objects that name properties closed (unless `allow_undeclared`), `maxLength` on strings,
    `maxItems` on arrays, `maxProperties` on open objects, wherever the schema sets none. Number
    digits other than integers' (bounded in normalisation) and `max_untyped_depth` are not capped."""
    if isinstance(schema, list):
        return [_capped(v, c) for v in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: (_capped(v, c) if k not in ("enum", "const", "default", "examples") else v) for k, v in schema.items()}
    types = {s["type"]} if isinstance(s.get("type"), str) else set(s.get("type") or ())
    named = "properties" in s or "patternProperties" in s
    if named and not c.allow_undeclared and "additionalProperties" not in s and "unevaluatedProperties" not in s:
        s["additionalProperties"] = False
    if "enum" in s or "const" in s:
        return s
    if c.max_string_length and "string" in types and "maxLength" not in s and "format" not in s:
        s["maxLength"] = max(c.max_string_length, int(s.get("minLength", 0)))
    if c.max_array_items and "array" in types and "maxItems" not in s:
        s["maxItems"] = max(c.max_array_items, int(s.get("minItems", 0)))
    if (c.max_object_entries and "object" in types and not named and "maxProperties" not in s
            and s.get("additionalProperties", True) is not False):
        s["maxProperties"] = max(c.max_object_entries, int(s.get("minProperties", 0)))
    return s


class LLGuidanceGrammar:
    """A grammar compiled by llguidance for one tokenizer: what `CompiledConstraint.grammar` holds
    for this backend (`tokenizer_info` is xgrammar's view of the same vocabulary, for the token
    boundaries and closers the `Matcher` computes itself)."""

    backend = "llguidance"

    def __init__(self, grammar: str, start: llguidance.LLMatcher, info: xgr.TokenizerInfo, *, hf_tokenizer: Any,
                 fingerprint: str, stop_token_ids: list[int]) -> None:
        self.grammar = grammar
        self.tokenizer_info = info
        self._hf, self._fingerprint = hf_tokenizer, fingerprint
        self._starts = {tuple(stop_token_ids): start}  # stop set -> a matcher at the start, copied per sequence
        self._lock = threading.Lock()

    @property
    def memory_size_bytes(self) -> int:
        return 8 * len(self.grammar) + (256 << 10)  # an estimate: llguidance builds its lexer lazily

    def matcher(self, stop_token_ids: list[int]) -> LLGuidanceMatcher:
        key = tuple(stop_token_ids)
        with self._lock:
            start = self._starts.get(key)
        if start is None or start.is_error():  # copies share the lexer: one that ran out poisons the rest
            tok = llguidance_tokenizer(self._hf, int(self.tokenizer_info.vocab_size), list(key), self._fingerprint)
            start = llguidance.LLMatcher(tok, self.grammar, log_level=0)
            with self._lock:
                self._starts[key] = start
        return LLGuidanceMatcher(start.deep_copy(), stop_token_ids)


def compile_schema(constraint: JsonSchema, info: xgr.TokenizerInfo, *, hf_tokenizer: Any, fingerprint: str,
                   lenient: bool) -> tuple[LLGuidanceGrammar, list[str]]:
    """Compile `constraint` with llguidance; GrammarError if it cannot, or (not `lenient`) if it
    would not enforce every keyword, or if no output at all can match."""
    grammar, warnings = schema_grammar(constraint, lenient=lenient)
    stops = [int(t) for t in info.stop_token_ids]
    tok = llguidance_tokenizer(hf_tokenizer, int(info.vocab_size), stops, fingerprint)
    start = llguidance.LLMatcher(tok, grammar, log_level=0)
    if start.is_error():
        raise GrammarError(f"llguidance cannot compile {constraint!r}: {start.get_error()}", param="response_format")
    dropped = start.get_grammar_warnings()
    if dropped and not lenient:
        raise GrammarError(f"llguidance would not enforce all of {constraint!r}: {'; '.join(dropped)}",
                           param="response_format")
    _probe(constraint, start.deep_copy(), int(info.vocab_size), set(stops))
    compiled = LLGuidanceGrammar(grammar, start, info, hf_tokenizer=hf_tokenizer, fingerprint=fingerprint,
                                 stop_token_ids=stops)
    return compiled, warnings + [f"llguidance: {w}" for w in dropped]


PROBE_STEPS = 32


def _probe(constraint: JsonSchema, m: llguidance.LLMatcher, vocab_size: int, stops: set[int]) -> None:
    """Walk a few steps of one output (forced tokens, else the lowest allowed token): a schema with
    no output at all, or whose lexer runs out of fuel at once (a `pattern` intersected with a long
    `maxLength`: llguidance builds that lexer lazily, during the masks), is refused here rather than
    failing mid-generation. This also builds the first lexer states off the first request's step."""
    row = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
    for step in range(PROBE_STEPS):
        forced = m.compute_ff_tokens()
        if forced and m.consume_tokens(forced):
            continue
        fill_bitmask(m, row, 0)
        if m.is_error():
            raise GrammarError(f"llguidance cannot serve {constraint!r}: {_first_line(m.get_error())}",
                               param="response_format")
        words = row[0].nonzero()
        if step == 0 and not len(words) and not m.is_accepting():
            raise GrammarError(f"{constraint!r}: no output can match the schema", param="response_format")
        tokens = [32 * int(w) + b for w in words[:4].flatten() for b in range(32) if (int(row[0, w]) >> b) & 1]
        tokens = [t for t in tokens if t not in stops]
        if not tokens or not m.consume_token(tokens[0]):
            return


def fill_bitmask(m: llguidance.LLMatcher, bitmask: torch.Tensor, index: int) -> None:
    """Fill row `index` of the int32 `bitmask` (on the CPU) with `m`'s next-token mask: what
    `llguidance.torch.fill_next_token_bitmask` does, without that module's import (its
    `torch.compile` decorator loads torch's compiler stack: seconds, in every grammar worker)."""
    row = bitmask[index]
    if bitmask.dtype != torch.int32 or not bitmask.is_cpu or not row.is_contiguous():
        raise ValueError("the bitmask must be a contiguous int32 tensor on the CPU")
    m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


class LLGuidanceMatcher:
    """One sequence's llguidance matcher with xgrammar's `GrammarMatcher` methods (what `Matcher`
    drives); see the module docstring for the differences."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_token_ids: list[int]) -> None:
        self._m = matcher
        self._stops = frozenset(int(t) for t in stop_token_ids)
        self._terminated = False

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        if self._terminated:
            bitmask[index].zero_()
            return
        fill_bitmask(self._m, bitmask, index)

    def accept_token(self, token_id: int) -> bool:
        token_id = int(token_id)
        if self._terminated:
            return False
        if self._m.is_error():  # its lexer ran out of fuel: this output cannot go on under the grammar
            raise GrammarError(f"llguidance stopped on this grammar: {_first_line(self._m.get_error())}",
                               param="response_format")
        if token_id in self._stops:
            if not self._m.is_accepting():
                return False
            self._terminated = True  # llguidance keeps no history entry for a stop token: nothing to consume
            return True
        if self._m.validate_tokens([token_id]) != 1:
            return False
        return bool(self._m.consume_token(token_id))

    def is_terminated(self) -> bool:
        return self._terminated

    def is_completed(self) -> bool:
        return self._terminated or bool(self._m.is_accepting())

    def find_jump_forward_string(self) -> str:
        if self._terminated:
            return ""
        forced = self._m.compute_ff_bytes()
        for cut in range(len(forced), max(-1, len(forced) - 4), -1):  # whole UTF-8 characters only
            try:
                return forced[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return ""

    def accept_string(self, text: str) -> bool:
        raise NotImplementedError("a grammar served by llguidance advances by tokens only (accept_token)")

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens and not self._m.rollback(num_tokens):
            raise ValueError(f"llguidance cannot roll back {num_tokens} tokens: {self._m.get_error()}")

    def reset(self) -> None:
        self._m.reset()
        self._terminated = False

