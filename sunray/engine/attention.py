"""Attention backends: one interface, several implementations (a torch reference now, GPU kernels later).

A backend receives each layer's new q/k/v for a flat batch of tokens, stores k/v where the step context says and
returns the attention output. Two shapes of step exist:
- prefill: each sequence brings `query_len` new tokens that attend causally to themselves and to the sequence's
  tokens already in the cache;
- decode: each sequence brings exactly one token that attends to its whole context.
"""

from __future__ import annotations

import abc
import dataclasses

import torch
import torch.nn.functional as F

from sunray.engine.kv_cache import PagedKVCache


@dataclasses.dataclass
class StepContext:
    """Everything a forward pass needs to know about where keys and values live (one per step)."""

    backend: AttentionBackend
    kv_cache: PagedKVCache
    is_prefill: bool
    slot_mapping: torch.Tensor  # [tokens] cache slot of each new token
    context_lens: torch.Tensor  # [seqs] tokens in the cache for each sequence after this step
    block_tables: torch.Tensor  # [seqs, max_blocks] padded with 0
    query_lens: list[int]  # new tokens per sequence (all 1 for decode)


class AttentionBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: StepContext
    ) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim]."""


class TorchAttention(AttentionBackend):
    """Reference backend in plain torch: gathers each sequence's KV from the paged cache and runs SDPA.

    Correct on every device and the yardstick for the GPU kernels; not fast.
    """

    name = "torch"

    def forward(self, layer, q, k, v, scale, ctx):
        k_cache, v_cache = ctx.kv_cache.flat(layer)
        k_cache.index_copy_(0, ctx.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, ctx.slot_mapping, v.to(v_cache.dtype))
        if ctx.is_prefill:
            return self._prefill(layer, q, k, v, scale, ctx)
        return self._decode(layer, q, scale, ctx)

    def _gather(self, layer: int, ctx: StepContext, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[seqs, max_blocks * block_size, kv_heads, dim] keys and values of the sequences in `rows`."""
        cache = ctx.kv_cache
        tables = ctx.block_tables if rows is None else ctx.block_tables[rows]
        k = cache.k[layer][tables].flatten(1, 2)
        v = cache.v[layer][tables].flatten(1, 2)
        return k, v

    def _prefill(self, layer, q, k, v, scale, ctx):
        out = torch.empty_like(q)
        start = 0
        for i, n in enumerate(ctx.query_lens):
            ctx_len = int(ctx.context_lens[i])
            qi = q[start : start + n].transpose(0, 1)  # [heads, n, dim]
            if ctx_len == n:  # no cached prefix: attend to the new tokens only
                ki, vi = k[start : start + n], v[start : start + n]
                mask, causal = None, True
            else:
                kc, vc = self._gather(layer, ctx, slice(i, i + 1))
                ki, vi = kc[0, :ctx_len], vc[0, :ctx_len]
                q_pos = torch.arange(ctx_len - n, ctx_len, device=q.device)
                mask = q_pos[:, None] >= torch.arange(ctx_len, device=q.device)[None, :]
                causal = False
            oi = F.scaled_dot_product_attention(
                qi,
                ki.transpose(0, 1).to(q.dtype),
                vi.transpose(0, 1).to(q.dtype),
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=True,
            )
            out[start : start + n] = oi.transpose(0, 1)
            start += n
        return out

    def _decode(self, layer, q, scale, ctx):
        k, v = self._gather(layer, ctx)  # [seqs, slots, kv_heads, dim]
        valid = torch.arange(k.shape[1], device=q.device)[None, :] < ctx.context_lens[:, None]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [seqs, heads, 1, dim]
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        return out.squeeze(2)


BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttention}


def get_backend(name: str) -> AttentionBackend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}") from None
