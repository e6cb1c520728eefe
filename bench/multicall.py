"""Requests that need several tool calls (2-3), through our OpenAI-compatible endpoint, with and without
the grammar: BFCL's parallel shapes on cases written for this benchmark (not taken from BFCL).

`parallel`: one tool called several times ("weather in Paris and in Rome"); `parallel_multiple`: different
tools in one reply ("the weather in Oslo and the population of Lima"). Every case offers the same five
tools, so the model also has to pick. Both arms go through `bench.bfcl` (constrained: `tools`,
`tool_choice="required"`, `parallel_tool_calls=true`; unconstrained: the tools described in the system
prompt, calls parsed from the text) and are scored by its AST rules, calls matched in any order.
Run: `agentrt bench multicall [--limit N] [--arm constrained] [--json OUT] [--concurrency K]`.
"""

from __future__ import annotations

import asyncio

from bench import bfcl
from bench.common import model_parser


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"name": name, "description": description,
            "parameters": {"type": "dict", "properties": properties, "required": required}}


_CITY = {"type": "string", "description": "The name of the city, e.g. Madrid."}
FUNCTIONS = [
    _fn("get_weather", "Current weather in a city.",
        {"city": _CITY, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                 "description": "Temperature unit.", "default": "celsius"}}, ["city"]),
    _fn("get_population", "Number of people living in a city.", {"city": _CITY}, ["city"]),
    _fn("get_time", "The current local time in a city.", {"city": _CITY}, ["city"]),
    _fn("get_stock_price", "The latest price of a stock.",
        {"symbol": {"type": "string", "description": "The ticker symbol, e.g. IBM."}}, ["symbol"]),
    _fn("add", "Add two numbers.", {"a": {"type": "float", "description": "The first number."},
                                    "b": {"type": "float", "description": "The second number."}}, ["a", "b"]),
]
_UNIT = {"unit": ["", "celsius"]}  # the unit may be left out (its default) unless the request names one


def _weather(city: str, unit: list | None = None) -> dict:
    return {"get_weather": {"city": [city], **({"unit": unit} if unit else _UNIT)}}


def _one(name: str, **args) -> dict:
    return {name: {k: [v] for k, v in args.items()}}


def _add(a: float, b: float) -> dict:  # a sum's operands in either order
    return {"add": {"a": [a, b], "b": [b, a]}}


# (request, expected calls); categories by which tools the calls use
CASES: list[tuple[str, list[dict]]] = [
    ("What is the weather in Paris and in Rome?", [_weather("Paris"), _weather("Rome")]),
    ("How many people live in Tokyo, and how many in Cairo?",
     [_one("get_population", city="Tokyo"), _one("get_population", city="Cairo")]),
    ("What time is it in London and in Sydney?", [_one("get_time", city="London"), _one("get_time", city="Sydney")]),
    ("Get me the stock prices of AAPL and MSFT.",
     [_one("get_stock_price", symbol="AAPL"), _one("get_stock_price", symbol="MSFT")]),
    ("Add 3 and 4, and also add 10 and 20.", [_add(3.0, 4.0), _add(10.0, 20.0)]),
    ("Tell me the populations of Berlin, Lima and Oslo.",
     [_one("get_population", city=c) for c in ("Berlin", "Lima", "Oslo")]),
    ("What's the weather like in Madrid, Dublin and Vienna?", [_weather(c) for c in ("Madrid", "Dublin", "Vienna")]),
    ("Look up the prices of the stocks TSLA, NVDA and AMZN.",
     [_one("get_stock_price", symbol=s) for s in ("TSLA", "NVDA", "AMZN")]),
    ("What is the local time in Chicago and in Moscow?",
     [_one("get_time", city="Chicago"), _one("get_time", city="Moscow")]),
    ("Give me the weather in Boston in fahrenheit and in Prague in celsius.",
     [_weather("Boston", ["fahrenheit"]), _weather("Prague", ["celsius"])]),
    ("What is the weather in Lisbon, and how many people live in Lisbon?",
     [_weather("Lisbon"), _one("get_population", city="Lisbon")]),
    ("What time is it in Seoul, and what is the weather there?", [_one("get_time", city="Seoul"), _weather("Seoul")]),
    ("Get the stock price of IBM and add 12 and 30.", [_one("get_stock_price", symbol="IBM"), _add(12.0, 30.0)]),
    ("How many people live in Athens, and what time is it in Warsaw?",
     [_one("get_population", city="Athens"), _one("get_time", city="Warsaw")]),
    ("Tell me the weather in Oslo and the population of Lima.", [_weather("Oslo"), _one("get_population", city="Lima")]),
    ("What is the stock price of GOOG, and what time is it in New York?",
     [_one("get_stock_price", symbol="GOOG"), _one("get_time", city="New York")]),
    ("Add 5 and 8, and tell me the population of Rome.", [_add(5.0, 8.0), _one("get_population", city="Rome")]),
    ("What's the time in Paris, the weather in Berlin and the population of Madrid?",
     [_one("get_time", city="Paris"), _weather("Berlin"), _one("get_population", city="Madrid")]),
    ("Find the population of Dublin and the stock price of ORCL.",
     [_one("get_population", city="Dublin"), _one("get_stock_price", symbol="ORCL")]),
    ("What is the weather in Cairo and the local time in Tokyo?", [_weather("Cairo"), _one("get_time", city="Tokyo")]),
]


def cases(limit: int | None = None) -> list[bfcl.Case]:
    """The cases as BFCL cases: `parallel` when every call is to one tool, else `parallel_multiple`."""
    out = []
    for i, (request, answers) in enumerate(CASES):
        category = "parallel" if len({next(iter(a)) for a in answers}) == 1 else "parallel_multiple"
        out.append(bfcl.Case(f"multicall_{i}", category, [{"role": "user", "content": request}], FUNCTIONS, answers))
    by_category = {c: [x for x in out if x.category == c] for c in ("parallel", "parallel_multiple")}
    return [x for group in by_category.values() for x in group[:limit]]


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("multicall", __doc__)
    ap.add_argument("--limit", type=int, default=None, help="first N cases of each category")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--max-tokens", type=int, default=256, help="per reply (default 256)")
    ap.add_argument("--arm", choices=bfcl.ARMS, nargs="+", default=list(bfcl.ARMS))
    ap.add_argument("--show-failures", type=int, default=0, metavar="N", help="print N failed replies per arm")
    args = ap.parse_args(argv)
    chosen = cases(args.limit)
    return bfcl.report_run(args, chosen, asyncio.run(bfcl.serve_and_run(args, chosen)), title="multi-call cases")


if __name__ == "__main__":
    raise SystemExit(main())
