"""The `agentrt` command as a user runs it: a real subprocess, real model files."""

from __future__ import annotations

import subprocess
import sys


def agentrt(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentrt.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_the_completion_to_stdout():
    from agentrt.engine import Engine
    from agentrt.sampling import SamplingParams

    proc = agentrt("generate", "--model", "tiny-random", "--raw", "--max-tokens", "6", "Hello there")
    assert proc.returncode == 0, proc.stderr
    with Engine.load("tiny-random", device="cpu") as engine:
        expected = engine.generate_sync("Hello there", SamplingParams(max_tokens=6)).text
    assert proc.stdout == expected + "\n"


def test_unknown_model_exits_nonzero_with_the_choices():
    proc = agentrt("generate", "--model", "nope", "hi")
    assert proc.returncode == 1
    assert "smollm2-135m" in proc.stderr and "tiny-random" in proc.stderr


def test_invalid_sampling_value_names_the_parameter():
    proc = agentrt("generate", "--model", "tiny-random", "--top-p", "2", "hi")
    assert proc.returncode == 1 and "top_p" in proc.stderr


def test_pull_prepares_a_model():
    proc = agentrt("pull", "tiny-random")
    assert proc.returncode == 0 and "ready" in proc.stderr
