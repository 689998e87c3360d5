"""Metrics: pure functions over recorded timestamps (live runs and simulated runs share the record format).

All times in a `RequestRecord` are seconds since the start of the run. Definitions:
- TTFT: first token (the first streamed chunk with text) minus the moment the request was sent.
- TPOT: (last token - first token) / (output tokens - 1), for requests with at least 2 output tokens.
- ITL: gaps between consecutive chunks with text (one token per chunk on servers that stream every token).
- E2E: end of the response minus the moment the request was sent.
- Send lag: sent minus scheduled (open loop); large values mean the load generator, not the server, fell behind.
- Throughput: over the run's duration; output tokens from the server's usage chunk when it sends one, else the
  number of chunks with text. Throughput per GPU divides by the number of GPUs given.
- SLO attainment: the share of all requests (refused, failed and cancelled ones count as misses) that finished
  with TTFT <= the TTFT SLO and TPOT <= the TPOT SLO (a one-token answer has no TPOT and passes that part).
  Goodput: such requests (and their output tokens) per second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

STATUSES = ("ok", "refused", "error", "cancelled")
QUANTILES = (50, 90, 99)


@dataclasses.dataclass
class RequestRecord:
    index: int
    model: str
    status: str = "cancelled"  # ok | refused (429/503) | error | cancelled (still running when the run ended)
    scheduled_s: float = 0.0
    sent_s: float | None = None
    first_token_s: float | None = None  # the first chunk with text: what TTFT measures
    # The first chunk with a choice, text or not. Servers that send their first chunk with the first token (sunray's
    # ingress) give the first token's time here even when it decodes to no text yet (a partial character, or an id
    # beyond a dummy model's borrowed tokenizer); a role-only chat chunk sent earlier (the fake server's) comes
    # first too. The gap to first_token_s is text held back, not server time.
    first_chunk_s: float | None = None
    end_s: float | None = None
    chunk_s: list[float] = dataclasses.field(default_factory=list)  # arrival of each chunk with text
    prompt_len: int = 0  # the spec's prompt length (tokens asked for)
    max_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage chunk
    completion_tokens: int | None = None
    finish_reason: str | None = None
    http_status: int | None = None
    error: str | None = None

    # -- derived ------------------------------------------------------------------------------------------------
    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_s)

    @property
    def ttft(self) -> float | None:
        if self.first_token_s is None or self.sent_s is None:
            return None
        return self.first_token_s - self.sent_s

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if self.status != "ok" or n < 2 or self.first_token_s is None:
            return None
        last = self.chunk_s[-1] if self.chunk_s else self.end_s
        if last is None:
            return None
        return (last - self.first_token_s) / (n - 1)

    @property
    def e2e(self) -> float | None:
        if self.status != "ok" or self.end_s is None or self.sent_s is None:
            return None
        return self.end_s - self.sent_s

    @property
    def itl(self) -> list[float]:
        c = self.chunk_s
        return [b - a for a, b in zip(c, c[1:])]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["chunk_s"] = [round(t, 6) for t in self.chunk_s]
        for k in ("ttft", "tpot", "e2e"):
            v = getattr(self, k)
            d[k] = None if v is None else round(v, 6)
        return d

    @classmethod
    def from_json(cls, d: dict) -> RequestRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be positive, got {v}")

    def met(self, r: RequestRecord) -> bool:
        if r.status != "ok":
            return False
        if self.ttft_ms is not None and (r.ttft is None or r.ttft * 1e3 > self.ttft_ms):
            return False
        tpot = r.tpot
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


def percentiles(values: Iterable[float], scale: float = 1.0, quantiles: Sequence[int] = QUANTILES) -> dict:
    """mean and pXX of `values` times `scale` (e.g. 1e3 for ms); None everywhere when there are no values."""
    a = np.asarray(list(values), dtype=np.float64) * scale
    out: dict[str, float | None] = {"mean": None, **{f"p{q}": None for q in quantiles}}
    if a.size:
        out["mean"] = round(float(a.mean()), 3)
        for q in quantiles:
            out[f"p{q}"] = round(float(np.percentile(a, q)), 3)
    return out


def run_duration(records: Sequence[RequestRecord]) -> float:
    """From the first send to the last end (0 when nothing was sent)."""
    sent = [r.sent_s for r in records if r.sent_s is not None]
    ends = [r.end_s for r in records if r.end_s is not None] + sent
    return max(ends) - min(sent) if sent else 0.0


def _group(
    records: Sequence[RequestRecord], duration_s: float, num_gpus: int | None, slo: SLO | None
) -> dict:
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    ok = [r for r in records if r.status == "ok"]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    dur = duration_s if duration_s > 0 else math.nan
    g: dict = {
        "requests": len(records),
        **counts,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_ms": percentiles((r.ttft for r in ok if r.ttft is not None), 1e3),
        "tpot_ms": percentiles((r.tpot for r in ok if r.tpot is not None), 1e3),
        "itl_ms": percentiles((x for r in ok for x in r.itl), 1e3),
        "e2e_ms": percentiles((r.e2e for r in ok if r.e2e is not None), 1e3),
        # how late the client sent (an overloaded load generator shows here, not as server latency)
        "send_lag_ms": percentiles((r.sent_s - r.scheduled_s for r in records if r.sent_s is not None), 1e3),
        "request_throughput": _r(len(ok) / dur),
        "output_token_throughput": _r(out_tokens / dur),
        "total_token_throughput": _r((in_tokens + out_tokens) / dur),
    }
    if num_gpus:
        g["output_token_throughput_per_gpu"] = _r(out_tokens / dur / num_gpus)
    if slo is not None and (slo.ttft_ms is not None or slo.tpot_ms is not None):
        good = [r for r in records if slo.met(r)]
        g["slo_attainment"] = _r(len(good) / len(records)) if records else None
        g["goodput_requests"] = _r(len(good) / dur)
        g["goodput_tokens"] = _r(sum(r.output_tokens for r in good) / dur)
        if num_gpus:
            g["goodput_tokens_per_gpu"] = _r(g["goodput_tokens"] / num_gpus)
    return g


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 4)


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float | None = None,
    num_gpus: int | None = None,
    slo: SLO | None = None,
) -> dict:
    """{"overall": metrics, "per_model": {model: metrics}} over `records` (see the module docstring)."""
    if duration_s is None:
        duration_s = run_duration(records)
    models = sorted({r.model for r in records})
    return {
        "duration_s": round(duration_s, 4),
        "overall": _group(records, duration_s, num_gpus, slo),
        # per-GPU figures only overall: the GPUs serve every model
        "per_model": {m: _group([r for r in records if r.model == m], duration_s, None, slo) for m in models},
    }
