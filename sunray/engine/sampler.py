"""Per-request sampling: greedy, temperature, top-k, top-p and seeds, on one batch of logits."""

from __future__ import annotations

import torch

from sunray.engine.sequence import Sequence

_GOLDEN = 0x9E3779B97F4A7C15


def token_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, which output token): the same seed gives the same tokens whether a
    request was decoded alone, in a batch, or after a hand-off from prefill to decode."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * _GOLDEN + output_index + 1) % (2**63 - 1))
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of float32 logits; returns a filtered copy."""
    row = logits / temperature
    if 0 < top_k < row.shape[-1]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return row


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` ([len(seqs), vocab]) under each sequence's own sampling parameters."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.sampling
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
        gen = None if p.seed is None else token_generator(p.seed, len(seq.output_token_ids), logits.device)
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens
