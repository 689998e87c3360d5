"""Hand-offs are released on the replica that holds them, also when a model has several prefill replicas and a Serve
handle sends each call to any of them (sunray.serve.prefill.PendingReleases); a prefill batch gets its decode
placements from the router in one call, while it runs (PrefillServer._batched)."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import pytest
from ray import cloudpickle, serve

from sunray.engine.prefill_engine import PrefillRequest
from sunray.engine.sequence import SamplingParams
from sunray.serve import prefill
from sunray.serve.prefill import PendingReleases, PrefillServer


def test_each_release_rides_a_bounded_number_of_calls():
    p = PendingReleases(repeats=3)
    p.add("a")
    assert p.take() == ["a"]
    p.add("b")
    assert p.take() == ["a", "b"] and p.take() == ["a", "b"] and p.take() == ["b"] and p.take() == []


def test_the_oldest_ids_go_first_past_the_limit():
    p = PendingReleases(repeats=5, limit=2)
    for rid in "abc":
        p.add(rid)
    assert p.take() == ["b", "c"]


def _replica():
    """A PrefillServer without a model: `prefill` up to the engine, whose batch is stubbed."""
    r = object.__new__(PrefillServer.func_or_class)
    r._held, r._arrived = {}, {}

    async def batched(req):
        r._held[req.request_id] = (0.0, None)  # as _send does: this replica holds the hand-off
        return {"request_id": req.request_id}

    async def placed(out):
        return out

    r._batched, r._placed = batched, placed
    return r


def test_with_four_replicas_almost_every_hand_off_is_released_by_the_calls_that_follow():
    rng = random.Random(0)
    replicas = [_replica() for _ in range(4)]
    releases = PendingReleases()

    async def traffic():
        for i in range(400):
            owner = rng.choice(replicas)  # the handle's choice for the prefill call
            await owner.prefill(f"r{i}", [1, 2, 3], None, releases.take())
            releases.add(f"r{i}")  # no release call of its own: it rides along with the next calls
        for _ in range(40):  # later traffic carries the last releases
            await rng.choice(replicas).prefill("later", [1], None, releases.take())
            for r in replicas:
                r._held.pop("later", None)

    asyncio.run(traffic())
    held = sum(len(r._held) for r in replicas)
    assert held <= 400 * 0.75**12 * 3, held  # expected misses: 400 x (3/4)^12 = 12.7; one direct release: 300


def test_a_model_without_traffic_still_has_its_releases_sent():
    p = PendingReleases(repeats=2)
    p.add("a")
    assert p and p.take() == ["a"] and p.take() == ["a"] and not p  # Ingress._flush_releases sends while p


def test_hand_offs_held_past_the_bound_go_at_any_call():
    r = _replica()
    r._held = {"old": (time.monotonic() - prefill.HOLD_S - 1, None), "new": (time.monotonic(), None)}
    r.release_many([])
    assert list(r._held) == ["new"]


class _Router:
    """A Router deployment handle's stand-in: place_many answers after `delay_s`, or raises `error`."""

    def __init__(self, delay_s=0.0, error=None):
        self.calls, self.delay_s, self.error = [], delay_s, error
        self.place_many = SimpleNamespace(remote=self._place_many)

    async def _place_many(self, model, n):
        self.calls.append((model, n))
        await asyncio.sleep(self.delay_s)
        if self.error:
            raise self.error
        return [f"w{i}" for i in range(n)]


class _Replica(PrefillServer.func_or_class):
    """The replica class with a batch queue of its own: Serve's batching makes that queue on first use and keeps
    it on the function, and a class whose queue was made cannot be pickled, so calling the real class's
    `_batched` here would break every later deployment of PrefillServer in this session."""

    _batched = serve.batch(max_batch_size=prefill.BATCH_MAX_SIZE, batch_wait_timeout_s=prefill.BATCH_WAIT_S)(
        PrefillServer.func_or_class._batched.__wrapped__
    )


def _batching_replica(router, ends_at_first_token=()):
    """A PrefillServer whose engine is stubbed: each request gets a hand-off unless it ends at its first token
    (max_tokens 1, or named in ends_at_first_token as an EOS would)."""
    r = object.__new__(_Replica)
    r.name, r.router, r._held, r._arrived = "m", router, {}, {}

    def engine_prefill(requests):
        time.sleep(0.02)  # the GPU's time, during which the placement is answered
        return [
            SimpleNamespace(
                output=SimpleNamespace(request_id=q.request_id),
                handoff=None
                if q.request_id in ends_at_first_token or q.sampling.max_tokens == 1
                else SimpleNamespace(request_id=q.request_id),
            )
            for q in requests
        ]

    r.engine = SimpleNamespace(prefill=engine_prefill)
    r.transport = SimpleNamespace(send=lambda h: f"ref-{h.request_id}")
    return r


async def _run_batch(r, requests):
    """One batch through the replica's batch function (without Serve's batching), each result then placed."""
    out = await PrefillServer.func_or_class._batched.__wrapped__(r, requests)
    return [await r._placed(o) for o in out]


def _requests(n, max_tokens=8):
    return [PrefillRequest(f"r{i}", [1, 2], SamplingParams(max_tokens=max_tokens)) for i in range(n)]


def test_a_batch_is_placed_in_one_router_call_that_overlaps_the_engine():
    router = _Router(delay_s=0.01)
    r = _batching_replica(router, ends_at_first_token={"r1"})
    reqs = _requests(3) + [PrefillRequest("one", [1], SamplingParams(max_tokens=1))]
    out = asyncio.run(_run_batch(r, reqs))
    assert router.calls == [("m", 3)]  # max_tokens=1 needs no decode worker
    assert [o["placement"] for o in out] == ["w0", None, "w1", None]  # r1 ended at its first token
    assert all(o["stages"]["place"] < 0.005 for o in out)  # answered while the engine ran


@pytest.mark.parametrize("router", [_Router(error=RuntimeError("no live decode worker")), _Router(delay_s=5)])
def test_a_router_that_fails_or_is_slow_leaves_placement_to_the_ingress(router, monkeypatch):
    monkeypatch.setattr(prefill, "PLACE_WAIT_S", 0.05)
    out = asyncio.run(_run_batch(_batching_replica(router), _requests(2)))
    assert [o["placement"] for o in out] == [None, None] and all(o["handoff"] for o in out)


def test_a_slow_placement_holds_up_its_own_batch_only(monkeypatch):
    """Serve starts a replica's next batch only when the last one's call returns: the batch returns before its
    placements come, so the next batch's engine runs while the first one's requests wait for the router."""
    from ray.serve import batching

    monkeypatch.setattr(prefill, "PLACE_WAIT_S", 0.6)
    # Serve's batching outside a replica: it only reads the replica's max_ongoing_requests (to warn).
    config = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
    monkeypatch.setattr(batching.serve, "get_replica_context", lambda: config)
    router = _Router()
    delays = iter([0.4, 0.0])  # the first batch's router call is slow, the second's is not
    answer = router._place_many

    async def place_many(model, n):
        await asyncio.sleep(next(delays))
        return await answer(model, n)

    router.place_many = SimpleNamespace(remote=place_many)
    r = _batching_replica(router)
    engine_prefill, engine_starts = r.engine.prefill, []
    r.engine = SimpleNamespace(
        prefill=lambda reqs: engine_starts.append(time.monotonic()) or engine_prefill(reqs)
    )
    sampling = SamplingParams(max_tokens=8)

    async def traffic():
        t0 = time.monotonic()
        first = asyncio.ensure_future(r.prefill("a", [1, 2], sampling))
        await asyncio.sleep(0.1)  # past the first batch's engine (20 ms) and its batching wait (5 ms)
        second = await r.prefill("b", [1, 2], sampling)
        second_done = time.monotonic() - t0
        return await first, second, second_done, [t - t0 for t in engine_starts]

    first, second, second_done, starts = asyncio.run(traffic())
    assert first["placement"] == "w0" and first["stages"]["place"] > 0.3  # its own wait for the slow router
    assert second["placement"] == "w0" and second["stages"]["place"] < 0.05
    assert len(starts) == 2 and starts[1] < 0.2 and second_done < 0.3  # not behind the first batch's 0.4 s
    cloudpickle.dumps(PrefillServer.func_or_class)  # still deployable: the batching above used its own queue
