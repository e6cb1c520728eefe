"""What every benchmark shares: its common options, and its end (print the table, write the JSON when asked)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from agentrt.engine.models import DTYPE_CHOICES, DTYPE_HELP


def model_parser(suite: str, doc: str | None, repeats: int | None = None) -> argparse.ArgumentParser:
    """`agentrt bench SUITE`'s parser with the options every model benchmark takes: --model, --device,
    --json, and --repeats when `repeats` (its default) is given."""
    ap = argparse.ArgumentParser(prog=f"agentrt bench {suite}", description=(doc or "").splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    ap.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to OUT")
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def machine(engine) -> dict:
    """Where a run happened, for its JSON and table title: device, weights' dtype, CPU threads."""
    import torch

    return {"device": str(engine.device), "dtype": str(engine.model.embed.weight.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def where(result: dict) -> str:
    """'cpu, bfloat16, 2 threads' for a table title."""
    return f"{result['device']}, {result.get('dtype', '?')}, {result['threads']} threads"


def report(result: dict, print_table: Callable[[dict], None], json_path: str | None) -> int:
    print_table(result)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
