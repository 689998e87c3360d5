"""Workload generation: pure and seeded. No I/O except reading a dataset file; no HTTP, no clock.

A workload is a list of `RequestSpec`s: when to send (seconds from the start; 0 for closed loop), to which model,
how long the prompt is and how many tokens to ask for. The load generator turns a spec into an HTTP request; the
simulator consumes the same specs, so a simulated and a live run can share one workload.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

ARRIVALS = ("poisson", "gamma", "constant")
LENGTH_KINDS = ("fixed", "uniform")


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    index: int
    arrival_s: float  # when to send, seconds after the start of the run (0 for closed loop)
    model: str
    prompt_len: int  # prompt length in tokens (synthetic prompts: words, about one token each)
    output_len: int  # max_tokens to ask for
    prompt: str | None = None  # text from a dataset; None: synthesize `prompt_len` words


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """Fixed (`low == high`) or uniform integer lengths in [low, high]."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"length range must satisfy 1 <= low <= high, got [{self.low}, {self.high}]")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """'256' (fixed) or '128:512' (uniform, inclusive)."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ValueError(f"length must be N or LOW:HIGH with integers, got {text!r}") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise ValueError(f"length must be N or LOW:HIGH, got {text!r}")

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.low == self.high:
            return np.full(n, self.low, dtype=np.int64)
        return rng.integers(self.low, self.high + 1, size=n)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def zipf_weights(num_models: int, alpha: float) -> np.ndarray:
    """Popularity of models ranked 1..M: p_i proportional to i^-alpha (alpha 0: uniform)."""
    if num_models < 1:
        raise ValueError(f"need at least one model, got {num_models}")
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"Zipf alpha must be a finite number >= 0, got {alpha}")
    w = np.arange(1, num_models + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


def interarrival_times(
    rng: np.random.Generator, n: int, rate: float, arrival: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """n gaps between arrivals at mean `rate` per second.

    poisson: exponential gaps (CV 1). gamma: gamma gaps with coefficient of variation `cv` (shape 1/cv^2; cv > 1
    is burstier than Poisson, cv < 1 smoother; vLLM's "burstiness" is 1/cv^2). constant: evenly spaced.
    """
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if arrival == "poisson":
        return rng.exponential(1.0 / rate, size=n)
    if arrival == "gamma":
        if not (cv > 0 and math.isfinite(cv)):
            raise ValueError(f"gamma arrivals need a coefficient of variation cv > 0, got {cv}")
        shape = 1.0 / cv**2
        return rng.gamma(shape, 1.0 / (rate * shape), size=n)
    if arrival == "constant":
        return np.full(n, 1.0 / rate)
    raise ValueError(f"unknown arrival process {arrival!r}; choose from {', '.join(ARRIVALS)}")


# -- datasets -------------------------------------------------------------------------------------------------------
def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: about 4 characters per token (the load generator never loads a tokenizer)."""
    return max(1, round(len(text) / 4))


def _pair_from_record(rec: dict) -> tuple[str, str] | None:
    if "prompt" in rec:
        return str(rec["prompt"]), str(rec.get("response", rec.get("completion", "")))
    turns = rec.get("conversations") or rec.get("conversation")
    if isinstance(
        turns, list
    ):  # ShareGPT: [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]
        for a, b in zip(turns, turns[1:]):
            if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "assistant", "chatgpt"):
                return str(a.get("value", "")), str(b.get("value", ""))
        return None
    msgs = rec.get("messages")
    if isinstance(msgs, list):  # OpenAI messages
        for a, b in zip(msgs, msgs[1:]):
            if a.get("role") == "user" and b.get("role") == "assistant":
                return str(a.get("content", "")), str(b.get("content", ""))
    return None


def load_dataset(path: str | os.PathLike, max_prompt_tokens: int | None = None) -> list[tuple[str, int, int]]:
    """(prompt text, prompt tokens, response tokens) from a JSONL file (or a JSON array) of ShareGPT-style
    conversations, `{"prompt", "response"}` lines or `{"messages": [...]}` lines. Token counts are estimates."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
    pairs = []
    for rec in records:
        pair = _pair_from_record(rec) if isinstance(rec, dict) else None
        if pair is None or not pair[0] or not pair[1]:
            continue
        n_in, n_out = estimate_tokens(pair[0]), estimate_tokens(pair[1])
        if max_prompt_tokens is None or n_in <= max_prompt_tokens:
            pairs.append((pair[0], n_in, n_out))
    if not pairs:
        raise ValueError(
            f"{path}: no usable prompt/response pairs (expected ShareGPT 'conversations', "
            "'prompt'/'response' or 'messages' records)"
        )
    return pairs


# -- the workload ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    models: tuple[str, ...]
    alpha: float = 0.0
    input_len: LengthDist = LengthDist(256, 256)
    output_len: LengthDist = LengthDist(128, 128)
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    dataset: tuple[tuple[str, int, int], ...] | None = None  # from load_dataset; overrides the lengths

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("need at least one model name")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"model names must be distinct, got {list(self.models)}")
        zipf_weights(len(self.models), self.alpha)  # validates alpha
        if self.arrival not in ARRIVALS:
            raise ValueError(f"unknown arrival process {self.arrival!r}; choose from {', '.join(ARRIVALS)}")

    @property
    def popularity(self) -> dict[str, float]:
        return dict(zip(self.models, zipf_weights(len(self.models), self.alpha).tolist()))

    def describe(self) -> dict:
        d = {
            "models": list(self.models),
            "alpha": self.alpha,
            "arrival": self.arrival,
            "cv": self.cv,
            "seed": self.seed,
        }
        if self.dataset is None:
            d.update(input_len=str(self.input_len), output_len=str(self.output_len))
        else:
            d["dataset_pairs"] = len(self.dataset)
        return d


def generate(
    cfg: WorkloadConfig, num_requests: int, rate: float | None = None, duration_s: float | None = None
) -> list[RequestSpec]:
    """Up to `num_requests` specs; with a rate, arrivals stop at `duration_s` (if given). rate None: closed loop
    (every arrival_s is 0). The same seed gives the same models and lengths at every rate, and arrival times that
    scale as 1/rate, so a rate sweep compares like with like."""
    if num_requests < 1:
        raise ValueError(f"number of requests must be >= 1, got {num_requests}")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    rng_arr, rng_model, rng_len = (np.random.default_rng([cfg.seed, k]) for k in range(3))
    if rate is None:
        times = np.zeros(num_requests)
    else:
        gaps = interarrival_times(rng_arr, num_requests, 1.0, cfg.arrival, cfg.cv) / rate
        times = np.cumsum(gaps) - gaps[0]  # the first request goes at t = 0
    if duration_s is not None and rate is not None:
        times = times[times < duration_s]
    n = len(times)
    weights = zipf_weights(len(cfg.models), cfg.alpha)
    model_idx = rng_model.choice(len(cfg.models), size=num_requests, p=weights)[:n]
    prompts: list[str | None] = [None] * n
    if cfg.dataset is not None:
        picks = rng_len.integers(0, len(cfg.dataset), size=num_requests)[:n]
        prompts = [cfg.dataset[i][0] for i in picks]
        in_lens = [cfg.dataset[i][1] for i in picks]
        out_lens = [cfg.dataset[i][2] for i in picks]
    else:
        in_lens = cfg.input_len.sample(rng_len, num_requests)[:n].tolist()
        out_lens = cfg.output_len.sample(rng_len, num_requests)[:n].tolist()
    return [
        RequestSpec(
            i, float(times[i]), cfg.models[model_idx[i]], int(in_lens[i]), int(out_lens[i]), prompts[i]
        )
        for i in range(n)
    ]


# -- synthetic prompt text ------------------------------------------------------------------------------------------
# Common short English words; with a leading space each is a single token in Llama, Qwen and GPT tokenizers.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his it an were are which be this has also or had "
    "not first one their its new after who they have her she two been other when there all during into school "
    "time may years more most only over city some world would where later up such used many can state about "
    "national out known university united then made"
)
_WORDS = _WORD_TEXT.split()


def synthetic_prompt(index: int, num_words: int, seed: int = 0) -> str:
    """`num_words` random common words (about one token each), different for every request index, so that
    prefix caching cannot make requests cheaper than their length says."""
    rng = np.random.default_rng([seed, 1_000_003, index])
    words = rng.choice(len(_WORDS), size=num_words)
    return " ".join(_WORDS[i] for i in words)


def prompt_for(spec: RequestSpec, seed: int = 0) -> str:
    return spec.prompt if spec.prompt is not None else synthetic_prompt(spec.index, spec.prompt_len, seed)
