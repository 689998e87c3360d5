"""Autoscaling of the decode pool on queue depth.

Requests reach decode workers straight from the ingress (the router picks the worker), so Serve's own count of
ongoing requests per DecodePool replica stays at zero. Each replica instead reports its worker's queue depth
(running + waiting) through `record_autoscaling_stats`, and this policy sizes the pool so that each worker holds
about `target_ongoing_requests` of them. Use it in a config:

    autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 16,
                         policy: {policy_function: sunray.serve.autoscaling:decode_queue_depth_policy}}
"""

from __future__ import annotations

import math
from typing import Any

QUEUE_DEPTH = "queue_depth"


def desired_workers(total_queue_depth: float, target_per_worker: float, lo: int, hi: int) -> int:
    """Pure: the pool size that puts about `target_per_worker` requests on each worker, within [lo, hi]."""
    want = math.ceil(total_queue_depth / max(target_per_worker, 1e-9)) if total_queue_depth > 0 else lo
    return max(lo, min(hi, want))


def decode_queue_depth_policy(ctx) -> tuple[int, dict[str, Any]]:
    metrics = ctx.aggregated_metrics or {}
    depth = sum((metrics.get(QUEUE_DEPTH) or {}).values())
    config = ctx.config
    target = config.get_target_ongoing_requests() if config is not None else 16
    want = desired_workers(depth, target, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
    state = dict(ctx.policy_state or {})
    now = ctx.current_time
    if want >= ctx.target_num_replicas:  # scale up at once
        state.pop("below_since", None)
        return want, state
    # Scale down only after the pool has been oversized for downscale_delay_s: draining costs a re-warm later.
    delay = getattr(config, "downscale_delay_s", 30.0) if config is not None else 30.0
    since = state.setdefault("below_since", now)
    if now is not None and since is not None and now - since >= delay:
        state.pop("below_since", None)
        return want, state
    return ctx.target_num_replicas, state
