"""Placement of decode requests on decode workers: the policies (pure, testable without Ray) and the router.

Decode workers push their stats (queue depth, free KV blocks, GPU utilization) a few times a second; the router
answers one placement per request, never per token. Between two reports it counts its own placements against a
worker, so a burst of requests does not all land on the worker that looked idlest a moment ago.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import time
from typing import Any


@dataclasses.dataclass
class WorkerStats:
    worker_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 1
    gpu_utilization: float | None = None  # percent; None where NVML is not available (CPU machines)
    draining: bool = False
    step_times: dict = dataclasses.field(default_factory=dict)  # DecodeWorker's StepTimes.summary()
    updated_at: float = dataclasses.field(default_factory=time.monotonic)
    placed_since_report: int = 0

    @property
    def queue_depth(self) -> int:
        return self.num_running + self.num_waiting + self.placed_since_report

    @property
    def kv_used_fraction(self) -> float:
        return 1.0 - self.kv_blocks_free / max(1, self.kv_blocks_total)


class NoWorkerError(RuntimeError):
    """No live decode worker may take this request."""


class RouterPolicy(abc.ABC):
    name: str

    @abc.abstractmethod
    def choose(self, model: str, workers: list[WorkerStats]) -> WorkerStats:
        """Pick one of `workers` (live, not draining, non-empty) for a request of `model`."""


def load_score(w: WorkerStats) -> float:
    """Lower is better: queue depth first, then KV pressure, then GPU utilization when it is known."""
    util = 0.0 if w.gpu_utilization is None else w.gpu_utilization / 100.0
    return w.queue_depth + 0.5 * w.kv_used_fraction + 0.25 * util


class LeastLoaded(RouterPolicy):
    """SUN: the decode module is shared, so any worker takes any model; pick the least loaded."""

    name = "sun"

    def choose(self, model, workers):
        return min(workers, key=lambda w: (load_score(w), w.worker_id))


class Partitioned(RouterPolicy):
    """Conventional disaggregation: each model owns its decode workers (the baseline of every experiment).

    `assignment` maps model -> worker ids; without one, sorted workers are dealt round-robin to sorted models.
    """

    name = "partitioned"

    def __init__(self, models: list[str], assignment: dict[str, list[str]] | None = None) -> None:
        self.models = sorted(models)
        self.assignment = assignment

    def owners(self, model: str, worker_ids: list[str]) -> list[str]:
        if self.assignment is not None:
            return self.assignment.get(model, [])
        if model not in self.models:
            return []
        ids = sorted(worker_ids)
        m = len(self.models)
        i = self.models.index(model)
        # With fewer workers than models, models share workers round-robin (never refuse a known model).
        return [w for j, w in enumerate(ids) if j % m == i] or [ids[i % len(ids)]]

    def choose(self, model, workers):
        owners = set(self.owners(model, [w.worker_id for w in workers]))
        mine = [w for w in workers if w.worker_id in owners]
        if not mine:
            raise NoWorkerError(f"no live decode worker is assigned to model {model!r}")
        return min(mine, key=lambda w: (load_score(w), w.worker_id))


class RoundRobin(RouterPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, model, workers):
        ordered = sorted(workers, key=lambda w: w.worker_id)
        return ordered[next(self._counter) % len(ordered)]


POLICIES = ("sun", "partitioned", "round_robin")


def make_policy(
    name: str, models: list[str] | None = None, assignment: dict[str, list[str]] | None = None
) -> RouterPolicy:
    if name == "sun":
        return LeastLoaded()
    if name == "partitioned":
        return Partitioned(models or [], assignment)
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown router policy {name!r}; available: {', '.join(POLICIES)}")


class Placement:
    """The router's state: registered workers, their latest stats, and the policy. No Ray here."""

    def __init__(self, policy: RouterPolicy, stale_after_s: float = 10.0) -> None:
        self.policy = policy
        self.stale_after_s = stale_after_s
        self.workers: dict[str, WorkerStats] = {}
        self.handles: dict[str, Any] = {}

    def register(self, worker_id: str, handle: Any, kv_blocks_total: int = 1) -> None:
        self.workers[worker_id] = WorkerStats(
            worker_id, kv_blocks_total=kv_blocks_total, kv_blocks_free=kv_blocks_total
        )
        self.handles[worker_id] = handle

    def remove(self, worker_id: str) -> bool:
        self.handles.pop(worker_id, None)
        return self.workers.pop(worker_id, None) is not None

    def report(self, worker_id: str, stats: dict[str, Any]) -> bool:
        w = self.workers.get(worker_id)
        if w is None:
            return False  # removed (dead or drained): ignore late reports
        for k, v in stats.items():
            if hasattr(w, k) and k not in ("worker_id", "placed_since_report", "updated_at", "draining"):
                setattr(w, k, v)
        # One way: a report sent just before must not undo it.
        w.draining = w.draining or bool(stats.get("draining"))
        w.updated_at, w.placed_since_report = time.monotonic(), 0
        return True

    def live(self) -> list[WorkerStats]:
        now = time.monotonic()
        return [
            w for w in self.workers.values() if not w.draining and now - w.updated_at < self.stale_after_s
        ]

    def place(self, model: str) -> tuple[str, Any]:
        worker_id = self.place_many(model, 1)[0]
        return worker_id, self.handles[worker_id]

    def place_many(self, model: str, n: int) -> list[str]:
        """Worker ids for `n` requests of `model`, each placement counted before the next is chosen (so a batch
        spreads over the workers as the same requests placed one by one would)."""
        live = self.live()
        if not live:
            raise NoWorkerError("no live decode worker")
        chosen = []
        for _ in range(n):
            w = self.policy.choose(model, live)
            w.placed_since_report += 1
            chosen.append(w.worker_id)
        return chosen
