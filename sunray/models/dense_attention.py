"""A differentiable dense attention backend for passes over right-padded batches: the training passes of
`sunray.sun` and AWQ's calibration (`sunray.models.quant.awq`) run the very `Decoder` the engine serves with.

It implements `sunray.models.attention.AttentionBackend` for its own context, `TrainContext`, as the engine's
backends do for `StepContext`. The flat token batch of a pass is `B` rows of `L` tokens (row-major, right padded).
Two kinds of pass:

- `TrainContext.causal(...)`: every row attends causally to itself (a prompt, or prompt + response for full FT).
  With `record=True` each layer's keys and values are kept, with their autograd history: the prompt KV that the
  prefill module hands to the decode module.
- `TrainContext.continuation(...)`: every row (teacher-forced response tokens) attends to the recorded prompt KV of
  its example (the first `prefix_lens[b]` positions) and causally to itself. This is the decode module's view in
  SUN: prompt KV written by P, later KV written by D itself.

Right padding keeps real tokens from ever seeing padding: a pad sits after every real token of its row.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def _heads_first(x: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """[rows * length, heads, dim] -> [rows, heads, length, dim]"""
    return x.view(rows, length, x.shape[1], x.shape[2]).transpose(1, 2)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: repeat each KV head for its query heads (lets SDPA pick its fused kernels)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class DenseTrainAttention:
    """`AttentionBackend[TrainContext]`: SDPA over the rows of a pass (no KV cache; keys and values keep autograd)."""

    name = "train-dense"

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: TrainContext
    ) -> torch.Tensor:
        b, n = ctx.rows, ctx.length
        q, k, v = _heads_first(q, b, n), _heads_first(k, b, n), _heads_first(v, b, n)
        groups = q.shape[1] // k.shape[1]
        if ctx.prefix is None:
            if ctx.record is not None:
                ctx.record[layer] = (k, v)
            out = F.scaled_dot_product_attention(
                q, _expand_kv(k, groups), _expand_kv(v, groups), is_causal=True, scale=scale
            )
        else:
            pk, pv = ctx.prefix[layer]
            keys = torch.cat((pk.to(k.dtype), k), dim=2)
            values = torch.cat((pv.to(v.dtype), v), dim=2)
            out = F.scaled_dot_product_attention(
                q, _expand_kv(keys, groups), _expand_kv(values, groups), attn_mask=ctx.mask, scale=scale
            )
        return out.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[3])


BACKEND = DenseTrainAttention()


@dataclasses.dataclass
class TrainContext:
    """The per-pass context that `Decoder.forward` hands to the attention backend (`ctx.backend`)."""

    backend: DenseTrainAttention
    rows: int
    length: int
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    mask: torch.Tensor | None = None  # [rows, 1, length, prefix_len + length] for continuation passes

    @classmethod
    def causal(cls, rows: int, length: int, record: bool = False) -> TrainContext:
        return cls(BACKEND, rows, length, record={} if record else None)

    @classmethod
    def continuation(
        cls,
        prefix: dict[int, tuple[torch.Tensor, torch.Tensor]],
        prefix_lens: torch.Tensor,
        rows: int,
        length: int,
    ) -> TrainContext:
        prefix_len = next(iter(prefix.values()))[0].shape[2]
        device = prefix_lens.device
        in_prompt = torch.arange(prefix_len, device=device)[None, :] < prefix_lens[:, None]  # [rows, Lp]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [L, L]
        mask = torch.cat(
            (
                in_prompt[:, None, :].expand(rows, length, prefix_len),
                causal[None].expand(rows, length, length),
            ),
            dim=2,
        )
        return cls(BACKEND, rows, length, prefix=prefix, mask=mask[:, None])


def positions(
    rows: int, length: int, start: torch.Tensor | None = None, limit: int | None = None
) -> torch.Tensor:
    """Flat positions of a [rows, length] pass: 0.. per row, or start[b].. per row; capped at limit - 1."""
    device = start.device if start is not None else None
    pos = torch.arange(length, device=device)[None, :].expand(rows, length)
    if start is not None:
        pos = pos + start[:, None]
    if limit is not None:
        pos = pos.clamp(max=limit - 1)  # only padding can run past the limit
    return pos.reshape(-1)
