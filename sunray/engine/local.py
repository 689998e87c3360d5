"""SUN in one process, without Ray: a prefill engine per task model, one shared decode engine.

This is what the CLI runs and what the engine tests drive; the serving layer puts the same two engines in
separate actors and moves the hand-off between them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.handoff import DirectTransport, HandoffTransport
from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest, validate_prompt
from sunray.engine.sequence import RequestOutput, SamplingParams
from sunray.models.loader import LoadedModel


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a plain prompt, or of a single user turn under the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; drop --chat to send a plain prompt")
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
    return tokenizer.encode(prompt, add_special_tokens=True)


@dataclasses.dataclass
class Completion:
    request_id: str
    model: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int


class LocalSUN:
    def __init__(
        self,
        decode_module: LoadedModel,
        prefill_modules: dict[str, LoadedModel],
        config: EngineConfig | None = None,
        transport: HandoffTransport | None = None,
    ) -> None:
        if not prefill_modules:
            raise ValueError("at least one prefill module is needed")
        self.config = config or EngineConfig()
        self.decode = DecodeEngine(decode_module, self.config)
        self.prefill: dict[str, PrefillEngine] = {}
        for name, lm in prefill_modules.items():
            self.add_model(name, lm)
        # Any sunray.kv transport may carry the hand-off (tests pass the bytes one); by default it passes as is.
        self.transport = transport or DirectTransport()
        self._pending: dict[str, list[PrefillRequest]] = {}
        self._aborted: list[RequestOutput] = []  # aborted before prefill; reported by the next step
        self._ids = itertools.count()

    def add_model(self, name: str, lm: LoadedModel) -> None:
        """Register a task model; its prefill module must write KV for this decode module."""
        if lm.fingerprint != self.decode.lm.fingerprint:
            diff = "; ".join(lm.fingerprint.differences(self.decode.lm.fingerprint))
            raise ValueError(
                f"prefill module {name!r} was built for another base than the decode module ({diff})"
            )
        self.prefill[name] = PrefillEngine(lm, self.config, name=name)

    @property
    def tokenizer(self):
        return self.decode.lm.tokenizer

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        model: str | None = None,
        request_id: str | None = None,
    ) -> str:
        model = model or next(iter(self.prefill))
        if model not in self.prefill:
            raise KeyError(f"unknown model {model!r}; loaded: {', '.join(self.prefill)}")
        # Refuse here what step() could not take (bad prompt, too big, duplicate id): there it would fail the
        # whole batch of pending requests.
        engine = self.prefill[model]
        validate_prompt(list(prompt_token_ids), engine.lm.config.vocab_size, engine.max_model_len)
        request_id = request_id or f"req-{next(self._ids)}"
        if self.decode.has_request(request_id) or any(
            r.request_id == request_id for reqs in self._pending.values() for r in reqs
        ):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.decode.check_capacity(request_id, len(prompt_token_ids), sampling.max_tokens)
        self._pending.setdefault(model, []).append(
            PrefillRequest(request_id, list(prompt_token_ids), sampling)
        )
        return request_id

    def abort(self, request_id: str) -> bool:
        for model, reqs in self._pending.items():
            for r in reqs:
                if r.request_id == request_id:
                    reqs.remove(r)
                    self._aborted.append(
                        RequestOutput(request_id, model, [], "", True, "abort", len(r.prompt_token_ids), 0)
                    )
                    return True
        return self.decode.abort(request_id)

    def step(self) -> list[RequestOutput]:
        """Prefill what arrived (per model), hand the KV to the decode engine, run one decode step."""
        outputs, self._aborted = self._aborted, []
        pending, self._pending = self._pending, {}
        for model, reqs in pending.items():
            for result in self.prefill[model].prefill(reqs):
                outputs.append(result.output)
                if result.handoff is not None:
                    self.decode.add(self.transport.receive(self.transport.send(result.handoff)))
        return outputs + self.decode.step()

    def has_unfinished(self) -> bool:
        return bool(self._pending or self._aborted) or self.decode.has_unfinished()

    def stream(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams | list[SamplingParams],
        model: str | list[str] | None = None,
    ) -> list[Completion]:
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling] * n
        models = model if isinstance(model, list) else [model] * n
        ids = [self.add_request(p, s, m) for p, s, m in zip(prompts, samplings, models)]
        done: dict[str, Completion] = {
            rid: Completion(rid, m or "", [], "", None, len(p)) for rid, p, m in zip(ids, prompts, models)
        }
        for out in self.stream():
            c = done[out.request_id]
            c.model = out.model
            c.token_ids += out.new_token_ids
            c.text += out.new_text
            c.finish_reason = out.finish_reason
        return [done[rid] for rid in ids]
