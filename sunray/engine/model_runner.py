"""Turns a list of sequences into one forward pass: builds the flat inputs and the step context, runs the model,
returns the logits of each sequence's last position."""

from __future__ import annotations

import torch

from sunray.engine.attention import AttentionBackend, StepContext
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.sequence import Sequence
from sunray.models.decoder import Decoder


class ModelRunner:
    def __init__(self, model: Decoder, kv_cache: PagedKVCache, backend: AttentionBackend) -> None:
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.device = kv_cache.device

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], starts: list[int]) -> torch.Tensor:
        """Run tokens [start, num_tokens) of each sequence; KV of [0, start) must already be in its blocks."""
        ids, positions, slots, query_lens = [], [], [], []
        for seq, start in zip(seqs, starts):
            end = seq.num_tokens
            ids += seq.all_token_ids()[start:end]
            positions += range(start, end)
            slots += self.kv_cache.slots(seq.block_table, start, end)
            query_lens.append(end - start)
        ctx = StepContext(
            backend=self.backend,
            kv_cache=self.kv_cache,
            is_prefill=True,
            slot_mapping=self._tensor(slots),
            context_lens=self._tensor([s.num_tokens for s in seqs]),
            block_tables=self._block_tables(seqs),
            query_lens=query_lens,
        )
        hidden = self.model(self._tensor(ids), self._tensor(positions), ctx)
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[last])

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per sequence: the newest token, whose KV is written now at position num_tokens - 1."""
        positions = [s.num_tokens - 1 for s in seqs]
        bs = self.kv_cache.block_size
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        ctx = StepContext(
            backend=self.backend,
            kv_cache=self.kv_cache,
            is_prefill=False,
            slot_mapping=self._tensor(slots),
            context_lens=self._tensor([s.num_tokens for s in seqs]),
            block_tables=self._block_tables(seqs),
            query_lens=[1] * len(seqs),
        )
        hidden = self.model(self._tensor([s.last_token for s in seqs]), self._tensor(positions), ctx)
        return self.model.compute_logits(hidden)
