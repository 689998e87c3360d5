"""Named model shapes for benchmarks with dummy weights (no checkpoint needed)."""

from __future__ import annotations

import torch

from sunray.models.config import ModelConfig
from sunray.models.decoder import Decoder
from sunray.models.loader import LoadedModel, init_dummy_weights, wrap_model

SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        eos_token_ids=(128001, 128008, 128009), bos_token_id=128000,
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        eos_token_ids=(2,), bos_token_id=1,
    ),
}  # fmt: skip


def dummy_model(shape: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> LoadedModel:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    config = SHAPES[shape]
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    with torch.device(device):
        model = Decoder(config).to(dtype)
    init_dummy_weights(model, seed)
    model.eval().requires_grad_(False)
    return wrap_model(model, tokenizer=None)
