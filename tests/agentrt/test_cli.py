"""The `agentrt` command as a user runs it: a real subprocess, real model files."""

from __future__ import annotations

import subprocess
import sys

import torch


def agentrt(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentrt.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_the_completion_to_stdout():
    from agentrt.engine import Engine
    from agentrt.engine.sampling import SamplingParams

    proc = agentrt("generate", "--model", "tiny-random", "--raw", "--max-tokens", "6", "Hello there")
    assert proc.returncode == 0, proc.stderr
    with Engine.load("tiny-random", device="cpu") as engine:
        expected = engine.generate_sync("Hello there", SamplingParams(max_tokens=6)).text
    assert proc.stdout == expected + "\n"


def test_dtype_option_picks_the_weights_dtype():
    from agentrt.engine import Engine
    from agentrt.engine.sampling import SamplingParams

    proc = agentrt("generate", "--model", "tiny-random", "--dtype", "float32", "--raw", "--max-tokens", "6", "Hi")
    assert proc.returncode == 0, proc.stderr
    with Engine.load("tiny-random", device="cpu", dtype="float32") as engine:
        assert engine.model.embed.weight.dtype is torch.float32
        assert proc.stdout == engine.generate_sync("Hi", SamplingParams(max_tokens=6)).text + "\n"
    bad = agentrt("generate", "--model", "tiny-random", "--dtype", "fp8", "hi")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr


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


def test_generate_under_a_json_schema_prints_only_valid_json(tmp_path):
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    proc = agentrt("generate", "--model", "tiny-random", "--max-tokens", "20", "--temperature", "1", "--seed", "3",
                   "--json-schema", str(tmp_path / "s.json"), "give me n")
    assert proc.returncode == 0, proc.stderr
    assert 0 <= json.loads(proc.stdout)["n"] <= 9


def test_generate_under_a_regex_and_a_lark_grammar(tmp_path):
    proc = agentrt("generate", "--model", "tiny-random", "--max-tokens", "10", "--regex", "(yes|no)", "ok?")
    assert proc.returncode == 0 and proc.stdout.strip() in ("yes", "no")
    (tmp_path / "g.lark").write_text('start: "a" "b"? "c"\n')
    proc = agentrt("generate", "--model", "tiny-random", "--max-tokens", "10", "--grammar", str(tmp_path / "g.lark"),
                   "x")
    assert proc.returncode == 0 and proc.stdout.strip() in ("ac", "abc"), proc.stderr


def test_two_constraints_or_a_missing_file_are_clear_errors(tmp_path):
    proc = agentrt("generate", "--model", "tiny-random", "--regex", "a", "--grammar", "x.ebnf", "hi")
    assert proc.returncode == 1 and "one of" in proc.stderr
    proc = agentrt("generate", "--model", "tiny-random", "--json-schema", str(tmp_path / "nope.json"), "hi")
    assert proc.returncode == 1 and "not a file" in proc.stderr


def test_mcp_flags_name_stdio_servers_split_as_a_shell_would():
    from agentrt.cli import _mcp_servers, build_parser

    for command in ("serve", "chat"):
        args = build_parser().parse_args([command, "--mcp", "python 'my server.py' --root /tmp", "--mcp", "npx fs"])
        servers = _mcp_servers(args)
        assert [(s.command, s.args) for s in servers] == [("python", ["my server.py", "--root", "/tmp"]),
                                                         ("npx", ["fs"])]
        assert not any(s.running for s in servers)  # started when their tools are first listed
    assert _mcp_servers(build_parser().parse_args(["serve"])) == []
