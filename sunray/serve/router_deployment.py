"""The central router as a one-replica Serve deployment over `Placement` (router.py)."""

from __future__ import annotations

import logging
import time

from ray import serve

from sunray.serve.router import NoWorkerError, Placement, make_policy

log = logging.getLogger("sunray.router")


# Access logs off: every worker reports several times a second. Health checked every second with a 5 s timeout
# (Serve's defaults: 10 s and 30 s): Serve notices a dead replica at its next check and replaces a hung one after
# three missed checks; placements wait for the replacement (ingress PLACE_WAIT_S).
@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},
    health_check_period_s=1,
    health_check_timeout_s=5,
)
class Router:
    def __init__(self, policy: str, models: list[str], partition: dict[str, list[int]] | None = None) -> None:
        self.policy_name = policy
        self.partition = partition  # model -> worker indices, resolved against registration order
        self.placement = Placement(make_policy(policy, models, {} if partition else None))
        self.order: list[str] = []  # worker ids in registration order (partition indices refer to it)
        self.fingerprint: dict | None = None

    def _resolve_partition(self) -> None:
        if self.partition is None:
            return
        self.placement.policy.assignment = {
            model: [self.order[i] for i in idx if i < len(self.order)]
            for model, idx in self.partition.items()
        }

    async def register(
        self, worker_id: str, handle, kv_blocks_total: int, fingerprint: dict | None = None
    ) -> None:
        if fingerprint is not None:
            if self.fingerprint is not None and fingerprint != self.fingerprint:
                raise ValueError(
                    f"decode worker {worker_id} serves another base ({fingerprint}) than the pool ({self.fingerprint})"
                )
            self.fingerprint = fingerprint
        self.placement.register(worker_id, handle, kv_blocks_total)
        if worker_id not in self.order:
            self.order.append(worker_id)
        self._resolve_partition()
        log.info("decode worker %s registered (%d live)", worker_id, len(self.placement.workers))

    async def report(self, worker_id: str, stats: dict) -> bool:
        return self.placement.report(worker_id, stats)

    async def remove(self, worker_id: str) -> bool:
        """A dead or drained worker: no placement goes there from now on."""
        removed = self.placement.remove(worker_id)
        if removed:
            log.warning("decode worker %s removed", worker_id)
        return removed

    async def place(self, model: str):
        """(worker id, actor handle) for one request of `model`; raises NoWorkerError when none may take it."""
        worker_id = self._place(model, 1)[0]
        return worker_id, self.placement.handles[worker_id]

    async def place_many(self, model: str, n: int) -> list[str]:
        """Worker ids for `n` requests of `model`: a prefill replica places its batch in one call, while the batch
        runs (sunray.serve.prefill), so that placement costs neither the ingress a call nor the request time."""
        return self._place(model, n)

    async def worker_handle(self, worker_id: str):
        """The actor handle of a registered worker (None once removed); the ingress caches it by id."""
        return self.placement.handles.get(worker_id)

    def _place(self, model: str, n: int) -> list[str]:
        from sunray.serve.metrics import router_metrics

        m = router_metrics()
        t = time.perf_counter()
        try:
            chosen = self.placement.place_many(model, n)
        except NoWorkerError:
            m["refusals"].inc(n, {"policy": self.policy_name})
            raise
        m["latency"].observe(time.perf_counter() - t, {"policy": self.policy_name})
        for worker_id in set(chosen):
            tags = {"worker": worker_id, "policy": self.policy_name, "model": model}
            m["placements"].inc(chosen.count(worker_id), tags)
        return chosen

    async def decode_fingerprint(self) -> dict | None:
        return self.fingerprint

    async def status(self) -> dict:
        return {
            "policy": self.policy_name,
            "workers": {
                w.worker_id: {
                    "queue_depth": w.queue_depth,
                    "kv_blocks_free": w.kv_blocks_free,
                    "kv_blocks_total": w.kv_blocks_total,
                    "gpu_utilization": w.gpu_utilization,
                    "draining": w.draining,
                    "step_times": w.step_times,
                }
                for w in self.placement.workers.values()
            },
            "live": [w.worker_id for w in self.placement.live()],
        }
