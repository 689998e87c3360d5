"""Capacity search: the highest Poisson rate at which a server (or the simulator) holds an SLO.

    loadgen capacity --url http://127.0.0.1:8000 --num-models 2 --tpot-slo-ms 20 40 --ttft-slo-ms 1000 \\
        --gpus 1 --start-rate 8 --out results/cap

**The SLO of one request**: it finished (status ok), its TTFT is within the TTFT SLO (if one is given) and its
TPOT (first to last token over the tokens between) within the TPOT SLO. Refused (HTTP 429/503), failed and
cancelled requests are misses.

**A probe at rate r** sends the workload's requests (the same seed at every rate: the same models and lengths,
arrival times scaling as 1/r) as Poisson arrivals for `warmup_s + measure_s`. The requests that arrive in the
measurement window `[warmup_s, warmup_s + measure_s)` are *measured*; those before it only fill the server (the
warm-up is excluded) and arrivals keep coming after it, so the measured requests decode alongside a steady load
and not a draining one. The probe ends when every measured request has ended, or `tail_s` after the window (what
is still running is cancelled: a miss; the default tail is the longest a request that meets every SLO can take,
so only requests that had missed already are cut), or earlier, as soon as so many measured requests have
certainly missed (refused, failed, TTFT past its SLO while waiting, or first token so long ago that TPOT must
exceed its SLO) that no criterion can hold any more. Everything still in flight is then cancelled (with `drain`:
left to finish, up to the tail bound, then cancelled), and before the
next probe the server is given `settle_s` and then a short canary request until it answers about as fast as it
did idle (so that aborted work does not leak into the next probe).

**The SLO holds at r** when at least `target` of the measured requests met it (attainment >= target; default 0.9),
at most `max_errors` of them failed with an error other than a refusal (default 0), and the server kept up: the
output tokens it streamed during the window are at least (1 - `max_lag`) of those the window's arrivals asked for,
less two requests' worth (default max_lag 0.2). The last condition catches a queue that grows through a short
window while the latency SLOs still hold at its end (a generous TTFT SLO hides it for a while). With target 0.9 this is:
the p90 of per-request TPOT, counting every miss as infinitely slow, is within the TPOT SLO. The p90 (in general
the target's percentile) is the stated percentile.

**The search** (`search`): from `start_rate`, multiply by `growth` while the SLO holds; then bisect (geometric
midpoint) between the highest rate that held and the lowest that failed until hi / lo <= 1 + `resolution`.
Several criteria (e.g. TPOT SLO 20 and 40 ms) share every probe: each probe is judged against all of them. The
capacity of a criterion is the highest probed rate that held below the lowest that failed; its bracket [lo, hi]
says how close the search got. Bounded by `max_probes` and a time budget: where either runs out first, the
bracket is reported as it stands.

**At the capacity rate** the report gives the offered load (nominal rate; measured arrivals per second; the output
tokens asked for per second), the delivered throughput (output tokens streamed by the server during the window, all
requests, per second; requests completed in the window per second), TTFT / TPOT percentiles of the measured
requests, attainment, and per-GPU throughput (delivered tok/s / `gpus`). Offered and delivered differ when the
server falls behind; at a capacity point they should agree.

The probe runner for live servers is `LiveProber` (HTTP only); `loadgen.sim.capacity` gives the simulator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence

import aiohttp
import numpy as np

from loadgen.client import ClientConfig, send
from loadgen.metrics import SLO, RequestRecord, percentiles
from loadgen.workload import RequestSpec, WorkloadConfig, generate

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _r(x: float | None, d: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), d)


# -- what holds -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Criterion:
    """An SLO to hold: per request TPOT <= tpot_ms (and TTFT <= ttft_ms), for >= target of the measured requests,
    with at most max_errors failures that are not refusals."""

    tpot_ms: float
    ttft_ms: float | None = None
    target: float = 0.9
    max_errors: int = 0

    def __post_init__(self) -> None:
        if not (self.tpot_ms > 0 and math.isfinite(self.tpot_ms)):
            raise ValueError(f"TPOT SLO must be a positive number of ms, got {self.tpot_ms}")
        if self.ttft_ms is not None and not (self.ttft_ms > 0 and math.isfinite(self.ttft_ms)):
            raise ValueError(f"TTFT SLO must be a positive number of ms, got {self.ttft_ms}")
        if not 0 < self.target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.target}")
        if self.max_errors < 0:
            raise ValueError(f"max_errors must be >= 0, got {self.max_errors}")

    @property
    def slo(self) -> SLO:
        return SLO(self.ttft_ms, self.tpot_ms)

    @property
    def label(self) -> str:
        ttft = f", TTFT<={self.ttft_ms:g}ms" if self.ttft_ms is not None else ""
        errors = f", errors<={self.max_errors}" if self.max_errors else ""
        return f"TPOT<={self.tpot_ms:g}ms{ttft} @{100 * self.target:g}%{errors}"

    @property
    def percentile(self) -> float:
        return 100 * self.target

    def describe(self) -> dict:
        return {
            "tpot_ms": self.tpot_ms,
            "ttft_ms": self.ttft_ms,
            "target": self.target,
            "max_errors": self.max_errors,
            "label": self.label,
            "meaning": (
                f"at least {100 * self.target:g}% of the measured requests finish with TPOT <= {self.tpot_ms:g} ms"
                + (f" and TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms is not None else "")
                + f" (i.e. p{100 * self.target:g} of per-request TPOT, misses counted as infinite, within the "
                f"SLO); refused, failed and cancelled requests are misses; more than {self.max_errors} failures "
                "other than refusals fail the probe"
            ),
        }

    def budget(self, n: int) -> int:
        """How many of n measured requests may miss while the criterion still holds."""
        return math.floor((1 - self.target) * n + 1e-9)

    def certainly_missed(self, r: RequestRecord, now: float) -> bool:
        """Has r missed this SLO already, whatever happens next? (for early stopping; r measured, now in the
        record's clock)"""
        if r.end_s is not None:
            return not self.slo.met(r)
        if r.sent_s is None:
            return False
        if r.first_token_s is None:
            return self.ttft_ms is not None and (now - r.sent_s) * 1e3 > self.ttft_ms
        n = max(2, r.max_tokens)
        return (now - r.first_token_s) * 1e3 > self.tpot_ms * (n - 1)


def check_criteria(criteria: Sequence[Criterion]) -> list[Criterion]:
    if not criteria:
        raise ValueError("need at least one criterion")
    labels = [c.label for c in criteria]
    if len(set(labels)) != len(labels):
        raise ValueError(f"criteria must differ, got {labels}")
    return list(criteria)


def evaluate(records: Sequence[RequestRecord], n_measured: int, c: Criterion, keeps_up: bool = True) -> dict:
    """Judge the measured requests (`records`, one per measured request that was issued; `n_measured` counts
    those never issued too, as misses) against criterion c; keeps_up: the probe's verdict on the server keeping up
    with the offered load (`keeps_up`)."""
    counts = {"ok": 0, "refused": 0, "error": 0, "cancelled": 0}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    counts["never_sent"] = n_measured - len(records)
    hits = [r for r in records if c.slo.met(r)]
    met = len(hits)
    attainment = met / n_measured if n_measured else float("nan")
    # the target's percentile of per-request TPOT, a miss counting as infinitely slow (a one-token answer: 0)
    tpots = sorted(1e3 * r.tpot if r.tpot is not None else 0.0 for r in hits)
    tpots += [math.inf] * (n_measured - met)
    k = math.ceil(c.target * n_measured) - 1 if n_measured else -1
    at_target = tpots[k] if 0 <= k < len(tpots) else None
    holds = n_measured > 0 and attainment >= c.target - 1e-12 and counts["error"] <= c.max_errors and keeps_up
    return {
        "holds": bool(holds),
        "keeps_up": bool(keeps_up),
        "attainment": _r(attainment),
        "met": met,
        "misses": n_measured - met,
        "errors": counts["error"],
        # None where that percentile falls on a miss (infinitely slow)
        f"tpot_ms_p{c.percentile:g}_misses_inf": None if at_target is None else _r(at_target, 3),
    }


# -- what a probe measures ----------------------------------------------------------------------------------------
def tokens_in_window(r: RequestRecord, w0: float, w1: float) -> float:
    """Output tokens of r streamed in [w0, w1): from its chunk times (scaled to the usage count when chunks carry
    several tokens), or, without chunk times (simulated records), spread evenly from first token to end."""
    n = r.output_tokens
    if r.chunk_s:
        inside = sum(w0 <= t < w1 for t in r.chunk_s)
        scale = n / len(r.chunk_s) if r.completion_tokens else 1.0
        return inside * scale
    f, e = r.first_token_s, r.end_s
    if f is None or n < 1:
        return 0.0
    if n == 1 or e is None or e <= f:
        return float(w0 <= f < w1)
    d = (e - f) / (n - 1)
    lo = max(0, math.ceil((w0 - f) / d - 1e-9))
    hi = min(n - 1, math.ceil((w1 - f) / d - 1e-9) - 1)
    return float(max(0, hi - lo + 1))


def keeps_up(stats: dict, max_lag: float) -> bool:
    """Did the server stream, during the window, at least (1 - max_lag) of the tokens its arrivals asked for, less
    two requests' worth (window_stats)?"""
    n, span = stats["measured_requests"], stats["window_s"][1] - stats["window_s"][0]
    offered, delivered = stats["offered"]["tok_s"], stats["delivered"]["tok_s"]
    if not n or offered is None or delivered is None:
        return True
    per_request = offered / n  # tok/s of one request's tokens spread over the window
    return delivered >= (1 - max_lag) * offered - 2 * per_request - 1e-9 / span


def window_stats(
    records: Sequence[RequestRecord],
    measured: set[int],
    n_measured: int,
    asked_tokens: int,
    w0: float,
    w1: float,
    rate: float,
) -> dict:
    """Offered and delivered load over the window [w0, w1), and the latencies of the measured requests."""
    span = w1 - w0
    mine = [r for r in records if r.index in measured]
    ok = [r for r in mine if r.status == "ok"]
    tokens = sum(tokens_in_window(r, w0, w1) for r in records)
    done = sum(1 for r in records if r.status == "ok" and r.end_s is not None and w0 <= r.end_s < w1)
    lag = [r.sent_s - r.scheduled_s for r in mine if r.sent_s is not None]
    return {
        "window_s": [round(w0, 3), round(w1, 3)],
        "offered": {  # nominal: the rate asked for; req_s, tok_s: what arrived in this window
            "rate": rate,
            "nominal_tok_s": _r(rate * asked_tokens / n_measured, 1) if n_measured else None,
            "req_s": _r(n_measured / span),
            "tok_s": _r(asked_tokens / span, 1),
        },
        "delivered": {
            "tok_s": _r(tokens / span, 1),
            "req_s": _r(done / span),
        },
        "measured_requests": n_measured,
        "issued_requests": len(records),
        "ttft_ms": percentiles((r.ttft for r in ok if r.ttft is not None), 1e3),
        "tpot_ms": percentiles((r.tpot for r in ok if r.tpot is not None), 1e3),
        "e2e_ms": percentiles((r.e2e for r in ok if r.e2e is not None), 1e3),
        "send_lag_ms_p99": _r(float(np.percentile(lag, 99)) * 1e3, 1) if lag else None,
    }


@dataclasses.dataclass
class Probe:
    rate: float
    stats: dict
    verdicts: dict[str, dict]  # criterion label -> evaluate()
    stop: str  # done | early stop | tail bound | ...
    wall_s: float
    settle_s: float = 0.0
    records: list[RequestRecord] = dataclasses.field(default_factory=list, repr=False)

    def holds(self, c: Criterion) -> bool:
        return self.verdicts[c.label]["holds"]

    def to_json(self) -> dict:
        return {
            "rate": self.rate,
            "stop": self.stop,
            "wall_s": round(self.wall_s, 2),
            "settle_s": round(self.settle_s, 2),
            **self.stats,
            "criteria": self.verdicts,
        }


# -- the probe design -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    warmup_s: float = 3.0
    measure_s: float = 6.0
    tail_s: float | None = None  # None: auto (the longest a request meeting every SLO can take, + 1 s)
    settle_s: float = 2.0
    settle_timeout_s: float = 30.0
    ttft_allowance_s: float = 5.0  # the auto tail's TTFT part when no TTFT SLO is given
    max_requests: int = 50_000
    max_in_flight: int | None = None
    # at the probe's end let requests in flight finish (until the tail bound) instead of cancelling them
    drain: bool = False
    max_lag: float = (
        0.2  # the server keeps up if it delivers >= (1 - max_lag) of the offered tokens (keeps_up)
    )

    def __post_init__(self) -> None:
        if not (self.warmup_s >= 0 and self.measure_s > 0):
            raise ValueError(f"need warmup >= 0 and measure > 0 s, got {self.warmup_s}, {self.measure_s}")
        if self.tail_s is not None and self.tail_s < 0:
            raise ValueError(f"tail must be >= 0 s, got {self.tail_s}")

    @property
    def window(self) -> tuple[float, float]:
        return self.warmup_s, self.warmup_s + self.measure_s

    def tail(self, criteria: Sequence[Criterion], max_output: int) -> float:
        if self.tail_s is not None:
            return self.tail_s
        ttft = max((c.ttft_ms or self.ttft_allowance_s * 1e3) for c in criteria) / 1e3
        tpot = max(c.tpot_ms for c in criteria) / 1e3
        return ttft + max(0, max_output - 1) * tpot + 1.0

    def describe(self, criteria: Sequence[Criterion], max_output: int) -> dict:
        return {
            "warmup_s": self.warmup_s,
            "measure_s": self.measure_s,
            "tail_s": round(self.tail(criteria, max_output), 3),
            "tail": "given"
            if self.tail_s is not None
            else "auto: TTFT SLO + (max output - 1) x TPOT SLO + 1 s",
            "settle_s": self.settle_s,
            "settle_timeout_s": self.settle_timeout_s,
            "at_the_end": "requests in flight finish, up to the tail bound"
            if self.drain
            else "requests in flight are cancelled",
        }


def probe_specs(
    wc: WorkloadConfig, rate: float, pcfg: ProbeConfig, horizon_s: float
) -> tuple[list[RequestSpec], set[int], int]:
    """The probe's requests (arrivals up to horizon_s), the indices of the measured ones, and the output tokens
    they ask for."""
    n = min(pcfg.max_requests, int(rate * horizon_s * 1.3) + 50)
    specs = generate(wc, n, rate=rate, duration_s=horizon_s)
    w0, w1 = pcfg.window
    measured = [s for s in specs if w0 <= s.arrival_s < w1]
    if specs and specs[-1].arrival_s < w1 and len(specs) == pcfg.max_requests:
        raise ValueError(
            f"rate {rate:g} needs more than {pcfg.max_requests} requests per probe; raise max_requests"
        )
    return specs, {s.index for s in measured}, sum(s.output_len for s in measured)


# -- the search -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SearchConfig:
    start_rate: float = 4.0
    growth: float = 2.0
    resolution: float = 0.1  # stop bisecting when hi / lo <= 1 + resolution
    min_rate: float = 0.25
    max_rate: float = 1e4
    max_probes: int = 12
    budget_s: float | None = None  # wall time for the whole search (probes and settling)

    def __post_init__(self) -> None:
        if not (0 < self.min_rate <= self.start_rate <= self.max_rate):
            raise ValueError(
                f"need 0 < min rate <= start rate <= max rate, got {self.min_rate}, {self.start_rate}, "
                f"{self.max_rate}"
            )
        if not self.growth > 1:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if not self.resolution > 0:
            raise ValueError(f"resolution must be > 0, got {self.resolution}")
        if self.max_probes < 1:
            raise ValueError(f"max_probes must be >= 1, got {self.max_probes}")


def bracket(probes: Sequence[Probe], c: Criterion) -> tuple[float | None, float | None, bool]:
    """(lo, hi, monotone): hi the lowest probed rate that failed, lo the highest that held below it; monotone is
    False when some rate above hi held (noise, or a server that is not monotone in load)."""
    failed = [p.rate for p in probes if not p.holds(c)]
    hi = min(failed) if failed else None
    held = [p.rate for p in probes if p.holds(c)]
    lo = max((r for r in held if hi is None or r < hi), default=None)
    monotone = hi is None or not any(r > hi for r in held)
    return lo, hi, monotone


def _next_rate(probes: Sequence[Probe], criteria: Sequence[Criterion], cfg: SearchConfig) -> float | None:
    """The rate to probe next, or None when every criterion is resolved. Ramps first (they inform every
    criterion), then bisects the widest open bracket."""
    ramps, bisections = [], []
    tried = {p.rate for p in probes}
    for c in criteria:
        lo, hi, _ = bracket(probes, c)
        if hi is None:
            r = cfg.start_rate if lo is None else lo * cfg.growth
            if lo is not None and lo >= cfg.max_rate:
                continue  # holds at the highest rate we may offer
            ramps.append(min(r, cfg.max_rate))
        elif lo is None:
            if hi <= cfg.min_rate:
                continue  # fails even at the lowest rate we may offer
            ramps.append(max(hi / cfg.growth, cfg.min_rate))
        elif hi / lo > 1 + cfg.resolution:
            bisections.append((hi / lo, math.sqrt(lo * hi)))
    for r in ramps:  # upward ramps first, from the lowest: a probe that fails tells every criterion something
        if r not in tried:
            return r
    if bisections:
        return max(bisections)[1]
    return None


@dataclasses.dataclass
class SearchResult:
    criteria: list[Criterion]
    probes: list[Probe]
    config: SearchConfig
    stopped: str  # converged | max probes | budget | error: ...
    wall_s: float
    gpus: int | None = None

    def capacity(self, c: Criterion) -> dict:
        lo, hi, monotone = bracket(self.probes, c)
        at = next((p for p in self.probes if p.rate == lo), None)
        if hi is None:
            status = "holds at every probed rate" + (
                " (max rate)" if lo and lo >= self.config.max_rate else ""
            )
        elif lo is None:
            status = "fails at every probed rate" + (
                " (min rate)" if hi <= self.config.min_rate * (1 + 1e-9) else ""
            )
        elif hi / lo <= 1 + self.config.resolution:
            status = "converged"
        else:
            status = f"not converged ({self.stopped})"
        out = {
            "criterion": c.describe(),
            "capacity_rate": lo,
            "bracket": [lo, hi],
            "bracket_ratio": _r(hi / lo, 4) if lo and hi else None,
            "resolution": self.config.resolution,
            "status": status,
            "monotone": monotone,
        }
        if at is not None:
            s = at.stats
            out["at_capacity"] = {
                "offered_rate": lo,
                "offered_nominal_tok_s": s["offered"].get("nominal_tok_s"),
                "offered_req_s": s["offered"]["req_s"],
                "offered_tok_s": s["offered"]["tok_s"],
                "delivered_tok_s": s["delivered"]["tok_s"],
                "delivered_req_s": s["delivered"]["req_s"],
                "delivered_tok_s_per_gpu": _r(s["delivered"]["tok_s"] / self.gpus, 1)
                if self.gpus and s["delivered"]["tok_s"] is not None
                else None,
                "ttft_ms": s["ttft_ms"],
                "tpot_ms": s["tpot_ms"],
                "attainment": at.verdicts[c.label]["attainment"],
                "send_lag_ms_p99": s.get("send_lag_ms_p99"),
                "measured_requests": s["measured_requests"],
            }
        return out

    def to_json(self) -> dict:
        return {
            "search": dataclasses.asdict(self.config),
            "stopped": self.stopped,
            "wall_s": round(self.wall_s, 1),
            "gpus": self.gpus,
            "capacity": [self.capacity(c) for c in self.criteria],
            "probes": [p.to_json() for p in self.probes],
        }


def search(
    probe: Callable[[float], Probe],
    criteria: Sequence[Criterion],
    cfg: SearchConfig,
    *,
    gpus: int | None = None,
    log: Log | None = _stderr,
    clock: Callable[[], float] = time.monotonic,
    on_probe: Callable[[Probe], None] | None = None,
) -> SearchResult:
    """Ramp up geometrically until each criterion fails, then bisect to the resolution (module docstring)."""
    criteria = check_criteria(criteria)
    log = log or (lambda _m: None)
    probes: list[Probe] = []
    t0 = clock()
    stopped = "converged"
    while True:
        rate = _next_rate(probes, criteria, cfg)
        if rate is None:
            break
        if len(probes) >= cfg.max_probes:
            stopped = "max probes"
            break
        if cfg.budget_s is not None and probes:
            mean = (clock() - t0) / len(probes)
            if clock() - t0 + mean > cfg.budget_s:
                stopped = "budget"
                break
        p = probe(rate)
        probes.append(p)
        if on_probe:
            on_probe(p)
        s = p.stats
        verdicts = " ".join(
            f"[{c.label}: {'holds' if p.holds(c) else 'fails'} {p.verdicts[c.label]['attainment']}]"
            for c in criteria
        )
        log(
            f"probe {len(probes):>2} rate {rate:8.3f}: {verdicts} offered {s['offered']['tok_s']} tok/s, delivered {s['delivered']['tok_s']} tok/s, "
            f"TPOT p50/p90 {s['tpot_ms']['p50']}/{s['tpot_ms']['p90']} ms, TTFT p50 {s['ttft_ms']['p50']} ms "
            f"({p.stop}, {p.wall_s:.1f} s)"
        )
    return SearchResult(list(criteria), probes, cfg, stopped, clock() - t0, gpus)


# -- live probes over HTTP ------------------------------------------------------------------------------------------
class LiveProber:
    """Runs probes against an OpenAI-compatible server (module docstring): call it with a rate."""

    def __init__(
        self,
        wc: WorkloadConfig,
        client: ClientConfig,
        criteria: Sequence[Criterion],
        pcfg: ProbeConfig,
        *,
        runner: Callable | None = None,
        log: Log | None = _stderr,
    ) -> None:
        self.wc, self.client, self.criteria, self.pcfg = wc, client, check_criteria(criteria), pcfg
        self.run = runner or asyncio.run
        self.log = log or (lambda _m: None)
        self.baseline_s: float | None = None
        self._canaries = 0

    def __call__(self, rate: float) -> Probe:
        return self.run(self._probe(rate))

    # the canary: a short request whose latency says whether the server is back to idle
    def _canary_spec(self) -> RequestSpec:
        self._canaries += 1
        return RequestSpec(10**9 + self._canaries, 0.0, self.wc.models[0], 8, 2)

    async def _canary(self, session: aiohttp.ClientSession, timeout_s: float | None = None) -> float | None:
        rec = RequestRecord(0, self.wc.models[0])
        t0 = time.perf_counter()
        client = (
            self.client
            if timeout_s is None
            else dataclasses.replace(self.client, timeout_s=max(0.5, timeout_s))
        )
        await send(session, self._canary_spec(), client, t0, rec)
        return rec.e2e if rec.status == "ok" else None

    async def _baseline(self) -> float:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            times = [await self._canary(session) for _ in range(3)]
        ok = [t for t in times if t is not None]
        if not ok:
            raise RuntimeError(f"the server at {self.client.endpoint_url} does not answer a 2-token request")
        return min(ok)

    def measure_baseline(self) -> float:
        self.baseline_s = self.run(self._baseline())
        return self.baseline_s

    async def _settle(self) -> tuple[float, float | None]:
        """(seconds spent, the last canary's end-to-end seconds)."""
        t0 = time.perf_counter()
        await asyncio.sleep(self.pcfg.settle_s)
        if self.baseline_s is None:
            return time.perf_counter() - t0, None
        bound = max(3 * self.baseline_s, self.baseline_s + 0.25)
        e2e = None
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            while time.perf_counter() - t0 < self.pcfg.settle_timeout_s:
                e2e = await self._canary(session, self.pcfg.settle_timeout_s - (time.perf_counter() - t0))
                if e2e is not None and e2e <= bound:
                    break
                await asyncio.sleep(0.5)
            else:
                self.log(
                    f"the server did not settle within {self.pcfg.settle_timeout_s:g} s after a probe (last canary "
                    f"{'failed' if e2e is None else f'{1e3 * e2e:.0f} ms'}, idle {1e3 * self.baseline_s:.0f} ms)"
                )
        return time.perf_counter() - t0, e2e

    async def _probe(self, rate: float) -> Probe:
        pcfg, crit = self.pcfg, self.criteria
        w0, w1 = pcfg.window
        max_out = self.wc.output_len.high if self.wc.dataset is None else max(d[2] for d in self.wc.dataset)
        tail = pcfg.tail(crit, max_out)
        specs, measured, asked = probe_specs(self.wc, rate, pcfg, w1 + tail)
        n_measured = len(measured)
        records: list[RequestRecord] = []
        mine: list[RequestRecord] = []
        tasks: list[asyncio.Task] = []
        sem = asyncio.Semaphore(pcfg.max_in_flight) if pcfg.max_in_flight else None
        stop = asyncio.Event()
        t0 = time.perf_counter()

        async def one(session, spec, rec):
            if sem is None:
                return await send(session, spec, self.client, t0, rec)
            async with sem:
                return await send(session, spec, self.client, t0, rec)

        async def issue(session) -> None:
            for spec in specs:
                delay = spec.arrival_s - (time.perf_counter() - t0)
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                rec = RequestRecord(
                    spec.index,
                    spec.model,
                    scheduled_s=spec.arrival_s,
                    prompt_len=spec.prompt_len,
                    max_tokens=spec.output_len,
                )
                records.append(rec)
                if spec.index in measured:
                    mine.append(rec)
                tasks.append(asyncio.create_task(one(session, spec, rec)))

        reason = "done"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            issuer = asyncio.create_task(issue(session))
            try:
                while True:
                    await asyncio.sleep(0.1)
                    now = time.perf_counter() - t0
                    if len(mine) == n_measured and all(r.end_s is not None for r in mine) and now >= w1:
                        break
                    if now >= w1 + tail:
                        reason = "tail bound"
                        break
                    if issuer.done() and issuer.exception() is not None:
                        raise issuer.exception()
                    if n_measured and now >= w0 and self._all_fail(mine, n_measured, now):
                        reason = "early stop"
                        break
            finally:
                stop.set()
                await asyncio.gather(issuer, return_exceptions=True)
                left = w1 + tail - (time.perf_counter() - t0)
                if pcfg.drain and left > 0 and tasks:
                    await asyncio.wait(tasks, timeout=left)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
        stats = window_stats(records, measured, n_measured, asked, w0, w1, rate)
        up = keeps_up(stats, pcfg.max_lag)
        verdicts = {c.label: evaluate(mine, n_measured, c, up) for c in crit}
        settle, canary = await self._settle()
        stats["settle_canary_ms"] = None if canary is None else round(1e3 * canary, 1)
        return Probe(rate, stats, verdicts, reason, wall, settle, records)

    def _all_fail(self, mine: list[RequestRecord], n_measured: int, now: float) -> bool:
        """Has every criterion certainly failed already?"""
        errors = sum(r.status == "error" for r in mine)
        for c in self.criteria:
            if errors > c.max_errors:
                continue
            misses = sum(c.certainly_missed(r, now) for r in mine)
            if misses <= c.budget(n_measured):
                return False
        return True


# -- the report -------------------------------------------------------------------------------------------------------
def _cell(v, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def table(doc: dict) -> str:
    """One line per criterion: capacity, bracket, offered vs delivered, per GPU, latencies at capacity."""
    head = (
        f"{'criterion':<34} {'capacity':>9} {'bracket':>17} {'offered tok/s':>13} {'delivered tok/s':>15} "
        f"{'tok/s/GPU':>9} {'TPOT p50/p90':>13} {'TTFT p50/p90':>13} {'attain':>6}  status"
    )
    lines = [head, "-" * len(head)]
    for cap in doc["capacity"]:
        a = cap.get("at_capacity") or {}
        lo, hi = cap["bracket"]
        br = f"[{_cell(lo, 2)}, {_cell(hi, 2)}]"
        tp, tt = a.get("tpot_ms") or {}, a.get("ttft_ms") or {}
        lines.append(
            f"{cap['criterion']['label']:<34} {_cell(cap['capacity_rate'], 2):>9} {br:>17} "
            f"{_cell(a.get('offered_tok_s')):>13} {_cell(a.get('delivered_tok_s')):>15} "
            f"{_cell(a.get('delivered_tok_s_per_gpu')):>9} "
            f"{_cell(tp.get('p50')) + '/' + _cell(tp.get('p90')):>13} "
            f"{_cell(tt.get('p50'), 0) + '/' + _cell(tt.get('p90'), 0):>13} "
            f"{_cell(a.get('attainment'), 3):>6}  {cap['status']}"
        )
    return "\n".join(lines) + "\n"
