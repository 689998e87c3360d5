"""The KV hand-off in memory: what a prefill engine gives a decode engine for one request.

A `KVHandoff` is the prompt KV written by a prefill module (`[layers, 2, tokens, kv_heads, head_dim]`), the
fingerprint of the decode module it was written for, the token ids so far (prompt and at least the first output
token), the sampling parameters and the detokenizer state. The engines produce and consume it in one process;
how it travels between processes (its wire format, the transports) is `sunray.kv`'s business, one layer up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from sunray.engine.sequence import SamplingParams, Sequence
from sunray.models.fingerprint import Fingerprint


class KVHandoffError(ValueError):
    """KV that a decode worker must not use: another base, another shape or dtype, or a damaged message."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class KVHandoff:
    request_id: str
    model: str  # the task model whose prefill module wrote this KV
    fingerprint: Fingerprint
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # at least the first token; the KV covers prompt + output[:-1]
    sampling: SamplingParams
    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim]
    text: str = ""
    detok_offsets: tuple[int, int] | None = None

    @property
    def num_kv_tokens(self) -> int:
        return self.kv.shape[2]

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def __post_init__(self) -> None:
        expected = len(self.prompt_token_ids) + len(self.output_token_ids) - 1
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise KVHandoffError(
                f"KV must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(self.kv.shape)}"
            )
        if not self.output_token_ids:
            raise KVHandoffError("a hand-off needs the first output token")
        if self.kv.shape[2] != expected:
            raise KVHandoffError(f"KV holds {self.kv.shape[2]} tokens, the token ids say {expected}")

    @classmethod
    def from_sequence(cls, seq: Sequence, fingerprint: Fingerprint, kv: torch.Tensor) -> KVHandoff:
        return cls(
            request_id=seq.request_id,
            model=seq.model,
            fingerprint=fingerprint,
            prompt_token_ids=list(seq.prompt_token_ids),
            output_token_ids=list(seq.output_token_ids),
            sampling=seq.sampling,
            kv=kv,
            text=seq.text,
            detok_offsets=seq.detok_offsets,
        )

    def to_sequence(self) -> Sequence:
        """The request as the decode side continues it; text already handed out is not sent again."""
        seq = Sequence(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            sampling=self.sampling,
            model=self.model,
            output_token_ids=list(self.output_token_ids),
            text=self.text,
            detok_offsets=self.detok_offsets,
        )
        seq.emitted_tokens, seq.emitted_chars = len(seq.output_token_ids), len(seq.text)
        return seq


class HandoffTransport(Protocol):
    """How a hand-off gets from a prefill engine to a decode engine. `sunray.kv.transport.KVTransport` and its
    backends implement it; in one process the hand-off itself can pass (`DirectTransport`)."""

    def send(self, handoff: KVHandoff) -> Any:
        """Make the hand-off available to a receiver; returns what the receiver needs to fetch it."""

    def receive(self, ref: Any) -> KVHandoff:
        """The hand-off that `send` published."""


class DirectTransport:
    """Prefill and decode in one process: the hand-off object itself passes, nothing is copied."""

    def send(self, handoff: KVHandoff) -> KVHandoff:
        return handoff

    def receive(self, ref: KVHandoff) -> KVHandoff:
        return ref
