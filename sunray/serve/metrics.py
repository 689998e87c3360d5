"""Metrics through ray.util.metrics (exported with a `ray_` prefix; counters get `_total`).

Created lazily in the process that records them: ray.util.metrics needs a connected Ray worker.
"""

from __future__ import annotations

import collections
import functools

_LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60]
_FAST_BOUNDARIES_S = [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05]


@functools.cache
def ingress_metrics():
    from ray.util.metrics import Counter, Histogram

    return {
        "ttft": Histogram(
            "sunray_ttft_seconds", "Time to first token", _LATENCY_BOUNDARIES_S, tag_keys=("model",)
        ),
        "tpot": Histogram(
            "sunray_tpot_seconds",
            "Time per output token after the first",
            _LATENCY_BOUNDARIES_S,
            tag_keys=("model",),
        ),
        "e2e": Histogram(
            "sunray_e2e_seconds", "End-to-end request latency", _LATENCY_BOUNDARIES_S, tag_keys=("model",)
        ),
        "requests": Counter("sunray_requests", "Requests by model and outcome", tag_keys=("model", "status")),
        "prompt_tokens": Counter("sunray_prompt_tokens", "Prompt tokens", tag_keys=("model",)),
        "output_tokens": Counter("sunray_output_tokens", "Generated tokens", tag_keys=("model",)),
        "prefill_stage": Histogram(
            "sunray_prefill_stage_seconds",
            "Where the time to first token goes: ingress (parse, tokenize), handle (Serve's routing both ways), "
            "queue (waiting at the prefill replica), engine (the batch's forward passes), send (its KV hand-offs)",
            _LATENCY_BOUNDARIES_S,
            tag_keys=("model", "stage"),
        ),
    }


@functools.cache
def decode_metrics():
    from ray.util.metrics import Counter, Gauge

    keys = ("worker",)
    return {
        "batch_size": Gauge("sunray_decode_batch_size", "Requests in the decode batch", tag_keys=keys),
        "queue_depth": Gauge("sunray_decode_queue_depth", "Requests waiting for KV room", tag_keys=keys),
        "kv_used": Gauge("sunray_decode_kv_blocks_used", "KV blocks in use", tag_keys=keys),
        "kv_free": Gauge("sunray_decode_kv_blocks_free", "KV blocks free", tag_keys=keys),
        "gpu_util": Gauge(
            "sunray_decode_gpu_utilization", "GPU utilization percent (absent without NVML)", tag_keys=keys
        ),
        "tokens": Counter("sunray_decode_tokens", "Tokens decoded", tag_keys=keys),
        "preemptions": Counter(
            "sunray_decode_preemptions", "Requests swapped out for lack of KV", tag_keys=keys
        ),
    }


@functools.cache
def router_metrics():
    from ray.util.metrics import Counter, Histogram

    return {
        "placements": Counter(
            "sunray_router_placements", "Decode placements", tag_keys=("worker", "policy", "model")
        ),
        "latency": Histogram(
            "sunray_router_decision_seconds",
            "Time to place one request",
            _FAST_BOUNDARIES_S,
            tag_keys=("policy",),
        ),
        "refusals": Counter("sunray_router_refusals", "Requests with no live worker", tag_keys=("policy",)),
    }


class RecentTimes:
    """The last `size` durations of each stage, for percentiles in /sunray/status (a Prometheus histogram has
    them too, but only with a Prometheus server to ask)."""

    def __init__(self, size: int = 2000) -> None:
        self.size = size
        self._by_stage: dict[str, collections.deque[float]] = {}

    def add(self, stage: str, seconds: float) -> None:
        q = self._by_stage.get(stage)
        if q is None:
            q = self._by_stage[stage] = collections.deque(maxlen=self.size)
        q.append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {n, p50_ms, p90_ms, p99_ms, max_ms}} (the max shows one stall that a p99 of few requests hides)."""
        out = {}
        for stage, q in self._by_stage.items():
            v = sorted(q)
            ms = {
                f"p{round(100 * f)}_ms": round(1e3 * v[min(len(v) - 1, int(f * len(v)))], 2)
                for f in (0.5, 0.9, 0.99)
            }
            out[stage] = {"n": len(v), **ms, "max_ms": round(1e3 * v[-1], 2)}
        return out
