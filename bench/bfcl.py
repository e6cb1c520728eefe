"""Function-calling quality on BFCL v4 through our own OpenAI-compatible endpoint, with and without the grammar.

Each Berkeley Function Calling Leaderboard case (Patil et al., gorilla; format in ../shared/data/README.md)
goes through `POST /v1/chat/completions` twice: constrained (its functions as `tools`,
`tool_choice="required"`, calls decoded under the tool-call grammar) and unconstrained (the same tools
described in the same system prompt, no `tools`, calls parsed from the text). Answers are scored with
the rules of BFCL's AST checker (bfcl_eval/eval_checker/ast_eval/ast_checker.py, Python rules).
Prints a table; `--json OUT` writes {"model", "rows": [{"category", "arm", "n", "correct", "invalid"}]}.
Run: `agentrt bench bfcl [--model M] [--category C ...] [--limit N] [--data DIR] [--json OUT]
[--concurrency K]` from the repo root.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import model_parser

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bfcl"
ARMS = ("constrained", "unconstrained")

# Categories scored by other rules than the Python AST checker (execution, Java/JS literals, multi-turn).
_NOT_AST = re.compile(r"^(multi_turn|simple_java|simple_javascript|java|javascript|irrelevance|live_irrelevance|"
                      r"live_relevance|memory|web_search|format_sensitivity)")


# --- data -------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    category: str
    messages: list[dict]  # the first (only) turn of `question`
    functions: list[dict]  # BFCL function descriptions: {"name", "description", "parameters"}
    answers: list[dict]  # ground truth: one {fn_name: {param: [allowed values]}} per expected call


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def categories(data_dir: Path) -> list[str]:
    """Categories with a question file and its possible_answer twin, that the AST rules score."""
    found = []
    for path in sorted(data_dir.glob("BFCL_v4_*.json")):
        name = path.stem.removeprefix("BFCL_v4_")
        if (data_dir / "possible_answer" / path.name).exists() and not _NOT_AST.match(name):
            found.append(name)
    return found


def load_cases(data_dir: Path, category: str, limit: int | None = None) -> list[Case]:
    """The first `limit` cases of `category` (all when None), questions joined to answers by id."""
    questions = _lines(data_dir / f"BFCL_v4_{category}.json")[:limit]
    answers = {a["id"]: a["ground_truth"] for a in _lines(data_dir / "possible_answer" / f"BFCL_v4_{category}.json")}
    return [Case(q["id"], category, q["question"][0], q["function"], answers[q["id"]]) for q in questions]


# --- the AST checker --------------------------------------------------------------------------

_PY_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                              "tuple": list, "dict": dict, "any": str}
_IGNORED = re.compile(r"[ ,./\-_*^]")


@dataclass
class Verdict:
    ok: bool
    kind: str = ""  # wrong_count | wrong_name | missing_required | unexpected_param | wrong_type | wrong_value
    #                 | missing_param | invalid
    detail: str = ""


OK = Verdict(True)


def standardize(text: str) -> str:
    """BFCL's string normal form: no spaces or `,./-_*^`, lower case, single quotes as double."""
    return _IGNORED.sub("", text).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return standardize(value) if isinstance(value, str) else value


def _answer_type(allowed: list) -> type | None:
    """The type of the first allowed value that is not the omissible marker `""`."""
    return next((type(a) for a in allowed if a != ""), None)


def _items_typed(value: list, item_type: type, allowed: list) -> bool:
    # BFCL checks one level deep: every item has the declared item type (or the type the answer uses)
    for answer in allowed:
        if not isinstance(answer, list):
            return True
        inner = _answer_type(answer)
        if all(type(x) is item_type or type(x) is inner for x in value):
            return True
    return False


def _dict_ok(value: dict, allowed: list) -> bool:
    """Some allowed dict accepts `value`: known keys, allowed values, missing keys omissible."""
    if not isinstance(value, dict):
        return False
    for answer in allowed:
        if not isinstance(answer, dict):
            continue
        if all(k in answer and _std(v) in [_std(a) for a in answer[k]] for k, v in value.items()) and \
                all(k in value or "" in vals for k, vals in answer.items()):
            return True
    return False


def _list_ok(value: list, allowed: list) -> bool:
    # "" (omissible) compares like an empty list, as in BFCL
    options = [[_std(x) for x in (a or [])] for a in allowed if isinstance(a, list) or a == ""]
    return [_std(x) for x in value] in options


def _value_verdict(param: str, value: Any, spec: dict, allowed: list) -> Verdict:
    kind = spec.get("type")
    expected = _PY_TYPES.get(kind) if isinstance(kind, str) else None
    item_kind = (spec.get("items") or {}).get("type") if kind in ("array", "tuple") else None
    item_type = _PY_TYPES.get(item_kind) if isinstance(item_kind, str) else None
    if kind == "float" and type(value) is int:  # Python's int-to-float promotion
        value = float(value)
    answer_type = _answer_type(allowed)
    # a "variable": the answer is written in another type than the declared one (e.g. a name as a string)
    variable = answer_type is not None and expected is not None and answer_type is not expected
    if expected is not None:
        if type(value) is expected and (item_type is None or _items_typed(value, item_type, allowed)):
            pass
        elif answer_type is not None and type(value) is answer_type:
            variable = True
        else:
            return Verdict(False, "wrong_type", f"{param}: {value!r} is not {kind}")
    if not variable:
        if expected is dict:
            ok = _dict_ok(value, allowed)
        elif expected is list and item_type is dict:
            ok = any(isinstance(a, list) and len(a) == len(value) and all(_dict_ok(v, [d]) for v, d in zip(value, a))
                     for a in allowed)
        elif expected is str:
            ok = standardize(value) in [standardize(a) for a in allowed if isinstance(a, str)]
        elif expected is list:
            ok = _list_ok(value, allowed)
        else:
            ok = value in allowed
    else:
        ok = value in allowed
    return OK if ok else Verdict(False, "wrong_value", f"{param}: {value!r} not in {allowed!r}")


def check_call(function: dict, call: dict, answer: dict) -> Verdict:
    """One call `{"name", "arguments"}` against one ground-truth entry `{fn_name: {param: [allowed]}}`
    and the function's description."""
    (name, allowed), = answer.items()
    if call["name"] != name:
        return Verdict(False, "wrong_name", f"{call['name']!r} instead of {name!r}")
    params = function.get("parameters") or {}
    props = params.get("properties") or {}
    args = call["arguments"]
    for p in params.get("required") or []:
        if p not in args:
            return Verdict(False, "missing_required", p)
    for p, v in args.items():
        if p not in props or p not in allowed:
            return Verdict(False, "unexpected_param", p)
        verdict = _value_verdict(p, v, props[p], allowed[p])
        if not verdict.ok:
            return verdict
    for p, values in allowed.items():
        if p not in args and "" not in values:
            return Verdict(False, "missing_param", p)
    return OK


def _describe(functions: list[dict], name: str) -> dict:
    return next((f for f in functions if f["name"] == name), functions[0])


def check_case(category: str, functions: list[dict], calls: list[dict] | None, answers: list[dict]) -> Verdict:
    """Score a reply's calls (None: the reply held no well-formed call). Categories named `parallel*`
    match calls to answers in any order; the others compare them in order. The count must match."""
    if calls is None:
        return Verdict(False, "invalid")
    if len(calls) != len(answers):
        return Verdict(False, "wrong_count", f"{len(calls)} calls for {len(answers)}")
    if "parallel" not in category:
        for call, answer in zip(calls, answers):
            verdict = check_call(_describe(functions, next(iter(answer))), call, answer)
            if not verdict.ok:
                return verdict
        return OK
    unmatched = list(range(len(calls)))
    for answer in answers:  # greedy, as BFCL: each answer takes the first call that fits it
        function = _describe(functions, next(iter(answer)))
        verdicts = [(i, check_call(function, calls[i], answer)) for i in unmatched]
        hit = next((i for i, v in verdicts if v.ok), None)
        if hit is None:
            return verdicts[0][1] if verdicts else Verdict(False, "wrong_count")
        unmatched.remove(hit)
    return OK


# --- calls out of replies ---------------------------------------------------------------------


def _as_call(obj: Any) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI's wire form: arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def calls_from_message(message: dict) -> list[dict] | None:
    """Calls of an OpenAI assistant message (`tool_calls` with JSON-string arguments), or None when
    there are none or one does not hold a JSON object."""
    calls = []
    for tc in message.get("tool_calls") or []:
        try:
            args = json.loads(tc["function"]["arguments"] or "{}")
        except json.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        calls.append({"name": tc["function"]["name"], "arguments": args})
    return calls or None


def calls_from_text(text: str) -> list[dict] | None:
    """Calls written as free text: `<tool_call>` blocks (all of them well formed), else a bare JSON
    object `{"name", "arguments"}` (or "parameters") or a list of them; None when there is neither."""
    from agentrt.grammar import TOOL_CALL_BEGIN, parse_tool_calls

    opened = text.count(TOOL_CALL_BEGIN)
    if opened:
        _, parsed = parse_tool_calls(text)
        calls = [_as_call(c) for c in parsed]
        return calls if len(calls) == opened and all(calls) else None
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):  # the first JSON value, from the left, that reads as calls
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        calls = [_as_call(o) for o in (obj if isinstance(obj, list) else [obj])]
        if calls and all(calls):
            return calls
    return None


# --- requests ---------------------------------------------------------------------------------


def api_name(name: str) -> str:
    """A BFCL function name as OpenAI's API accepts it (`^[a-zA-Z0-9_-]{1,64}$`): `math.factorial` is sent
    as `math_factorial`, as BFCL's own OpenAI handlers do, and a call by that name is scored as a call of
    `math.factorial` (`original_names`)."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]


def original_names(case: Case, calls: list[dict] | None) -> list[dict] | None:
    """Calls with the names they were offered under (`api_name`) turned back into the case's own."""
    names = {api_name(f["name"]): f["name"] for f in case.functions}
    return None if calls is None else [{**c, "name": names.get(c["name"], c["name"])} for c in calls]


def tools_of(case: Case) -> list[dict]:
    return [{"type": "function", "function": {**f, "name": api_name(f["name"])}} for f in case.functions]


def free_text_messages(case: Case) -> list[dict]:
    """The case's messages with its tools described in the system prompt, as the server itself words
    and places them for a template without native tools: both arms see the same prompt."""
    from agentrt.chat import tool_instructions

    text = tool_instructions(tools_of(case))
    messages = [dict(m) for m in case.messages]
    if messages[0]["role"] == "system":
        messages[0]["content"] = messages[0]["content"] + "\n\n" + text
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages


def request_body(case: Case, arm: str, model: str, max_tokens: int) -> dict:
    body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": max_tokens}
    if arm == "constrained":
        body.update(messages=case.messages, tools=tools_of(case), tool_choice="required",
                    parallel_tool_calls="parallel" in case.category)
    else:
        body.update(messages=free_text_messages(case))
    return body


@dataclass
class Outcome:
    case: Case
    arm: str
    verdict: Verdict
    completion_tokens: int
    finish_reason: str  # "length": cut by --max-tokens
    reply: str  # the model's text, or the calls as JSON


async def ask(client, case: Case, arm: str, model: str, max_tokens: int) -> Outcome:
    """One request through the endpoint, scored."""
    r = await client.post("/chat/completions", json=request_body(case, arm, model, max_tokens))
    if r.is_error:  # e.g. a grammar compile past the server's timeout on a loaded machine: say which case, and why
        raise RuntimeError(f"{case.id} ({arm}): HTTP {r.status_code}: {r.text[:300]}")
    reply = r.json()
    message = reply["choices"][0]["message"]
    if arm == "constrained":
        calls = calls_from_message(message)
        shown = json.dumps([tc["function"] for tc in message.get("tool_calls") or []], ensure_ascii=False)
    else:
        calls = calls_from_text(message.get("content") or "")
        shown = message.get("content") or ""
    verdict = check_case(case.category, case.functions, original_names(case, calls), case.answers)
    return Outcome(case, arm, verdict, reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"],
                   shown)


async def run_cases(client, cases: list[Case], model: str, *, arms: tuple[str, ...] = ARMS, concurrency: int = 16,
                    max_tokens: int = 256, progress: bool = False) -> list[Outcome]:
    """Every case through every arm, `concurrency` requests in flight (the engine batches them)."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(case: Case, arm: str) -> Outcome:
        nonlocal done
        async with gate:
            out = await ask(client, case, arm, model, max_tokens)
        done += 1
        if progress and (done % 20 == 0 or done == total):
            print(f"  {done}/{total} requests", file=sys.stderr, flush=True)
        return out

    jobs = [(c, a) for c in cases for a in arms]
    total = len(jobs)
    return list(await asyncio.gather(*(one(c, a) for c, a in jobs)))


# --- report -----------------------------------------------------------------------------------


def summarize(outcomes: list[Outcome]) -> list[dict]:
    """Rows {"category", "arm", "n", "correct", "invalid"} in first-seen order."""
    rows: dict[tuple[str, str], dict] = {}
    for o in outcomes:
        row = rows.setdefault((o.case.category, o.arm),
                              {"category": o.case.category, "arm": o.arm, "n": 0, "correct": 0, "invalid": 0})
        row["n"] += 1
        row["correct"] += o.verdict.ok
        row["invalid"] += o.verdict.kind == "invalid"
    return list(rows.values())


def print_report(outcomes: list[Outcome]) -> None:
    """The rows, a total per arm, mean reply length, replies cut by --max-tokens, and why cases failed."""
    groups: dict[tuple[str, str], list[Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        groups[o.case.category, o.arm].append(o)
    for o in outcomes:
        groups["all", o.arm].append(o)
    print(f"{'category':<20} {'arm':<14} {'n':>4} {'correct':>13} {'invalid':>13} {'tok/reply':>9} {'cut':>4}  failures")
    for (category, arm), group in groups.items():
        n = len(group)
        correct = sum(o.verdict.ok for o in group)
        invalid = sum(o.verdict.kind == "invalid" for o in group)
        cut = sum(o.finish_reason == "length" for o in group)
        fails = collections.Counter(o.verdict.kind for o in group if not o.verdict.ok)
        print(f"{category:<20} {arm:<14} {n:>4} {correct:>4} ({correct / n:>6.1%}) {invalid:>4} ({invalid / n:>6.1%}) "
              f"{sum(o.completion_tokens for o in group) / n:>9.1f} {cut:>4}  "
              + ", ".join(f"{k} {v}" for k, v in fails.most_common()))


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("bfcl", __doc__)
    ap.add_argument("--category", nargs="+", default=None, help="default: every category in the data dir")
    ap.add_argument("--limit", type=int, default=None, help="first N cases of each category")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"BFCL v4 files (default {DEFAULT_DATA})")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    ap.add_argument("--max-tokens", type=int, default=256, help="per reply (default 256)")
    ap.add_argument("--arm", choices=ARMS, nargs="+", default=list(ARMS))
    ap.add_argument("--show-failures", type=int, default=0, metavar="N", help="print N failed replies per arm")
    args = ap.parse_args(argv)

    if not args.data.is_dir():
        print(f"no BFCL data at {args.data}: pass --data DIR (BFCL_v4_<category>.json + possible_answer/)",
              file=sys.stderr)
        return 2
    present = categories(args.data)
    chosen = args.category or present
    missing = [c for c in chosen if c not in present]
    if missing:
        print(f"categories {missing} are not in {args.data} (or not scored by AST rules); present: {present}",
              file=sys.stderr)
        return 2
    cases = [c for cat in chosen for c in load_cases(args.data, cat, args.limit)]
    return report_run(args, cases, asyncio.run(serve_and_run(args, cases)))


def report_run(args: argparse.Namespace, cases: list[Case], run: tuple[list[Outcome], float], *,
               title: str = "BFCL v4") -> int:
    """Print a run's table and its failures (`--show-failures`); write `--json` when asked."""
    outcomes, seconds = run
    rows = summarize(outcomes)
    print(f"\n{title} via /v1/chat/completions, model {args.model}, {len(cases)} cases x {len(args.arm)} arms, "
          f"{seconds:.0f} s")
    print_report(outcomes)
    for arm in args.arm:
        failed = [o for o in outcomes if o.arm == arm and not o.verdict.ok][:args.show_failures]
        for o in failed:
            print(f"\n[{arm}] {o.case.id}: {o.verdict.kind} {o.verdict.detail}\n  {o.reply[:300]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=2)
    return 0


async def serve_and_run(args: argparse.Namespace, cases: list[Case]) -> tuple[list[Outcome], float]:
    """Every case through the in-process server on `args.model` (`args.arm`, `args.concurrency`, `args.max_tokens`)."""
    import httpx

    from agentrt.engine import Engine
    from agentrt.server import create_app

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    try:
        app = create_app(engine, model_names=[args.model])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agentrt/v1",
                                     timeout=None) as client:
            start = time.perf_counter()
            outcomes = await run_cases(client, cases, args.model, arms=tuple(args.arm),
                                       concurrency=args.concurrency, max_tokens=args.max_tokens, progress=True)
            return outcomes, time.perf_counter() - start
    finally:
        engine.close()


if __name__ == "__main__":
    raise SystemExit(main())
