"""The ingress side of the decode workers' output streams.

A decode worker sends the outputs of every request one ingress replica placed on it down one Ray streaming call
(`DecodeWorker.stream`), a list per step; here one pump task per worker reads that stream and puts each output on
its request's queue. Why not a stream per request: each streamed Ray object costs the worker about 0.3 ms of its
own process, so per-request streams at batch 64 cost more than the step (`python -m sunray.serve.bench_worker`).

A failure of the stream (the worker died) reaches every request still open on it, as the exception itself on its
queue, so each request decides what to do (re-prefill elsewhere) exactly as it would for its own call.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

log = logging.getLogger("sunray.streams")


class _Pump:
    """One decode worker's stream, fanned out to per-request queues."""

    def __init__(self, worker_id: str, worker, subscriber: str) -> None:
        self.worker_id, self.worker, self.subscriber = worker_id, worker, subscriber
        self.queues: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"decode-stream-{worker_id}")

    @property
    def closed(self) -> bool:
        return self.error is not None or self.task.done()

    async def _run(self) -> None:
        try:
            async for ref in self.worker.stream.options(num_returns="streaming").remote(self.subscriber):
                for out in await ref:
                    q = self.queues.get(out.request_id)
                    if q is None:  # its request gave up (client gone) after the step
                        continue
                    if out.finished:
                        del self.queues[out.request_id]
                    q.put_nowait(out)
            raise ConnectionError(f"decode worker {self.worker_id} closed its output stream")
        except BaseException as e:  # noqa: BLE001 - every open request must hear of it, cancellation included
            self.error = e
            if not isinstance(e, asyncio.CancelledError):
                log.warning("output stream of decode worker %s ended: %s", self.worker_id, type(e).__name__)
            for q in self.queues.values():
                q.put_nowait(e)
            self.queues.clear()
            if isinstance(e, asyncio.CancelledError):
                raise


class DecodeStreams:
    """One ingress replica's output streams from the decode workers it has placed requests on."""

    def __init__(self) -> None:
        self.subscriber = f"ingress-{uuid.uuid4().hex[:12]}"
        self._pumps: dict[str, _Pump] = {}

    async def submit(self, worker_id: str, worker, payload, request_id: str) -> asyncio.Queue:
        """Hand one request to a decode worker; returns the queue its outputs (or the stream's failure) arrive on.
        Raises what the worker's submit raises (overloaded, a bad hand-off, the worker's death)."""
        pump = self._pumps.get(worker_id)
        if pump is None or pump.closed:
            for wid in [w for w, p in self._pumps.items() if p.closed]:  # dead workers' ids never come back
                del self._pumps[wid]
            pump = self._pumps[worker_id] = _Pump(worker_id, worker, self.subscriber)
        # Registered before the call: the first outputs may come down the stream before submit's answer.
        q = pump.queues[request_id] = asyncio.Queue()
        try:
            await worker.submit.remote(payload, self.subscriber)
        except BaseException:
            pump.queues.pop(request_id, None)
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
