"""The prefill side of SUN: runs prompts through one task model's prefill module and hands back, per prompt, the
KV of every prompt position in every layer plus the first output token (sampled from the prefill module's logits)."""

from __future__ import annotations

import dataclasses

import torch

from sunray.engine.attention import get_backend
from sunray.engine.block_manager import BlockManager
from sunray.engine.config import EngineConfig
from sunray.engine.handoff import KVHandoff
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.model_runner import ModelRunner
from sunray.engine.output_processor import OutputProcessor
from sunray.engine.sampler import sample
from sunray.engine.sequence import RequestOutput, SamplingParams, Sequence, Status
from sunray.models.loader import LoadedModel

WARM_UP_LONG = 256  # the longest made-up prompt of PrefillEngine.warm_up, in tokens


class PromptError(ValueError):
    """A prompt the model cannot take (empty, too long for the context, token ids outside the vocabulary).
    `too_long` tells the context-length case apart (the OpenAI front answers it with its own error code)."""

    def __init__(self, message: str, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


@dataclasses.dataclass
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)


@dataclasses.dataclass
class PrefillResult:
    output: RequestOutput  # the first token (and its text)
    handoff: KVHandoff | None  # None when the request already finished at its first token


def validate_prompt(token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """The one set of prompt rules, applied where requests enter: the HTTP front (before any engine is touched)
    and the engines themselves."""
    if not token_ids:
        raise PromptError("the prompt is empty")
    if len(token_ids) >= max_model_len:
        raise PromptError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {len(token_ids)} "
            "tokens and leaves no room for output",
            too_long=True,
        )
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise PromptError(f"prompt token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


class PrefillEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, name: str = "default") -> None:
        self.lm, self.name = lm, name
        self.config = config or EngineConfig()
        self.max_model_len = self.config.context_length(lm.config)
        # A scratch pool: a batch's KV lives here only until it has been copied out into hand-offs.
        bs = self.config.block_size
        num_blocks = -(-(self.config.max_num_batched_tokens + self.max_model_len) // bs)
        self.kv_cache = PagedKVCache(lm.config, num_blocks, bs, lm.dtype, lm.device)
        self.blocks = BlockManager(num_blocks, bs)
        self.runner = ModelRunner(
            lm.model, self.kv_cache, get_backend(self.config.attention_backend, lm.device)
        )
        self.outputs = OutputProcessor.for_model(lm, self.max_model_len)

    def prefill(self, requests: list[PrefillRequest]) -> list[PrefillResult]:
        """Prefill all requests (in as many forward passes as the token budget needs), in their order."""
        for r in requests:
            validate_prompt(r.prompt_token_ids, self.lm.config.vocab_size, self.max_model_len)
        results: list[PrefillResult] = []
        batch: list[PrefillRequest] = []
        tokens = blocks = 0
        bs = self.config.block_size
        for r in requests:
            n = len(r.prompt_token_ids)
            # Whole blocks per sequence: many short prompts need more blocks than tokens / block_size.
            nb = -(-n // bs)
            too_many = tokens + n > self.config.max_num_batched_tokens or blocks + nb > self.blocks.num_blocks
            if batch and too_many:
                results += self._run(batch)
                batch, tokens, blocks = [], 0, 0
            batch.append(r)
            tokens += n
            blocks += nb
        if batch:
            results += self._run(batch)
        return results

    def warm_up(self) -> int:
        """Run a few made-up batches through the engine and drop their results; returns the tokens it ran.

        A replica's first prompts otherwise pay for what the first use of each kernel costs on a GPU (Triton's
        compiles of the fused ops, CUDA's lazy module loads, cuBLAS's first handles and workspaces): on an H100
        with the Llama-3.1-8B shape the first five 256-token prompts took 0.6-0.84 s to their first token against
        ~50 ms after (docs/results/serving-capacity.md). The batches cover one prompt, one of WARM_UP_LONG tokens,
        several of one length (SDPA's batched call) and of mixed lengths (one call each), greedy and sampled."""
        cap = min(self.max_model_len - 1, self.config.max_num_batched_tokens)
        long = min(WARM_UP_LONG, cap // 2)
        batches = [[17], [long], [long // 3] * 3, [long // 2, long // 5 + 1]]
        vocab = self.lm.config.vocab_size
        greedy = SamplingParams(max_tokens=2, temperature=0.0)
        sampled = SamplingParams(max_tokens=2, temperature=1.0, top_k=50, top_p=0.9, seed=0)
        ran = 0
        for b, lengths in enumerate(batches):
            requests = [
                PrefillRequest(
                    f"warm-up-{b}-{i}",
                    [(7 * j + 11 * i + 3) % vocab for j in range(max(1, min(n, cap)))],
                    greedy if i % 2 == 0 else sampled,
                )
                for i, n in enumerate(lengths)
            ]
            self.prefill(requests)
            ran += sum(len(r.prompt_token_ids) for r in requests)
        return ran

    def _run(self, batch: list[PrefillRequest]) -> list[PrefillResult]:
        seqs = [Sequence(r.request_id, list(r.prompt_token_ids), r.sampling, model=self.name) for r in batch]
        try:
            for seq in seqs:
                seq.block_table = self.blocks.allocate(seq.num_tokens)
                seq.status = Status.RUNNING
            logits = self.runner.prefill(seqs, [0] * len(seqs))
            results = []
            for seq, token in zip(seqs, sample(logits, seqs)):
                slots = torch.tensor(
                    self.kv_cache.slots(seq.block_table, 0, seq.num_tokens), device=self.lm.device
                )
                kv = self.kv_cache.read(slots)
                self.outputs.append(seq, token)
                out = self.outputs.take_output(seq)
                handoff = None if seq.finished else KVHandoff.from_sequence(seq, self.lm.fingerprint, kv)
                results.append(PrefillResult(out, handoff))
            return results
        finally:
            for seq in seqs:
                self.blocks.free(seq.block_table)
