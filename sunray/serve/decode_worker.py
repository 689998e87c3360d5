"""The shared decode pool: each `DecodePool` replica (a Serve deployment) owns one `DecodeWorker` actor that
hosts a DecodeEngine with the frozen decode module.

Why an actor beside the replica: the router must send a request to one particular worker, and Serve handles
only reach a deployment, not a chosen replica. The worker is an async actor; its engine steps in a thread of its
own, so streams are served from the event loop while the forward pass runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sunray.engine.decode_engine import DecodeEngine, KVCapacityError
from sunray.engine.sequence import RequestOutput
from sunray.kv.handoff import KVHandoffError
from sunray.kv.transport import get_transport
from sunray.serve.config import DecodeArgs
from sunray.serve.gpu import gpu_utilization
from sunray.serve.loading import load_for_serving

log = logging.getLogger("sunray.decode")
REPORT_INTERVAL_S = 0.25
REPORT_TIMEOUT_S = 2.0  # a report unanswered this long is dropped (the next one goes to the live router)
DRAIN_TIMEOUT_S = 15.0  # a replica that Serve stops finishes its worker's requests for at most this long
# An idle stream still sends an empty list this often while the step thread is alive, so that an ingress tells a
# quiet worker (its requests wait for KV behind other ingresses' requests) from a hung one (streams.py).
HEARTBEAT_S = 2.0


class StepTimes:
    """Decode step wall times by batch size (power-of-two buckets), as the worker really ran them: the in-situ
    step-time profile that the simulator's offline one is held against (loadgen sim validate)."""

    def __init__(self) -> None:
        self._by_bucket: dict[int, list[float]] = {}  # bucket -> [steps, seconds, sequences]

    def add(self, batch: int, seconds: float) -> None:
        if batch <= 0:
            return
        acc = self._by_bucket.setdefault(1 << (batch.bit_length() - 1), [0, 0.0, 0])
        acc[0] += 1
        acc[1] += seconds
        acc[2] += batch

    def summary(self) -> dict[str, dict]:
        """{bucket: {steps, mean_ms, mean_batch}}, buckets as strings (the report crosses JSON and msgpack)."""
        return {
            str(b): {"steps": n, "mean_ms": round(1e3 * s / n, 3), "mean_batch": round(k / n, 2)}
            for b, (n, s, k) in sorted(self._by_bucket.items())
        }


class OverloadedError(RuntimeError):
    """The worker's waiting queue is full; the client should retry later."""


class Inbox:
    """What the event loop asks of the engine (add a request, abort one), applied by the step thread between
    steps: only that thread touches the engine. A lock around engine.step() instead starved the event loop, since
    the step thread takes it back the moment it lets go (an 8B model on an H100: one hand-off accepted per ~0.6 s).
    """

    def __init__(self) -> None:
        self._items: collections.deque[tuple[str, Any, concurrent.futures.Future]] = collections.deque()
        self.wake = threading.Event()

    def post(self, op: str, arg) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._items.append((op, arg, fut))
        self.wake.set()
        return fut

    def wait(self, timeout: float) -> None:
        self.wake.wait(timeout=timeout)
        self.wake.clear()

    def apply(self, engine) -> None:
        while self._items:
            op, arg, fut = self._items.popleft()
            # A caller that gave up (its client went away) cancelled the future: its add must not run (the
            # submit posts an abort after it), and no answer may be set (set_result would raise in this thread
            # and end it). An abort runs either way.
            if not fut.set_running_or_notify_cancel() and op == "add":
                continue
            try:
                result, error = (engine.add(arg) if op == "add" else engine.abort(arg)), None
            except Exception as e:  # noqa: BLE001 - the caller's error (a bad hand-off, no KV room)
                result, error = None, e
            if fut.cancelled():
                continue
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)


@ray.remote
class DecodeWorker:
    def __init__(self, worker_id: str, args: dict, router) -> None:
        self.worker_id, self.router = worker_id, router
        self.args = DecodeArgs.model_validate(args)
        self.lm = load_for_serving(self.args.decode_module, self.args, "decode")
        self.engine = DecodeEngine(self.lm, self.args.engine.engine_config(self.args.device))
        self.engine.capture_graphs()
        self.transport = get_transport(self.args.kv_transport, **self.args.kv_transport_options())
        self._inbox = Inbox()  # the event loop's adds and aborts; only the step thread touches the engine
        self._owner: dict[str, str] = {}  # request id -> the subscriber its outputs go to
        self._outboxes: dict[str, asyncio.Queue[list[RequestOutput]]] = {}  # subscriber -> its stream's queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.draining = False
        self._tokens = 0
        self._beats = 0  # step-loop iterations: advances at least every 0.5 s while the step thread lives
        self._step_times = StepTimes()

    async def start(self) -> dict:
        """Start stepping and reporting; register with the router. Returns this worker's description."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            threading.Thread(target=self._step_loop, name=f"decode-{self.worker_id}", daemon=True).start()
            await self._register()
            self._loop.create_task(self._report_loop())
        return self.info()

    async def _register(self) -> None:
        me = ray.get_runtime_context().current_actor
        await self.router.register.remote(
            self.worker_id, me, self.engine.blocks.num_blocks, self.lm.fingerprint.to_dict()
        )

    def info(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "fingerprint": self.lm.fingerprint.to_dict(),
            "kv_blocks": self.engine.blocks.num_blocks,
            "max_model_len": self.engine.max_model_len,
        }

    # -- requests in, outputs out --------------------------------------------------------------------------------
    # A subscriber (an ingress replica) submits requests one call each and reads the outputs of all of them from
    # one stream: one Ray object per step, not one per token and request. Each streamed object costs about 0.3 ms
    # of this process's time, so at batch 64 per-request streams took longer than the step
    # (`python -m sunray.serve.bench_worker` measures it).
    async def submit(self, payload, subscriber: str) -> str:
        """Take one request from its KV hand-off (as the transport delivers it); its outputs go to `subscriber`'s
        stream. Returns once the engine holds it: the prefill side may free its copy of the KV then."""
        if self.transport.blocking:  # nccl: the KV is pulled from the prefill worker's GPU now
            handoff = await asyncio.to_thread(self.transport.receive, payload)
        else:
            handoff = self.transport.receive(payload)
        rid = handoff.request_id
        # A draining worker still takes what the router placed here before it knew: drain() waits for it too.
        if len(self.engine.waiting) >= self.args.max_waiting_per_worker:
            raise OverloadedError(
                f"decode worker {self.worker_id} has {len(self.engine.waiting)} requests waiting"
            )
        self._outbox(subscriber)
        self._owner[rid] = subscriber
        try:
            # KVHandoffError / KVCapacityError go back to the caller as they are.
            await self._call("add", handoff)
        except BaseException:
            self._owner.pop(rid, None)
            self._post("abort", rid)  # cancelled while the add was queued: it must not run unowned
            raise
        return rid

    async def stream(self, subscriber: str):
        """Every output of `subscriber`'s requests, as lists: one per step, or all that piled up since the last
        item when the reader fell behind. When the reader goes away, its unfinished requests are aborted."""
        box = self._outbox(subscriber)
        try:
            while True:
                batch = await box.get()
                while not box.empty():
                    batch += box.get_nowait()
                yield batch
        finally:
            if self._outboxes.get(subscriber) is box:
                del self._outboxes[subscriber]
            for rid in [r for r, sub in self._owner.items() if sub == subscriber]:
                del self._owner[rid]
                self._post("abort", rid)

    def _outbox(self, subscriber: str) -> asyncio.Queue:
        box = self._outboxes.get(subscriber)
        if box is None:
            box = self._outboxes[subscriber] = asyncio.Queue()
        return box

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: one step's outputs to their subscribers' streams."""
        batches: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            sub = self._owner.get(out.request_id)
            if sub is None:  # aborted since the step
                continue
            if out.finished:
                del self._owner[out.request_id]
            batches.setdefault(sub, []).append(out)
        for sub, batch in batches.items():
            self._outbox(sub).put_nowait(batch)

    async def abort(self, request_id: str) -> bool:
        self._owner.pop(request_id, None)
        return await self._call("abort", request_id)

    # -- the step thread ------------------------------------------------------------------------------------------
    def _post(self, op: str, arg) -> concurrent.futures.Future:
        return self._inbox.post(op, arg)

    async def _call(self, op: str, arg):
        return await asyncio.wrap_future(self._post(op, arg))

    def _step_loop(self) -> None:
        while not self._stopped:
            self._beats += 1
            self._inbox.apply(self.engine)
            if not self.engine.has_unfinished():
                self._inbox.wait(timeout=0.5)
                continue
            batch, started = len(self.engine.running), time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception:  # a bug, not a request's fault: fail the running streams loudly, keep serving
                log.exception("decode step failed on worker %s", self.worker_id)
                outputs = self._fail_running()
            self._step_times.add(batch, time.perf_counter() - started)
            self._tokens += sum(len(o.new_token_ids) for o in outputs)
            if (
                outputs and self._loop is not None
            ):  # one wake-up of the event loop per step, not one per stream
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail_running(self) -> list[RequestOutput]:
        failed = [s.request_id for s in self.engine.running]
        return [o for rid in failed if self.engine.abort(rid) for o in self.engine.step()]

    # -- load reports and draining ----------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.engine.stats()
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_blocks_free": s.kv_blocks_free,
            "kv_blocks_total": self.engine.blocks.num_blocks,
            "gpu_utilization": gpu_utilization(),
            "draining": self.draining,
            "num_preemptions": s.num_preemptions,
            "tokens": self._tokens,
            "step_times": self._step_times.summary(),
        }

    async def _report_loop(self) -> None:
        from sunray.serve.metrics import decode_metrics

        m, tags = decode_metrics(), {"worker": self.worker_id}
        last_tokens, last_preempt = 0, 0
        beats, beat_at = self._beats, time.monotonic()
        while not self._stopped:
            if time.monotonic() - beat_at >= HEARTBEAT_S:
                if self._beats != beats:  # the step thread lives: quiet streams get an empty list
                    for box in self._outboxes.values():
                        if box.empty():
                            box.put_nowait([])
                beats, beat_at = self._beats, time.monotonic()
            s = self.stats()
            try:
                # bounded: a report sent to a router replica that just died may never be answered
                known = await asyncio.wait_for(self.router.report.remote(self.worker_id, s), REPORT_TIMEOUT_S)
                if not known and not self.draining:
                    await self._register()  # the router restarted (or was redeployed) and forgot us
            except Exception as e:  # the router is restarting: keep trying
                log.warning("stats report to the router failed: %s", e)
            m["batch_size"].set(s["num_running"], tags)
            m["queue_depth"].set(s["num_waiting"], tags)
            m["kv_free"].set(s["kv_blocks_free"], tags)
            m["kv_used"].set(s["kv_blocks_total"] - s["kv_blocks_free"], tags)
            if s["gpu_utilization"] is not None:
                m["gpu_util"].set(s["gpu_utilization"], tags)
            if s["tokens"] > last_tokens:
                m["tokens"].inc(s["tokens"] - last_tokens, tags)
            if s["num_preemptions"] > last_preempt:
                m["preemptions"].inc(s["num_preemptions"] - last_preempt, tags)
            last_tokens, last_preempt = s["tokens"], s["num_preemptions"]
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def drain(self, timeout_s: float = 60.0, settle_s: float = 2 * REPORT_INTERVAL_S) -> bool:
        """The router places nothing here from now on; finish every request, including one placed just before
        the router knew. True once the worker has been idle (no request, no undelivered output) for `settle_s`, False if
        that did not happen within the timeout."""
        self.draining = True
        with contextlib.suppress(Exception):  # the router may be going away too (the whole app is deleted)
            await asyncio.wait_for(self.router.report.remote(self.worker_id, self.stats()), 2)
        deadline, idle_since = time.monotonic() + timeout_s, None
        while (now := time.monotonic()) < deadline:
            if (
                self.engine.has_unfinished()
                or self._owner
                or any(not b.empty() for b in self._outboxes.values())
            ):
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= settle_s:
                return True
            await asyncio.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stopped = True
        self._inbox.wake.set()


# Stopping (scale-down, redeploy): Serve waits for the replica's own ongoing requests, which are none (traffic
# goes to the worker actor), so after one short wait loop it calls __del__, which drains the worker. Serve kills
# the replica (and with it the worker it owns) when __del__ returns, or graceful_shutdown_timeout_s after the stop.
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=5,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S + 10,
)
class DecodePool:
    """One replica = one decode worker. Scale the pool with num_replicas or autoscaling_config."""

    async def __init__(self, args: dict, router) -> None:
        self.args = DecodeArgs.model_validate(args)
        ctx = serve.get_replica_context()
        self.worker_id = f"decode-{ctx.replica_id.unique_id}"
        options = {"num_cpus": 0, **self.args.decode_worker_options}
        if not ray.util.get_current_placement_group():  # a worker that needs nothing: on this replica's node
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        self.worker = DecodeWorker.options(
            name=f"sunray-{self.worker_id}", max_concurrency=100_000, **options
        ).remote(self.worker_id, args, router)
        self.router = router
        self.info = await self.worker.start.remote()

    async def check_health(self) -> None:
        await self.worker.stats.remote()  # raises if the worker actor died: Serve then replaces this replica

    async def stats(self) -> dict:
        return await self.worker.stats.remote()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue depth for `sunray.serve.autoscaling.decode_queue_depth_policy` (traffic bypasses this replica)."""
        s = await self.worker.stats.remote()
        return {"queue_depth": float(s["num_running"] + s["num_waiting"])}

    async def __del__(self) -> None:
        # Draining: the router stops placing here at once; running requests finish (for at most DRAIN_TIMEOUT_S,
        # within graceful_shutdown_timeout_s), then the actor goes. Every call is bounded: when the whole app is
        # deleted the router goes too.
        try:
            if not await asyncio.wait_for(
                self.worker.drain.remote(timeout_s=DRAIN_TIMEOUT_S), DRAIN_TIMEOUT_S + 2
            ):
                log.warning(
                    "decode worker %s still had requests after %.0f s of draining",
                    self.worker_id,
                    DRAIN_TIMEOUT_S,
                )
            await asyncio.wait_for(self.router.remove.remote(self.worker_id), 2)
        except Exception as e:
            log.info("decode worker %s stopped without a full drain: %s", self.worker_id, type(e).__name__)
        finally:
            ray.kill(self.worker)


__all__ = ["DecodePool", "DecodeWorker", "OverloadedError", "KVHandoffError", "KVCapacityError"]
