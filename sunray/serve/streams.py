"""The ingress side of the decode workers' output streams.

A decode worker sends the outputs of every request one ingress replica placed on it down one Ray streaming call
(`DecodeWorker.stream`), a list per step; here one pump task per worker reads that stream and puts each output on
its request's queue. Why not a stream per request: each streamed Ray object costs the worker about 0.3 ms of its
own process, so per-request streams at batch 64 cost more than the step (`python -m sunray.serve.bench_worker`).

A failure of the stream (the worker died) reaches every request still open on it, as the exception itself on its
queue, so each request decides what to do (re-prefill elsewhere) exactly as it would for its own call. So does a
stall: a worker that holds open requests of this ingress but has sent nothing for `stall_timeout_s` (a running
worker sends a list every step) is treated as failed, so that no request waits on a hung worker without a bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

log = logging.getLogger("sunray.streams")


class DecodeStalledError(TimeoutError):
    """A decode worker held open requests but sent nothing for longer than the stall timeout."""


class _Pump:
    """One decode worker's stream, fanned out to per-request queues."""

    def __init__(self, worker_id: str, worker, subscriber: str) -> None:
        self.worker_id, self.worker, self.subscriber = worker_id, worker, subscriber
        self.queues: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None
        # The last item from the worker, or when the pump went from idle to busy.
        self.heard_at = time.monotonic()
        self.stalled = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"decode-stream-{worker_id}")

    def add(self, request_id: str) -> asyncio.Queue:
        if not self.queues:  # idle until now: the stall clock starts here, not at the last item of long ago
            self.heard_at = time.monotonic()
        q = self.queues[request_id] = asyncio.Queue()
        return q

    def stall(self) -> None:
        self.stalled = True
        self.task.cancel()

    @property
    def closed(self) -> bool:
        return self.error is not None or self.task.done()

    async def _run(self) -> None:
        try:
            async for ref in self.worker.stream.options(num_returns="streaming").remote(self.subscriber):
                self.heard_at = time.monotonic()
                for out in await ref:
                    q = self.queues.get(out.request_id)
                    if q is None:  # its request gave up (client gone) after the step
                        continue
                    if out.finished:
                        del self.queues[out.request_id]
                    q.put_nowait(out)
            raise ConnectionError(f"decode worker {self.worker_id} closed its output stream")
        except BaseException as exc:  # noqa: BLE001 - every open request must hear of it, cancellation included
            err = (
                DecodeStalledError(f"decode worker {self.worker_id} sent nothing for too long")
                if self.stalled
                else exc
            )
            self.error = err
            if not isinstance(err, asyncio.CancelledError):
                log.warning("output stream of decode worker %s ended: %s", self.worker_id, type(err).__name__)
            for q in self.queues.values():
                q.put_nowait(err)
            self.queues.clear()
            if isinstance(exc, asyncio.CancelledError):
                raise


class DecodeStreams:
    """One ingress replica's output streams from the decode workers it has placed requests on."""

    def __init__(self, stall_timeout_s: float = 30.0) -> None:
        self.subscriber = f"ingress-{uuid.uuid4().hex[:12]}"
        self._streams = 0
        self.stall_timeout_s = stall_timeout_s
        self._pumps: dict[str, _Pump] = {}
        self._watchdog: asyncio.Task | None = None

    async def _watch(self) -> None:
        """Fail the pumps of workers that hold open requests but have gone quiet for stall_timeout_s."""
        while True:
            await asyncio.sleep(self.stall_timeout_s / 4)
            now = time.monotonic()
            for pump in list(self._pumps.values()):
                if pump.queues and not pump.closed and now - pump.heard_at > self.stall_timeout_s:
                    log.warning(
                        "decode worker %s: nothing for %.0f s; failing its streams",
                        pump.worker_id,
                        now - pump.heard_at,
                    )
                    pump.stall()

    async def submit(self, worker_id: str, worker, payload, request_id: str) -> asyncio.Queue:
        """Hand one request to a decode worker; returns the queue its outputs (or the stream's failure) arrive on.
        Raises what the worker's submit raises (overloaded, a bad hand-off, the worker's death)."""
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(), name="decode-stream-watchdog"
            )
        pump = self._pumps.get(worker_id)
        if pump is None or pump.closed:
            for wid in [w for w, p in self._pumps.items() if p.closed]:  # dead workers' ids never come back
                del self._pumps[wid]
            # A subscriber name per stream, not per ingress: a stream given up on (stalled) may linger in the
            # worker a while; it must neither take the new stream's outputs nor abort its requests when it ends.
            self._streams += 1
            pump = self._pumps[worker_id] = _Pump(worker_id, worker, f"{self.subscriber}-{self._streams}")
        # Registered before the call: the first outputs may come down the stream before submit's answer.
        q = pump.add(request_id)
        call = asyncio.ensure_future(worker.submit.remote(payload, pump.subscriber))
        try:
            # A worker that hangs never answers the submit either: its stream's failure (the stall watchdog's, or
            # its death) ends the wait, so that no request waits on a hung worker without a bound.
            await asyncio.wait({call, pump.task}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.cancel()
                raise pump.error or ConnectionError(f"decode worker {worker_id} closed its output stream")
            call.result()
        except BaseException:
            pump.queues.pop(request_id, None)
            if not call.done():
                call.cancel()
            raise
        return q

    def forget(self, worker_id: str, request_id: str) -> None:
        """The request ended early (client gone, error): drop its queue; the caller aborts it on the worker."""
        pump = self._pumps.get(worker_id)
        if pump is not None:
            pump.queues.pop(request_id, None)

    def close(self) -> None:
        for pump in self._pumps.values():
            pump.task.cancel()
        self._pumps.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
