"""Appending sampled tokens: incremental detokenization, stop conditions and what each step hands out."""

from __future__ import annotations

from sunray.engine.sequence import FinishReason, RequestOutput, Sequence, Status

# Prompt tokens decoded together with the output, so that a leading space or a multi-byte character that
# spans the boundary comes out as transformers' decode of the whole sequence would give it.
_CONTEXT_TOKENS = 5


def _decoder(tokenizer):
    """ids -> text, skipping special tokens, as `tokenizer.decode` gives it. Every running request decodes twice a
    token (incremental detokenization), so at a decode batch of 256 this is ~500 calls a step: for a fast tokenizer
    that does not clean up spaces afterwards, its Rust backend gives the same text in a third of the time (2.5
    against 7.4 us for the pair on the CPU machine), because the wrapper's decode only adds that clean-up."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...] | list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer  # None (dummy-weight benchmarks): token ids only, no text
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._decode_ids = _decoder(tokenizer)

    @classmethod
    def for_model(cls, lm, max_model_len: int) -> OutputProcessor:
        eos = lm.config.eos_token_ids
        if not eos and lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
            eos = (lm.tokenizer.eos_token_id,)
        return cls(lm.tokenizer, eos, max_model_len)

    def append(self, seq: Sequence, token: int) -> None:
        """Add one sampled token to `seq`, update its text and finish it if a stop condition holds."""
        seq.output_token_ids.append(token)
        p = seq.sampling
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish(seq, FinishReason.STOP)  # the stop token itself adds no text
            return
        delta = self._detokenize(seq)
        if delta:
            seq.text += delta
            if p.stop and self._cut_stop_string(seq, len(delta)):
                self.finish(seq, FinishReason.STOP)
                return
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, FinishReason.LENGTH)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def take_output(self, seq: Sequence) -> RequestOutput:
        """New tokens and text since the last call. While a request runs, the last `len(stop) - 1` characters stay
        back, so a stop string that arrives split over two tokens is never half sent."""
        end = len(seq.text)
        if not seq.finished and seq.sampling.stop:
            end = max(seq.emitted_chars, end - (max(map(len, seq.sampling.stop)) - 1))
        out = RequestOutput(
            request_id=seq.request_id,
            model=seq.model,
            new_token_ids=seq.output_token_ids[seq.emitted_tokens :],
            new_text=seq.text[seq.emitted_chars : end],
            finished=seq.finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
        )
        seq.emitted_tokens, seq.emitted_chars = len(seq.output_token_ids), end
        return out

    def _detokenize(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        ctx = seq.prompt_token_ids[-_CONTEXT_TOKENS:]
        ids = ctx + seq.output_token_ids
        prefix, read = seq.detok_offsets or (0, len(ctx))
        decode = self._decode_ids
        prefix_text = decode(ids[prefix:read])
        new_text = decode(ids[prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            seq.detok_offsets = (read, len(ids))
            return new_text[len(prefix_text) :]
        seq.detok_offsets = (prefix, read)
        return ""

    @staticmethod
    def _cut_stop_string(seq: Sequence, delta_len: int) -> bool:
        text = seq.text
        hits = [
            i
            for stop in seq.sampling.stop
            if (i := text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))) != -1
        ]
        if hits:
            seq.text = text[: min(hits)]  # cut at the earliest stop string, whichever of them it is
        return bool(hits)
