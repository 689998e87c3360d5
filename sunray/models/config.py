"""One frozen description of a decoder, read from a transformers config.

Every supported family (Llama, Qwen2, Qwen3, HyperCLOVA X) is a pre-norm decoder with RoPE, grouped-query
attention and a SwiGLU MLP; they differ only in the switches below, so one implementation covers all of them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "hyperclovax")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "HyperCLOVAXForCausalLM",
)


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the decoder families sunray implements."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Biases: Qwen2 has them on q/k/v only; Llama and HyperCLOVA X switch q/k/v/o together.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over each head of q and k, before RoPE.
    qk_norm: bool = False
    # HyperCLOVA X: muP multipliers and Peri-LN (an RMSNorm after attention and after the MLP).
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None  # softmax scale; None means 1/sqrt(head_dim)
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # multiplies the logits
    post_norm: bool = False
    # RoPE: the transformers-style parameter dict (rope_type, rope_theta, scaling factors ...).
    rope_parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; sunray supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def softmax_scale(self) -> float:
        return self.attention_multiplier if self.attention_multiplier is not None else self.head_dim**-0.5

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 10000.0))

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return (
            2
            * self.num_layers
            * self.num_kv_heads
            * self.head_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
        return self.num_layers * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> ModelConfig:
        model_type = getattr(hf, "model_type", None)
        archs = getattr(hf, "architectures", None) or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            name = archs[0] if archs else model_type
            raise UnsupportedModelError(
                f"architecture {name!r} (model_type {model_type!r}) is not supported; "
                f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf.hidden_act!r} is not supported (only silu)")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if not rope:  # transformers < 5 kept these as top-level fields
            rope = dict(getattr(hf, "rope_scaling", None) or {})
            rope.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        is_hcx = model_type == "hyperclovax"
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            embedding_multiplier=float(getattr(hf, "embedding_multiplier", 1.0)) if is_hcx else 1.0,
            attention_multiplier=float(hf.attention_multiplier)
            if is_hcx and hf.attention_multiplier
            else None,
            residual_multiplier=float(getattr(hf, "residual_multiplier", 1.0)) if is_hcx else 1.0,
            logits_scaling=float(getattr(hf, "logits_scaling", 1.0)) if is_hcx else 1.0,
            post_norm=bool(getattr(hf, "use_post_norm", False)) if is_hcx else False,
            rope_parameters=rope,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; is it a model directory?")
        raw = json.loads(path.read_text())
        if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
            archs = raw.get("architectures") or [raw.get("model_type")]
            raise UnsupportedModelError(
                f"architecture {archs[0]!r} (model_type {raw.get('model_type')!r}) is not supported; "
                f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # AutoConfig fills defaults exactly as transformers does; it reads only the local file.
        return cls.from_hf(AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False))
