"""Simple tool questions in every SDK mode on one model: the arithmetic and city questions below
(written for this table, not taken from a benchmark), asked with the calculator and the demo's
population lookup; an answer counts as right when it contains the expected number.
"""

from __future__ import annotations

import re
import time

from bench.common import model_parser, report

QUESTIONS = [  # (question, expected number)
    ("What is 17 times 23 plus 4?", 395),
    ("What is 125 minus 48?", 77),
    ("What is 36 divided by 4?", 9),
    ("What is 12 plus 30 plus 7?", 49),
    ("How many people live in Lisbon and Dublin together?", 567131 + 592713),
    ("How many more people live in Warsaw than in Prague?", 1863056 - 1384732),
    ("What is 45 times 12?", 540),
    ("What is 1000 minus 357?", 643),
    ("What is 81 divided by 9 plus 6?", 15),
    ("What is 7 times 8 times 9?", 504),
    ("What is the population of Vienna plus 1000?", 1982097 + 1000),
    ("How many people live in Madrid, Athens and Dublin together?", 3332035 + 643452 + 592713),
]
# plan-mode questions in the demo's style over other cities (neither the demo's nor its example's)
PLAN_QUESTIONS = [
    ("How many people live in Lisbon, Athens and Dublin together?", 567131 + 643452 + 592713),
    ("How many more people live in Warsaw than in Prague?", 1863056 - 1384732),
    ("What is the combined population of Rome and Lisbon?", 2748109 + 567131),
    ("By how many people does Berlin outnumber Athens?", 3878100 - 643452),
    ("How many people live in Prague and Warsaw together?", 1384732 + 1863056),
    # ten more for issue 13's count (sums of two to four cities, differences phrased four ways)
    ("How many people live in Madrid and Dublin together?", 3332035 + 592713),
    ("What is the total population of Vienna, Prague and Lisbon?", 1982097 + 1384732 + 567131),
    ("How many more people live in Madrid than in Vienna?", 3332035 - 1982097),
    ("How many fewer people live in Dublin than in Athens?", 643452 - 592713),
    ("What is the difference between the populations of Berlin and Warsaw?", 3878100 - 1863056),
    ("Add up the populations of Rome, Athens and Dublin.", 2748109 + 643452 + 592713),
    ("If you combine Lisbon and Warsaw, how many people is that?", 567131 + 1863056),
    ("How much bigger is Paris than Prague in population?", 2102650 - 1384732),
    ("What do Vienna and Athens have in population combined?", 1982097 + 643452),
    ("How many people live in Berlin, Madrid, Rome and Vienna altogether?", 3878100 + 3332035 + 2748109 + 1982097),
]
MODES = ["chat", "plan", "dta", "react", "thread", "hogwild"]


def right(answer: str, expected: float) -> bool:
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", (answer or "").replace(",", ""))]
    return any(abs(n - expected) < 1e-6 for n in numbers)


def run(model: str, modes: list[str], n: int, questions: list[tuple[str, float]]) -> dict:
    import anyio

    from agentrt import Agent
    from agentrt.demo import demo_tools
    from agentrt.engine import Engine

    engine = Engine.load(model)
    tools = demo_tools(latency=0.0)
    rows = []
    for mode in modes:
        agent = Agent(engine, tools=[] if mode == "hogwild" else tools, mode=mode, max_tokens=256)
        for q, expected in questions[:n]:
            t0 = time.perf_counter()
            try:
                r = anyio.run(agent.run, q)
                answer, calls = r.output if isinstance(r.output, str) else str(r.output), len(r.tool_calls)
            except Exception as exc:  # a failed run is a row, not the end of the table
                answer, calls = f"error: {exc}"[:120], 0
            rows.append({"mode": mode, "question": q, "expected": expected, "answer": answer[:160], "calls": calls,
                         "right": right(answer, expected), "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    engine.close()
    return {"model": model, "rows": rows}


def print_table(result: dict) -> None:
    print("| mode | right | questions | calls (mean) |")
    print("|---|---|---|---|")
    for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        print(f"| {mode} | {sum(r['right'] for r in rows)} | {len(rows)} | "
              f"{sum(r['calls'] for r in rows) / len(rows):.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("modes", __doc__)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("-n", type=int, default=len(QUESTIONS))
    ap.add_argument("--plan-questions", action="store_true", help="the held-out-style city questions instead")
    args = ap.parse_args(argv)
    questions = PLAN_QUESTIONS if args.plan_questions else QUESTIONS
    return report(run(args.model, args.modes.split(","), args.n, questions), print_table, args.json)
