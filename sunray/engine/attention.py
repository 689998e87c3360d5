"""Attention backends: one interface, several implementations.

- `torch`: the reference (gathers each sequence's paged KV, runs SDPA); correct everywhere, not fast.
- `triton`: paged decode attention as a Triton kernel (split-K, GQA-aware; `triton_attention.py`), KV stored by a
  Triton kernel, prefill without a cached prefix through SDPA's flash kernel. It can be captured in a CUDA graph.
  On CPU tensors it is the torch reference.
- `auto`: `triton` where CUDA and Triton are present, else `torch`.

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
    # context_lens on the host, when the caller has it: lets prefill pick its path without a device sync
    context_lens_host: list[int] | None = None


class AttentionBackend(abc.ABC):
    name: str
    # True if a decode step through this backend can be captured in a CUDA graph: no host syncs, no shapes that
    # depend on the data, and padded rows (slot -1, context length 0) are harmless.
    supports_cuda_graphs: bool = False

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
        self._store(layer, k, v, ctx)
        if ctx.is_prefill:
            return self._prefill(layer, q, k, v, scale, ctx)
        return self._decode(layer, q, scale, ctx)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        k_cache, v_cache = ctx.kv_cache.flat(layer)
        k_cache.index_copy_(0, ctx.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, ctx.slot_mapping, v.to(v_cache.dtype))

    def _gather(
        self, layer: int, ctx: StepContext, rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[seqs, max_blocks * block_size, kv_heads, dim] keys and values of the sequences in `rows`."""
        cache = ctx.kv_cache
        tables = ctx.block_tables if rows is None else ctx.block_tables[rows]
        k = cache.k[layer][tables].flatten(1, 2)
        v = cache.v[layer][tables].flatten(1, 2)
        return k, v

    def _prefill(self, layer, q, k, v, scale, ctx):
        out = torch.empty_like(q)
        start = 0
        lens = ctx.context_lens_host if ctx.context_lens_host is not None else ctx.context_lens.tolist()
        for i, n in enumerate(ctx.query_lens):
            ctx_len = int(lens[i])
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


class TritonPagedAttention(TorchAttention):
    """Triton kernels on CUDA (see `triton_attention.py`); the torch reference on other devices."""

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, num_splits: int | None = None) -> None:
        from sunray.engine import triton_attention

        self.kernels = triton_attention
        self.num_splits = num_splits  # None: chosen from the batch size (split-K for small batches)

    def forward(self, layer, q, k, v, scale, ctx):
        kernels = self.kernels
        if not kernels.supported(q):
            return super().forward(layer, q, k, v, scale, ctx)
        k_cache, v_cache = ctx.kv_cache.k[layer], ctx.kv_cache.v[layer]
        kernels.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        if not ctx.is_prefill:
            return kernels.paged_decode_attention(
                q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, self.num_splits
            )
        lens = ctx.context_lens_host
        if lens is not None and all(c == n for c, n in zip(lens, ctx.query_lens)):
            return self._prefill_new_tokens(q, k, v, scale, ctx.query_lens)
        return self._prefill(layer, q, k, v, scale, ctx)  # a cached prefix: the reference gather path

    @staticmethod
    def _prefill_new_tokens(q, k, v, scale, query_lens: list[int]) -> torch.Tensor:
        """Causal attention of each sequence's new tokens to themselves (no cached prefix): SDPA's flash kernel,
        one call for all sequences when they have the same length."""
        if len(set(query_lens)) == 1:
            b, n = len(query_lens), query_lens[0]
            out = F.scaled_dot_product_attention(
                q.view(b, n, *q.shape[1:]).transpose(1, 2),
                k.view(b, n, *k.shape[1:]).transpose(1, 2),
                v.reshape(b, n, *v.shape[1:]).transpose(1, 2),
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
            return out.transpose(1, 2).reshape(q.shape)
        out = torch.empty_like(q)
        start = 0
        for n in query_lens:
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1),
                k[sl].transpose(0, 1),
                v[sl].transpose(0, 1),
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
            out[sl] = o.transpose(0, 1)
            start += n
        return out


BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttention, "triton": TritonPagedAttention}


def auto_backend_name(device: torch.device | str | None = None) -> str:
    """`triton` for a CUDA device (default: where CUDA is present) when Triton is installed, else `torch`."""
    from sunray.engine import triton_attention

    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "triton" if triton_attention.HAS_TRITON and on_gpu else "torch"


def get_backend(name: str, device: torch.device | str | None = None) -> AttentionBackend:
    """The backend called `name`; "auto" picks by `device` (auto_backend_name)."""
    if name == "auto":
        name = auto_backend_name(device)
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: auto, {', '.join(BACKENDS)}"
        ) from None
    return cls()
