"""What the decoder asks of attention: the one interface every attention backend implements.

`Decoder.forward(input_ids, positions, ctx)` hands `ctx` down to every attention layer, which calls
`ctx.backend.forward(layer, q, k, v, scale, ctx)`: the backend stores the layer's new keys and values wherever
its kind of context says and returns the attention output. A context carries the backend that reads it, so each
backend is typed for its own context and never has to narrow one it was not written for:
- the engine's backends (`sunray.engine.attention`: torch, triton) take a `StepContext` (a paged KV cache, block
  tables, slots);
- the dense backend (`sunray.models.dense_attention`) takes a `TrainContext` (right-padded rows of a training or
  calibration pass, with recorded prompt KV).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from typing_extensions import Self

Ctx = TypeVar("Ctx", contravariant=True)


class AttentionBackend(Protocol[Ctx]):
    name: str

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: Ctx
    ) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim]."""
        ...


class AttentionContext(Protocol):
    """The per-pass context of a forward pass: whatever it holds, it names the backend that understands it."""

    @property
    def backend(self) -> AttentionBackend[Self]: ...
