"""A task model's prefill deployment: its prefill module behind Serve, batching concurrent prompts."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import ray
from ray import serve

from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest
from sunray.engine.sequence import SamplingParams
from sunray.kv.transport import get_transport
from sunray.models.fingerprint import Fingerprint
from sunray.serve.config import DecodeArgs
from sunray.serve.loading import load_for_serving

log = logging.getLogger("sunray.prefill")
DECODE_WAIT_S = 300.0
HOLD_S = 60.0
# Past the engine's end, how long a batch waits for its placement (else the ingress places).
PLACE_WAIT_S = 1.0
# Serve's batching of prefill calls: up to 16 prompts per engine call, gathered for at most 5 ms.
BATCH_MAX_SIZE = 16
BATCH_WAIT_S = 0.005


class PendingReleases:
    """The ingress's side of releasing hand-offs. A Serve handle sends each call to any replica of a model's prefill
    deployment, not to the one that made (and holds) the hand-off, so a `release` call of its own would reach the
    owner only 1/N of the time, and it would cost a Serve call per request (about 2 ms of the ingress's CPU). Each
    release instead rides along with the model's next `repeats` prefill calls, which land on replicas
    independently: with N replicas the owner misses all of them with probability (1 - 1/N)^repeats (3% for N = 4
    at 12), and HOLD_S stays the bound for those. Rides are free: a few request ids on a call that goes anyway. A
    model whose traffic stopped gets its releases sent alone (`release_many`), once a second at most, by the
    ingress (`Ingress._flush_releases`)."""

    def __init__(self, repeats: int = 12, limit: int = 512) -> None:
        self.repeats = repeats
        self._left: collections.OrderedDict[str, int] = collections.OrderedDict()  # request id -> rides left
        self.limit = limit  # ids kept at most (the oldest go first; HOLD_S frees what they would have)
        # The last ride: a model without traffic gets its releases sent alone.
        self.taken_at = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self._left)

    def add(self, request_id: str) -> None:
        self._left[request_id] = self.repeats
        while len(self._left) > self.limit:
            self._left.popitem(last=False)

    def take(self) -> list[str]:
        """The ids to send with one prefill call (each one ride fewer)."""
        self.taken_at = time.monotonic()
        ids = list(self._left)
        for rid in ids:
            self._left[rid] -= 1
            if self._left[rid] <= 0:
                del self._left[rid]
        return ids


class IncompatiblePrefillModule(ValueError):
    """The prefill module writes KV for another base than the decode pool serves."""


# Health checked every 2 s (Serve's default is 10 s): a dead replica is noticed and replaced sooner, and the
# requests of its model wait (prefill_timeout_s at most) for the new one. No access log: its only caller is the
# ingress, which logs each request once.
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    health_check_period_s=2,
    logging_config={"enable_access_log": False},
)
class PrefillServer:
    async def __init__(self, model_name: str, prefill_module: str, args: dict, decode_app: str) -> None:
        self.name = model_name
        self.args = DecodeArgs.model_validate(args)
        self.lm = await asyncio.to_thread(load_for_serving, prefill_module, self.args, "prefill")
        self.engine = PrefillEngine(self.lm, self.args.engine.engine_config(), name=model_name)
        started = time.monotonic()
        tokens = await asyncio.to_thread(self.engine.warm_up)
        log.info(
            "%s: warmed up on %d made-up tokens in %.2f s", model_name, tokens, time.monotonic() - started
        )
        self.router = serve.get_deployment_handle("Router", app_name=decode_app)
        await self._check_base(self.router, prefill_module)
        self._arrived: dict[str, float] = {}  # request id -> when its call reached this replica
        # This replica owns each hand-off's object; Ray may drop an object whose only reference left through a
        # Serve response, so keep it until the ingress says the decode worker has it (or a minute has passed).
        self._held: dict[str, tuple[float, object]] = {}
        self.transport = get_transport(self.args.kv_transport, **self.args.kv_transport_options())

    async def _check_base(self, router, prefill_module: str) -> None:
        """Refuse to start when the decode pool serves another base (fingerprint), with the difference named."""
        deadline = time.monotonic() + DECODE_WAIT_S
        decode = await router.decode_fingerprint.remote()
        while decode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            decode = await router.decode_fingerprint.remote()
        if decode is None:
            raise RuntimeError(f"no decode worker registered within {DECODE_WAIT_S:.0f} s")
        theirs = Fingerprint.from_dict(decode)
        if theirs != self.lm.fingerprint:
            diff = "; ".join(self.lm.fingerprint.differences(theirs))
            raise IncompatiblePrefillModule(
                f"prefill module {prefill_module!r} of model {self.name!r} was built for base "
                f"{self.lm.fingerprint.digest}, the decode pool serves {theirs.digest} ({diff})"
            )

    def info(self) -> dict:
        manifest = self.lm.manifest or {}
        return {
            "name": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "fingerprint": self.lm.fingerprint.to_dict(),
            "max_model_len": self.engine.max_model_len,
            "method": manifest.get("method", "base"),
            "task": manifest.get("task"),
        }

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        released: list[str] | tuple[str, ...] = (),
    ) -> dict:
        """First token and the prompt KV (as an object-store ref to the wire format, or None if finished), the
        decode worker the router chose for it (`placement`: a worker id, or None when the ingress must ask the
        router itself), and the time this request spent in each stage here (`stages`: queue, engine, send, and
        the batch it ran in). The ingress, this deployment's only caller, has validated the prompt and the sampling
        parameters. `released`: hand-offs that decode workers have read, of whichever replica holds them
        (PendingReleases)."""
        self.release_many(released)
        self._arrived[request_id] = time.monotonic()
        return await self._placed(await self._batched(PrefillRequest(request_id, prompt_token_ids, sampling)))

    def release(self, request_id: str) -> None:
        """The decode worker has read this request's hand-off: its object may go."""
        self.release_many((request_id,))

    def release_many(self, request_ids: list[str] | tuple[str, ...]) -> None:
        """Those hand-offs have been read (by whichever replica made them); and any held past HOLD_S go too."""
        for rid in request_ids:
            self._held.pop(rid, None)
        now = time.monotonic()
        for rid in [r for r, (t, _) in self._held.items() if now - t > HOLD_S]:
            del self._held[rid]

    @serve.batch(max_batch_size=BATCH_MAX_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, requests: list[PrefillRequest]) -> list[dict]:
        """Run one batch and send its hand-offs. Each result's placement is still being asked for (`_placed`
        waits for it): the batch returns without it, so that a slow router answer holds up this batch's requests
        only, not the next batch, which Serve starts only when this call returns."""
        started = time.monotonic()
        # The batch's decode placements are asked for now and answered while the GPU runs the batch: one router
        # call per batch instead of one per request from the ingress, and off the request's critical path. A
        # request that ends at its first token (EOS) leaves one placement unused; the worker's next report (0.25 s)
        # corrects the router's count.
        placing = self._place([r for r in requests if r.sampling is None or r.sampling.max_tokens > 1])
        results = await asyncio.to_thread(self.engine.prefill, requests)
        done = time.monotonic()
        out = [{"output": r.output, "handoff": self._send(r.handoff) if r.handoff else None} for r in results]
        sent = time.monotonic()  # every caller of the batch gets its answer now, after all the sends
        placements = asyncio.ensure_future(self._placements(placing))
        index = 0  # the batch's placements go, in order, to the requests that have a hand-off
        for o in out:
            arrived = self._arrived.pop(o["output"].request_id, started)
            o["stages"] = {"queue": started - arrived, "engine": done - started, "send": sent - done}
            o["batch"] = len(requests)
            o["_placing"] = (placements, index if o["handoff"] is not None else None, sent)
            index += o["handoff"] is not None
        return out

    async def _placed(self, out: dict) -> dict:
        """`out` with its `placement` (a worker id, or None: the ingress places) and its `place` stage: the wait for
        the router's answer beyond the engine and the sends (none when it came in time)."""
        placements, index, sent = out.pop("_placing")
        # shield: a caller that goes away must not cancel the batch's one wait, which the others share
        workers = await asyncio.shield(placements)
        out["placement"] = workers[index] if index is not None and index < len(workers) else None
        out["stages"]["place"] = time.monotonic() - sent
        return out

    def _place(self, requests: list[PrefillRequest]) -> asyncio.Future | None:
        if not requests:
            return None
        return asyncio.ensure_future(self.router.place_many.remote(self.name, len(requests)))

    async def _placements(self, placing: asyncio.Future | None) -> list[str]:
        """The batch's worker ids, or none: a router that is slow, restarting or has no worker leaves placement to
        the ingress, which waits for one with its own bounds (ingress.PLACE_WAIT_S)."""
        if placing is None:
            return []
        try:
            return await asyncio.wait_for(placing, PLACE_WAIT_S)
        except Exception as e:  # NoWorkerError, a dead router replica, a timeout
            # A warning: the batch's requests have waited up to PLACE_WAIT_S (the batches after it have not).
            log.warning(
                "%s: no placement for a batch (%s); the ingress places it", self.name, type(e).__name__
            )
            return []

    def _send(self, handoff):
        ref = self.transport.send(handoff)
        # cuda_ipc: the tensor must outlive the handle
        self._held[handoff.request_id] = (time.monotonic(), (ref, handoff))
        return ref
