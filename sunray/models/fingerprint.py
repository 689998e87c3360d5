"""The identity of a decode module: KV written by a prefill module is valid only for a decode module with the same
architecture, tokenizer, base weights and quantization (docs/architecture.md, "Compatibility")."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from sunray.models.config import ModelConfig

# The fields of ModelConfig that change what a token's KV means; eos/bos ids and context length do not.
_ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rms_norm_eps",
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "qk_norm",
    "embedding_multiplier",
    "attention_multiplier",
    "residual_multiplier",
    "logits_scaling",
    "post_norm",
    "rope_parameters",
)
_SAMPLES_PER_TENSOR = 1 << 16


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def architecture_hash(config: ModelConfig) -> str:
    return _sha({f: getattr(config, f) for f in _ARCH_FIELDS})


def tokenizer_hash(tokenizer) -> str:
    if tokenizer is None:  # dummy-weight benchmarks run without one
        return "none"
    return _sha(sorted(tokenizer.get_vocab().items()))


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of names, shapes and an evenly strided sample of every tensor's values.

    Sampling keeps this at well under a second for an 8B model while still telling different bases apart; a
    fine-tuned prefill module names its base in its manifest instead of being hashed.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        # Through bf16, so that float32 and bf16 copies of one base hash the same (the KV dtype is checked apart).
        sample = flat[::step].to(torch.bfloat16).float().cpu().contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    architecture: str
    tokenizer: str
    weights: str
    quantization: str = "none"

    @property
    def digest(self) -> str:
        return _sha(dataclasses.asdict(self))

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Fingerprint:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def differences(self, other: Fingerprint) -> list[str]:
        return [
            f"{f.name}: {getattr(self, f.name)} != {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def __str__(self) -> str:
        return f"{self.digest} (arch {self.architecture}, tokenizer {self.tokenizer}, weights {self.weights}, {self.quantization})"
