"""Hand-offs are released on the replica that holds them, also when a model has several prefill replicas and a Serve
handle sends each call to any of them (sunray.serve.prefill.PendingReleases)."""

from __future__ import annotations

import asyncio
import random

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

    r._batched = batched
    return r


def test_with_four_replicas_almost_every_hand_off_is_released_by_the_calls_that_follow():
    rng = random.Random(0)
    replicas = [_replica() for _ in range(4)]
    releases = PendingReleases()

    async def traffic():
        for i in range(400):
            owner = rng.choice(replicas)  # the handle's choice for the prefill call
            await owner.prefill(f"r{i}", [1, 2, 3], None, releases.take())
            rng.choice(replicas).release(f"r{i}")  # the direct release: any replica
            releases.add(f"r{i}")
        for _ in range(40):  # later traffic carries the last releases
            await rng.choice(replicas).prefill("later", [1], None, releases.take())
            for r in replicas:
                r._held.pop("later", None)

    asyncio.run(traffic())
    held = sum(len(r._held) for r in replicas)
    assert held <= 400 * 0.75**12 * 3, held  # expected misses: 400 x (3/4)^12 = 12.7; without the rides: 300
