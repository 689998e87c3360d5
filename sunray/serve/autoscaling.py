"""Autoscaling of the decode pool on queue depth.

Requests reach decode workers straight from the ingress (the router picks the worker), so Serve's own count of
ongoing requests per DecodePool replica stays at zero. Each replica instead reports its worker's queue depth
(running + waiting) through `record_autoscaling_stats`, and this policy sizes the pool so that each worker holds
about `target_ongoing_requests` of them; Serve applies `upscale_delay_s` and `downscale_delay_s` to its answers.
Use it in a config:

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
    """The pool size the reported queue depth asks for, now. Serve wraps a custom policy with its own
    `upscale_delay_s` / `downscale_delay_s` (and scaling factors): it moves the pool only after the policy has
    asked for a new size for that long without a break. So no waiting here: a policy that held its answer back
    itself would break that run each time it answered "unchanged", and the pool would never shrink."""
    metrics = ctx.aggregated_metrics or {}
    depth = sum((metrics.get(QUEUE_DEPTH) or {}).values())
    config = ctx.config
    target = config.get_target_ongoing_requests() if config is not None else 16
    want = desired_workers(
        depth, target, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    )
    return want, dict(ctx.policy_state or {})
