"""Examples to token ids and padded training batches.

The prompt is encoded exactly as the engine sees it at serving time (`prompt_token_ids`: the chat template with the
generation prompt when the tokenizer has one), and the response is the reference reply followed by the end-of-turn
token, so that a trained model learns to stop where the engine's stop condition looks.
"""

from __future__ import annotations

import dataclasses

import torch

from sunray.sun.tasks.base import Example


def eos_token_id(lm_config, tokenizer) -> int:
    """The token that ends a reply: the model's first eos id, else the tokenizer's."""
    if lm_config.eos_token_ids:
        return lm_config.eos_token_ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the model has no end-of-sequence token; SUN training needs one to end replies")
    return tokenizer.eos_token_id


def prompt_token_ids(tokenizer, example: Example) -> list[int]:
    """The prompt as the engine gets it: the chat template (with the generation prompt) when there is one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            example.chat(), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    if example.messages is not None:
        raise ValueError("chat data (messages) needs a tokenizer with a chat template")
    return tokenizer.encode(example.prompt + "\n", add_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]  # the reply's tokens plus the end-of-turn token


def encode_examples(
    examples: list[Example], tokenizer, eos_id: int, max_prompt_len: int, max_response_len: int
) -> tuple[list[Encoded], int]:
    """Encode examples; those whose prompt or response exceeds the limits are dropped. Returns (kept, dropped)."""
    kept: list[Encoded] = []
    dropped = 0
    for ex in examples:
        p = prompt_token_ids(tokenizer, ex)
        r = tokenizer.encode(ex.response, add_special_tokens=False) + [eos_id]
        if len(p) > max_prompt_len or len(r) > max_response_len or not p:
            dropped += 1
            continue
        kept.append(Encoded(p, r))
    return kept, dropped


@dataclasses.dataclass
class Batch:
    """Right-padded prompts and responses. Padding is never attended to by a real token and never scored."""

    prompt_ids: torch.Tensor  # [B, Lp]
    prompt_lens: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, Lr]
    response_lens: torch.Tensor  # [B] (>= 1: at least the end-of-turn token)

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_lens.sum() + self.response_lens.sum())

    @property
    def num_target_tokens(self) -> int:
        return int(self.response_lens.sum())


def collate(items: list[Encoded], device: torch.device | str = "cpu", pad_id: int = 0) -> Batch:
    lp = max(len(e.prompt_ids) for e in items)
    lr = max(len(e.response_ids) for e in items)
    p = torch.full((len(items), lp), pad_id, dtype=torch.long)
    r = torch.full((len(items), lr), pad_id, dtype=torch.long)
    for i, e in enumerate(items):
        p[i, : len(e.prompt_ids)] = torch.tensor(e.prompt_ids)
        r[i, : len(e.response_ids)] = torch.tensor(e.response_ids)
    return Batch(
        prompt_ids=p.to(device),
        prompt_lens=torch.tensor([len(e.prompt_ids) for e in items], device=device),
        response_ids=r.to(device),
        response_lens=torch.tensor([len(e.response_ids) for e in items], device=device),
    )
