"""Paged KV storage: fixed-size blocks of `block_size` token slots per layer.

Slot `s` lives in block `s // block_size` at offset `s % block_size`; a sequence's block table lists its blocks in
order, so token position `p` of a sequence sits in slot `block_table[p // bs] * bs + p % bs`.
"""

from __future__ import annotations

import torch

from sunray.models.config import ModelConfig


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_layers, self.num_kv_heads, self.head_dim = (
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
        )
        self.dtype, self.device = dtype, torch.device(device)
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def num_blocks_for_budget(
        config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
    ) -> int:
        return max(1, budget_bytes // (config.kv_bytes_per_token(dtype) * block_size))

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer as [num_slots, kv_heads, head_dim]."""
        n = self.num_blocks * self.block_size
        return self.k[layer].view(n, self.num_kv_heads, self.head_dim), self.v[layer].view(
            n, self.num_kv_heads, self.head_dim
        )

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """KV of the given slots, all layers: [layers, 2, len(slots), kv_heads, head_dim]."""
        n = self.num_blocks * self.block_size
        k = self.k.view(self.num_layers, n, self.num_kv_heads, self.head_dim).index_select(1, slots)
        v = self.v.view(self.num_layers, n, self.num_kv_heads, self.head_dim).index_select(1, slots)
        return torch.stack((k, v), dim=1)

    def write(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """The inverse of `read`: kv is [layers, 2, len(slots), kv_heads, head_dim]."""
        n = self.num_blocks * self.block_size
        kv = kv.to(device=self.device, dtype=self.dtype)
        self.k.view(self.num_layers, n, self.num_kv_heads, self.head_dim).index_copy_(1, slots, kv[:, 0])
        self.v.view(self.num_layers, n, self.num_kv_heads, self.head_dim).index_copy_(1, slots, kv[:, 1])
