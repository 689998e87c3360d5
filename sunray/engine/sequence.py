"""A request's state as it moves through prefill and decode."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

MAX_STOP_STRINGS = 16
MAX_SEED = 1 << 63


class SamplingError(ValueError):
    """A sampling parameter out of its range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 means greedy. The one place their ranges are checked: the
    HTTP front builds this and answers SamplingError with a 400 naming the parameter; it travels as it is."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists from JSON or msgpack, keep tuples so the object stays hashable and frozen.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        checks = (
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            (
                "temperature",
                _is_number(self.temperature) and 0.0 <= self.temperature <= 2.0,
                "a number in [0, 2]",
            ),
            ("top_p", _is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("seed", self.seed is None or (_is_int(self.seed) and self.seed >= 0), "a non-negative integer"),
            ("seed", self.seed is None or not _is_int(self.seed) or self.seed < MAX_SEED, "below 2^63"),
            (
                "stop",
                len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop),
                f"at most {MAX_STOP_STRINGS} non-empty strings",
            ),
            (
                "stop_token_ids",
                all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                "non-negative integers",
            ),
        )
        for param, ok, what in checks:
            if not ok:
                raise SamplingError(param, f"{param} must be {what}, got {getattr(self, param)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop_token_ids"], d["stop"] = list(self.stop_token_ids), list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(**d)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclasses.dataclass(eq=False)  # identity, not field-by-field: `seq in running` must stay O(1) per element
class Sequence:
    """One request. Its KV covers `prompt + output[:-1]`: the newest token's KV is written by the next step."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    model: str = "default"
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    text: str = ""  # detokenized output so far (stop strings cut off)
    emitted_chars: int = 0  # how much of `text` was already handed to the caller
    emitted_tokens: int = 0
    # Incremental detokenization state (prefix, read) over `prompt[-5:] + output`; travels with the KV hand-off.
    detok_offsets: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


@dataclasses.dataclass
class RequestOutput:
    """What one step tells the caller about one request: the new tokens and text since the last output."""

    request_id: str
    model: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
