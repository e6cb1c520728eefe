"""What every benchmark ends with: print its table, and write its JSON when asked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def report(result: dict, print_table: Callable[[dict], None], json_path: str | None) -> int:
    print_table(result)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
