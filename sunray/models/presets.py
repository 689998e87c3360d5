"""Named model shapes for benchmarks with dummy weights (no checkpoint needed)."""

from __future__ import annotations

import torch

from sunray.models.config import ModelConfig
from sunray.models.decoder import Decoder
from sunray.models.loader import LoadedModel, init_dummy_weights, wrap_model

SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        eos_token_ids=(128001, 128008, 128009),
        bos_token_id=128000,
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        eos_token_ids=(2,),
        bos_token_id=1,
    ),
}


def dummy_model(
    shape: str | ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A model of `shape` (a SHAPES name or a ModelConfig) with random weights, built directly on `device` in `dtype`
    (default: bf16 on CUDA, float32 elsewhere). Every parameter is allocated once, in its final dtype: building in
    float32 and casting would peak at 48 GB for the 8B shape, and the caching allocator would keep the freed float32
    storage (a serving replica held 31.7 GB for a 16 GB model that way)."""
    if isinstance(shape, ModelConfig):
        config = shape
    elif shape in SHAPES:
        config = SHAPES[shape]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Decoder(config)
    finally:
        torch.set_default_dtype(before)
    model = model.to(dtype)  # the RoPE tables, made in float32, follow the weights
    init_dummy_weights(model, seed)
    model.eval().requires_grad_(False)
    return wrap_model(model, tokenizer=None)
