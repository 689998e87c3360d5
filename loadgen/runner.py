"""Drive a workload against a server: open loop (send at the spec's arrival times) or closed loop (N users, each
sending its next request when the last one ends), bounded in requests and time, with a progress bar on stderr.

Every request that was issued gets a record; one still running when the drain time runs out is cancelled and
recorded as 'cancelled', so issued = ok + refused + error + cancelled always holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence

import aiohttp

from loadgen.client import ClientConfig, send
from loadgen.metrics import RequestRecord
from loadgen.workload import RequestSpec


class Progress:
    """A one-line progress bar on stderr (a line every 10 s when stderr is not a terminal)."""

    def __init__(
        self, label: str, total: int, records: list[RequestRecord], enabled: bool = True, stream=None
    ) -> None:
        self.label, self.total, self.records, self.enabled = label, total, records, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_line = 0.0

    def line(self) -> str:
        counts = {"ok": 0, "refused": 0, "error": 0}
        running = 0
        for r in self.records:
            if r.end_s is None:
                running += 1
            elif r.status in counts:
                counts[r.status] += 1
        done = sum(counts.values())
        width = 24
        fill = int(width * done / self.total) if self.total else width
        return (
            f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
            f"ok {counts['ok']} refused {counts['refused']} err {counts['error']} running {running} "
            f"| {time.perf_counter() - self.t0:.1f} s"
        )

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self._last_line >= 10:
            self._last_line = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    async def loop(self, period: float = 0.25) -> None:
        while True:
            self.show()
            await asyncio.sleep(period)


async def run(
    specs: Sequence[RequestSpec],
    client: ClientConfig,
    *,
    concurrency: int | None = None,
    duration_s: float | None = None,
    max_concurrency: int | None = None,
    drain_timeout_s: float = 60.0,
    label: str = "run",
    progress: bool = True,
    records: list[RequestRecord] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send `specs`; returns (records in issue order, wall seconds from the start to the last record's end).

    concurrency None: open loop at each spec's arrival_s (at most `max_concurrency` in flight if given; the others
    wait and their send time shows the wait). concurrency N: closed loop with N users. duration_s: no request is
    issued after it. drain_timeout_s: how long to wait for requests still running once issuing has stopped.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    records = [] if records is None else records
    bar = Progress(label, len(specs), records, enabled=progress)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    def issue(spec: RequestSpec, scheduled_s: float) -> RequestRecord:
        rec = RequestRecord(
            spec.index,
            spec.model,
            scheduled_s=scheduled_s,
            prompt_len=spec.prompt_len,
            max_tokens=spec.output_len,
        )
        records.append(rec)
        return rec

    async def one(session, spec, rec):
        if sem is None:
            return await send(session, spec, client, t0, rec)
        async with sem:
            return await send(session, spec, client, t0, rec)

    def expired() -> bool:
        return duration_s is not None and time.perf_counter() - t0 >= duration_s

    bar_task = asyncio.create_task(bar.loop())
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            if concurrency is None:
                for spec in specs:
                    delay = spec.arrival_s - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if expired():
                        break
                    rec = issue(spec, spec.arrival_s)
                    tasks.append(asyncio.create_task(one(session, spec, rec)))
            else:
                queue = iter(specs)

                async def user():
                    for spec in queue:  # shared iterator: each spec goes to exactly one user
                        if expired():
                            return
                        await send(session, spec, client, t0, issue(spec, time.perf_counter() - t0))

                tasks = [asyncio.create_task(user()) for _ in range(concurrency)]
            if tasks:
                _, pending = await asyncio.wait(
                    tasks, timeout=_drain_deadline(t0, duration_s, drain_timeout_s)
                )
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bar_task
            bar.show(final=True)
    ends = [r.end_s for r in records if r.end_s is not None]
    return records, (max(ends) if ends else time.perf_counter() - t0)


def _drain_deadline(t0: float, duration_s: float | None, drain_timeout_s: float) -> float | None:
    """Seconds from now until in-flight requests are cancelled (None: wait for all when no duration bound)."""
    if duration_s is None:
        return None  # bounded by the number of requests and each request's own timeout
    return max(0.0, t0 + duration_s - time.perf_counter()) + drain_timeout_s
