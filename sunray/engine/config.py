"""Engine settings, validated once."""

from __future__ import annotations

import dataclasses

from sunray.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 64  # decode batch limit
    max_num_batched_tokens: int = 2048  # prefill tokens per forward pass
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    attention_backend: str = "auto"  # auto: triton on CUDA (with CUDA graphs for decode), torch elsewhere
    # Decode: launch step n + 1 before the host reads step n's tokens, so that sampling bookkeeping, stop checks
    # and detokenization run while the device computes (DecodeEngine.step). Same tokens either way.
    overlap_steps: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"EngineConfig.num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")

    def context_length(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        return min(self.max_model_len, limit) if self.max_model_len else min(limit, 8192)
