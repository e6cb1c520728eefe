"""MaskBench correctness without a model: compile every schema, feed each test instance's JSON
text token by token to a matcher, and compare accept/reject with the instance's `valid` label.

Run as a script to write bench/results/maskbench.md (all 980 schemas, ~10 min on 2 cores):
    python tests/grammar/maskbench_eval.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from agentrt.errors import GrammarError
from agentrt.grammar import GrammarCompiler, JsonSchema, CompileCache

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("AGENTRT_DATA", REPO.parent / "shared" / "data"))
MASKBENCH = DATA / "maskbench"
SEPARATORS = (",", ":")


@dataclass
class Mismatch:
    file: str
    test: str
    valid: bool
    reason: str


@dataclass
class Result:
    schemas: int = 0
    compiled: int = 0
    compile_failures: list[tuple[str, str]] = field(default_factory=list)
    compile_seconds: list[float] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # (valid, accepted) -> n
    reordered: int = 0
    warned_schemas: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(self.counts.values())

    @property
    def agreement(self) -> float:
        agree = self.counts[(True, True)] + self.counts[(False, False)]
        return agree / max(1, self.instances)


class ByteTokenizer:
    """One token per UTF-8 byte plus an end token: checks the grammar's language, fast to compile."""

    eos_token_id = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    @staticmethod
    def compiler(cache: CompileCache | None = None) -> GrammarCompiler:
        import xgrammar as xgr

        info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b"</s>"], stop_token_ids=[256])
        return GrammarCompiler(info, cache=cache or CompileCache(max_bytes=256 << 20))


def maskbench_files(stride: int = 1) -> list[Path]:
    return sorted(MASKBENCH.glob("*.json"))[::stride]


def serialise(data: Any, schema: Any) -> tuple[str, bool]:
    """The instance as our default grammar lays JSON out (compact separators, keys in the schema's
    declared order, since the grammar fixes that order); and whether any key was moved."""
    ordered = order_like_schema(data, schema, schema, depth=0)
    text = json.dumps(ordered, separators=SEPARATORS, ensure_ascii=False)
    return text, text != json.dumps(data, separators=SEPARATORS, ensure_ascii=False)


def evaluate(
    compiler: GrammarCompiler, tokenizer: Any, files: list[Path], *, allow_undeclared: bool = True
) -> Result:
    res = Result()
    eos = tokenizer.eos_token_id
    for path in files:
        case = json.loads(path.read_text())
        res.schemas += 1
        try:
            compiled = compiler.compile(JsonSchema(case["schema"], allow_undeclared=allow_undeclared))
        except GrammarError as e:
            res.compile_failures.append((path.name, str(e)))
            continue
        res.compiled += 1
        res.compile_seconds.append(compiled.compile_seconds)
        res.warned_schemas += bool(compiled.warnings)
        for i, test in enumerate(case["tests"]):
            text, moved = serialise(test["data"], case["schema"])
            res.reordered += moved
            matcher = compiled.matcher()
            ids = tokenizer.encode(text, add_special_tokens=False)
            at = next((k for k, t in enumerate(ids) if not matcher.accept_token(t)), None)
            accepted = at is None and matcher.accept_token(eos)
            res.counts[(bool(test["valid"]), accepted)] += 1
            if accepted != bool(test["valid"]):
                res.mismatches.append(
                    Mismatch(
                        path.name,
                        test.get("description", f"#{i}"),
                        bool(test["valid"]),
                        _reason(test, text, at, ids, tokenizer, compiled.warnings),
                    )
                )
    return res


def _reason(test: dict, text: str, at: int | None, ids: list[int], tok: Any, warnings: list[str]) -> str:
    if not test["valid"]:
        if warnings:
            return "accepted, reported as not enforced; " + " / ".join(warnings)[:300]
        return "accepted, no warning was raised; the grammar is looser than the schema here"
    if at is None:
        return "rejected at the end: the grammar wanted more text"
    pos = len(tok.decode(ids[:at]))
    before, after = text[max(0, pos - 40) : pos], text[pos : pos + 20]
    where = f"`{before}` ⟂ `{after}`"
    head = text[:pos]
    key_start = max(head.rfind('{"'), head.rfind(',"'))
    in_key = (
        key_start >= 0
        and '"' not in head[key_start + 2 :]
        or (head.endswith(("{", ",")) and after[:1] == '"')
    )
    if in_key:
        why = (
            "object key not allowed here: xgrammar fixes property order per branch, "
            "or merges sibling properties with anyOf/oneOf branches"
        )
    elif after[:1] in "eE" and before[-1:].isdigit():
        why = "exponent notation in a number with a range (xgrammar's range grammar has no exponent)"
    elif before[-1:].isdigit() and "." in before[-8:] and len(before.rsplit(".", 1)[-1]) >= 6:
        why = "more than 6 fraction digits in a number with a range (xgrammar's range grammar allows 6)"
    elif after.startswith("\\"):
        why = "escape sequence inside a length-bounded or pattern string (xgrammar excludes escapes there)"
    else:
        why = "value rejected (format/pattern dialect or a grammar limitation)"
    return f"{why}; at char {pos}: {where}"


def _resolve(schema: Any, root: Any) -> Any:
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 20:
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return schema
        node = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return schema
            node = node[part]
        schema, seen = node, seen + 1
    return schema


def _branches(schema: Any, root: Any, data: Any, depth: int = 0) -> list[dict]:
    """The subschemas that apply to `data`: the schema, its allOf parts, and the first anyOf/oneOf
    branch that `data` validates against (the one a generation following the grammar would take)."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > 8:
        return []
    out = [schema]
    for sub in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        out += _branches(sub, root, data, depth + 1)
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key) if isinstance(schema.get(key), list) else []
        match = next((b for b in subs if _is_valid(data, b, root)), subs[0] if subs else None)
        if match is not None:
            out += _branches(match, root, data, depth + 1)
    return out


def _is_valid(data: Any, schema: Any, root: Any) -> bool:
    try:
        validator = jsonschema.validators.validator_for(root if isinstance(root, dict) else {})(root)
        return validator.evolve(schema=schema).is_valid(data)
    except Exception:  # noqa: BLE001 - an unusable schema just does not pick this branch
        return False


def order_like_schema(data: Any, schema: Any, root: Any, depth: int) -> Any:
    if depth > 50:
        return data
    branches = _branches(schema, root, data)
    if isinstance(data, dict):
        order: list[str] = []
        for b in branches:
            props = b.get("properties")
            if isinstance(props, dict):
                order += [k for k in props if k not in order]
        keys = [k for k in order if k in data] + [k for k in data if k not in order]
        out = {}
        for k in keys:
            subs = [
                b["properties"][k]
                for b in branches
                if isinstance(b.get("properties"), dict) and k in b["properties"]
            ]
            sub = (
                subs[0]
                if subs
                else next(
                    (
                        b["additionalProperties"]
                        for b in branches
                        if isinstance(b.get("additionalProperties"), dict)
                    ),
                    {},
                )
            )
            out[k] = order_like_schema(data[k], sub, root, depth + 1)
        return out
    if isinstance(data, list):
        out_list = []
        for i, item in enumerate(data):
            sub: Any = {}
            for b in branches:
                prefix = (
                    b.get("prefixItems")
                    if isinstance(b.get("prefixItems"), list)
                    else (b.get("items") if isinstance(b.get("items"), list) else None)
                )
                if prefix is not None and i < len(prefix):
                    sub = prefix[i]
                    break
                if isinstance(b.get("items"), dict):
                    sub = b["items"]
                    break
            out_list.append(order_like_schema(item, sub, root, depth + 1))
        return out_list
    return data


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def report(results: dict[str, Result], tokenizer_name: str, seconds: float) -> str:
    lines = [
        "# MaskBench: compile coverage and token-by-token accept/reject",
        "",
        f"Generated by `python tests/grammar/maskbench_eval.py` ({tokenizer_name} tokenizer, vocab 49152, "
        f"xgrammar 0.2.8, 2 CPU cores, {seconds:.0f} s). Data: ../shared/data/maskbench "
        "(980 schemas sampled from guidance-ai/jsonschemabench).",
        "",
        "Each test instance is serialised the way our default grammar lays JSON out: "
        "`json.dumps(data, separators=(',', ':'), ensure_ascii=False)` with object keys put in the "
        "schema's declared order (the grammar fixes property order, and a JSON object's meaning does "
        "not depend on it). The text is tokenised with the SmolLM2 tokenizer and fed token by token; "
        "an instance counts as accepted when every token and then the end-of-sequence token are "
        "accepted.",
        "",
    ]
    for mode, r in results.items():
        cs = r.compile_seconds
        lines += [
            f"## Mode: {mode}",
            "",
            "| measure | value |",
            "|---|---|",
            f"| schemas | {r.schemas} |",
            f"| compiled | {r.compiled} ({100 * r.compiled / max(1, r.schemas):.1f}%) |",
            f"| compile time p50 / p95 / max | {1000 * percentile(cs, 0.5):.0f} / "
            f"{1000 * percentile(cs, 0.95):.0f} / {1000 * max(cs, default=0):.0f} ms |",
            f"| schemas with warnings (unenforced keywords) | {r.warned_schemas} |",
            f"| test instances (of compiled schemas) | {r.instances} |",
            f"| instances whose keys were reordered to schema order | {r.reordered} |",
            f"| valid accepted / valid rejected | {r.counts[(True, True)]} / {r.counts[(True, False)]} |",
            f"| invalid rejected / invalid accepted | {r.counts[(False, False)]} / "
            f"{r.counts[(False, True)]} |",
            f"| agreement | {100 * r.agreement:.2f}% |",
            "",
        ]
    lines += [
        "## Why instances disagree",
        "",
        "- **valid but rejected** — the grammar is tighter than the schema. Causes seen: xgrammar fixes "
        "object property order per branch and merges properties declared next to `anyOf`/`oneOf` in its "
        "own order (our serialisation follows the declared order, and picks the anyOf/oneOf branch "
        "the instance validates against, but cannot always reproduce xgrammar's); numbers with a range "
        "admit no exponent and at most 6 fraction digits; strings with `minLength`/`maxLength` or a "
        "`pattern` admit no escape sequences; some `format` grammars (e.g. `uri-reference`) reject "
        "values `jsonschema` accepts (it does not assert formats by default).",
        "- **invalid but accepted** — the grammar is looser than the schema. Most of these are "
        "keywords the normaliser reports as warnings on the compiled result (`uniqueItems`, `not`, "
        "`if`/`then`, `dependentRequired`, `anyOf`/`oneOf` next to sibling properties, `oneOf` treated "
        "as `anyOf`, lengths next to `pattern`/`format`, ...); the rest are listed as "
        '"no warning was raised": calendar-invalid dates such as 2024-02-30 (`format: date` is '
        "checked for shape only), and a handful not yet diagnosed (Citrix ADC / Vector schemas with "
        "enums on object types and keys with trailing spaces); these are the gaps to shrink next.",
        "- **default mode only** — agentrt's default refuses properties a schema does not declare "
        "(where it declares some), so valid instances carrying extra keys are rejected on purpose (they "
        'show up as "object key not allowed here" or, inside untyped values, "value rejected"); '
        "pass `allow_undeclared=True` for JSON Schema's default.",
        "",
    ]
    for mode, r in results.items():
        reasons = Counter(m.reason.split(";")[0] for m in r.mismatches)
        lines += [f"### Disagreements by cause ({mode})", "", "| cause | instances |", "|---|---|"]
        lines += [f"| {cause} | {n} |" for cause, n in reasons.most_common()] + [""]
    for mode, r in results.items():
        lines += [f"## Compile failures ({mode})", ""]
        lines += [f"- `{f}`: {e[:300]}" for f, e in r.compile_failures] or ["none"]
        lines += [
            "",
            f"## Mismatches ({mode})",
            "",
            "| schema | instance | label | reason |",
            "|---|---|---|---|",
        ]
        for m in r.mismatches:
            reason = m.reason.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{m.file}` | {m.test[:60]} | {'valid' if m.valid else 'invalid'} | {reason} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from agentrt.engine.models import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "maskbench.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not MASKBENCH.is_dir():
        sys.exit(f"no MaskBench data at {MASKBENCH}")
    tok = load_tokenizer("tiny-random")
    compiler = GrammarCompiler(tok, vocab_size=49152, cache=CompileCache(max_bytes=64 << 20))
    files = maskbench_files()[: args.limit]
    t0 = time.time()
    results = {
        "JSON Schema semantics (`allow_undeclared=True`)": evaluate(
            compiler, tok, files, allow_undeclared=True
        ),
        "agentrt default (objects limited to declared properties)": evaluate(
            compiler, tok, files, allow_undeclared=False
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(results, "SmolLM2 (tiny-random)", time.time() - t0))
    for mode, r in results.items():
        print(
            f"{mode}: compiled {r.compiled}/{r.schemas}, agreement {100 * r.agreement:.2f}% "
            f"({dict(r.counts)}), p50 {statistics.median(r.compile_seconds or [0]):.3f}s"
        )


if __name__ == "__main__":
    main()
