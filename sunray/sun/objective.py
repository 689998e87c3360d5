"""Training objectives on a `Batch`: the SUN loss and full fine-tuning's causal-LM loss.

SUN (docs/sun-training.md, "What is trained"): response token 1 is predicted by the prefill module P at the last
prompt position; tokens 2..n by the frozen decode module D under teacher forcing, attending to P's prompt KV and to
its own KV of the response tokens. D's weights take no gradient, but the loss reaches P through the prompt KV that D
attends to.

Full FT: one model, causal LM over prompt + response, loss on the response tokens. (It equals the SUN loss with D = P
trainable; computing it in one pass is cheaper.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sunray.models.decoder import Decoder
from sunray.models.dense_attention import TrainContext, positions
from sunray.sun.data import Batch


@dataclasses.dataclass
class LossParts:
    """Summed cross-entropies (nats) and their token counts; `loss` is the mean over all response tokens."""

    first_sum: torch.Tensor  # response token 1 (P's logits for SUN)
    rest_sum: torch.Tensor  # tokens 2..n (D's logits for SUN)
    num_first: int
    num_rest: int

    @property
    def loss(self) -> torch.Tensor:
        return (self.first_sum + self.rest_sum) / max(1, self.num_first + self.num_rest)

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "first_token_loss": float(self.first_sum.detach()) / max(1, self.num_first),
            "rest_loss": float(self.rest_sum.detach()) / max(1, self.num_rest),
            "tokens": self.num_first + self.num_rest,
        }


def _ce_sum(model: Decoder, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    logits = model.compute_logits(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def sun_loss(prefill: Decoder, decode: Decoder, batch: Batch) -> LossParts:
    """The SUN loss of `batch` for prefill module `prefill` against the (frozen) decode module `decode`."""
    b, lp = batch.prompt_ids.shape
    lr = batch.response_ids.shape[1]
    limit = prefill.config.max_position_embeddings
    # P over the prompts, recording every layer's KV.
    ctx_p = TrainContext.causal(b, lp, record=True)
    hp = prefill(batch.prompt_ids.reshape(-1), positions(b, lp, limit=limit), ctx_p).view(b, lp, -1)
    rows = torch.arange(b, device=hp.device)
    first = _ce_sum(prefill, hp[rows, batch.prompt_lens - 1], batch.response_ids[:, 0])
    # D over response tokens 1..n-1 (teacher forcing), predicting tokens 2..n, attending to P's prompt KV.
    n = lr - 1
    if n == 0:
        rest = first * 0.0
        return LossParts(first, rest, b, 0)
    ctx_d = TrainContext.continuation(ctx_p.record, batch.prompt_lens, b, n)
    pos = positions(b, n, start=batch.prompt_lens, limit=limit)
    hd = decode(batch.response_ids[:, :-1].reshape(-1), pos, ctx_d).view(b, n, -1)
    valid = torch.arange(n, device=hd.device)[None, :] < (batch.response_lens[:, None] - 1)  # [B, n]
    rest = _ce_sum(decode, hd[valid], batch.response_ids[:, 1:][valid])
    return LossParts(first, rest, b, int(valid.sum()))


def causal_lm_loss(model: Decoder, batch: Batch) -> LossParts:
    """Full fine-tuning's loss: one causal pass over prompt + response, scored on the response tokens."""
    b = batch.size
    lp, lr = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    length = lp + lr
    # Concatenate each row's prompt and response without the prompt's padding in between.
    ids = torch.zeros(b, length, dtype=torch.long, device=batch.prompt_ids.device)
    col = torch.arange(length, device=ids.device)[None, :].expand(b, length)
    in_prompt = col < batch.prompt_lens[:, None]
    in_resp = (col >= batch.prompt_lens[:, None]) & (col < (batch.prompt_lens + batch.response_lens)[:, None])
    ids[in_prompt] = batch.prompt_ids[
        torch.arange(lp, device=ids.device)[None, :] < batch.prompt_lens[:, None]
    ]
    ids[in_resp] = batch.response_ids[
        torch.arange(lr, device=ids.device)[None, :] < batch.response_lens[:, None]
    ]
    ctx = TrainContext.causal(b, length)
    h = model(ids.reshape(-1), positions(b, length, limit=model.config.max_position_embeddings), ctx).view(
        b, length, -1
    )
    # Position t predicts token t + 1: the response tokens sit at [plen, plen + rlen), predicted from one earlier.
    first_pos = batch.prompt_lens - 1
    rows = torch.arange(b, device=h.device)
    first = _ce_sum(model, h[rows, first_pos], batch.response_ids[:, 0])
    pred = (col >= batch.prompt_lens[:, None]) & (
        col < (batch.prompt_lens + batch.response_lens - 1)[:, None]
    )
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    rest = _ce_sum(model, h[pred], targets[pred])
    return LossParts(first, rest, b, int(pred.sum()))
