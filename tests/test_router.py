"""Router policies and placement state, without Ray."""

from __future__ import annotations

import collections
import time
from types import SimpleNamespace

import pytest

from sunray.serve.autoscaling import decode_queue_depth_policy, desired_workers
from sunray.serve.config import AppArgs, DecodeAppArgs
from sunray.serve.router import LeastLoaded, NoWorkerError, Partitioned, Placement, make_policy


def _placement(policy, n=3, kv=100):
    p = Placement(policy)
    for i in range(n):
        p.register(f"w{i}", handle=f"handle-{i}", kv_blocks_total=kv)
    return p


def test_sun_policy_balances_any_model_across_workers():
    p = _placement(LeastLoaded())
    counts = collections.Counter(p.place(model)[0] for model in ["a"] * 30 + ["b"] * 3)
    # Placements between reports count against a worker, so a burst spreads evenly.
    assert sorted(counts.values()) == [11, 11, 11]


def test_a_batch_placed_in_one_call_spreads_as_one_by_one_placements_would():
    one_by_one, batched = _placement(LeastLoaded()), _placement(LeastLoaded())
    for p in (one_by_one, batched):
        p.report("w0", {"num_running": 4, "kv_blocks_free": 100})
    assert batched.place_many("m", 7) == [one_by_one.place("m")[0] for _ in range(7)]
    assert collections.Counter(batched.place_many("m", 3)) == {"w1": 1, "w2": 1, "w0": 1}
    partitioned = _placement(Partitioned(["a", "b"]), n=4)
    assert set(partitioned.place_many("b", 6)) == {"w1", "w3"}
    with pytest.raises(NoWorkerError):
        Placement(LeastLoaded()).place_many("m", 2)


def test_sun_policy_prefers_short_queues_then_free_kv_then_idle_gpu():
    p = _placement(LeastLoaded())
    p.report("w0", {"num_running": 5, "kv_blocks_free": 100})
    p.report("w1", {"num_running": 1, "kv_blocks_free": 10})
    p.report("w2", {"num_running": 1, "kv_blocks_free": 90})
    assert p.place("m")[0] == "w2"
    p.report("w2", {"num_running": 1, "kv_blocks_free": 10, "gpu_utilization": 95.0})
    p.report("w1", {"num_running": 1, "kv_blocks_free": 10, "gpu_utilization": 10.0})
    assert p.place("m")[0] == "w1"


def test_unknown_gpu_utilization_falls_back_to_queue_depth():
    p = _placement(LeastLoaded())
    for w, depth in (("w0", 4), ("w1", 2), ("w2", 3)):
        p.report(w, {"num_running": depth, "kv_blocks_free": 100, "gpu_utilization": None})
    assert p.place("m") == ("w1", "handle-1")


def test_partitioned_pins_each_model_to_its_workers():
    policy = Partitioned(["a", "b", "c"])
    p = _placement(policy, n=6)
    seen = collections.defaultdict(set)
    for _ in range(12):
        for m in "abc":
            seen[m].add(p.place(m)[0])
    assert seen == {"a": {"w0", "w3"}, "b": {"w1", "w4"}, "c": {"w2", "w5"}}
    with pytest.raises(NoWorkerError, match="'zzz'"):
        p.place("zzz")


def test_partitioned_with_explicit_assignment_and_a_dead_owner():
    p = _placement(Partitioned(["a", "b"], {"a": ["w0"], "b": ["w1", "w2"]}))
    assert {p.place("b")[0] for _ in range(4)} == {"w1", "w2"}
    p.remove("w0")
    with pytest.raises(NoWorkerError):
        p.place("a")


def test_round_robin_and_unknown_policy():
    p = _placement(make_policy("round_robin"))
    assert [p.place("m")[0] for _ in range(4)] == ["w0", "w1", "w2", "w0"]
    with pytest.raises(ValueError, match="unknown router policy 'fastest'"):
        make_policy("fastest")


def test_dead_draining_and_silent_workers_get_nothing():
    p = _placement(LeastLoaded(), n=3)
    p.remove("w0")
    p.report("w1", {"draining": True})
    p.report("w1", {"draining": False})  # a report sent just before the drain began, arriving after it
    assert {p.place("m")[0] for _ in range(5)} == {"w2"}
    assert p.report("w0", {"num_running": 0}) is False  # a late report from a removed worker is ignored
    p.workers["w2"].updated_at = time.monotonic() - 60  # no report for a minute
    with pytest.raises(NoWorkerError):
        p.place("m")


def test_decode_autoscaling_sizes_the_pool_on_queue_depth():
    assert desired_workers(0, 16, 1, 8) == 1
    assert desired_workers(17, 16, 1, 8) == 2
    assert desired_workers(1000, 16, 1, 8) == 8
    assert desired_workers(3, 16, 2, 8) == 2


def test_decode_policy_lets_serve_shrink_the_pool():
    """Serve wraps a custom policy with its own upscale/downscale delays. The policy used to hold a smaller answer
    back for downscale_delay_s itself and then answer "unchanged" again, which restarted Serve's delay every time:
    the pool never shrank."""
    wrap = getattr(pytest.importorskip("ray.serve.autoscaling_policy"), "_apply_autoscaling_config", None)
    if wrap is None:
        pytest.skip("this Ray applies no autoscaling delays to custom policies")
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(
        min_replicas=1, max_replicas=2, target_ongoing_requests=4, upscale_delay_s=0, downscale_delay_s=0.3
    )
    policy, state, target = wrap(decode_queue_depth_policy), {}, 1

    def tick(depth: dict[str, float]) -> int:
        nonlocal state, target
        ctx = SimpleNamespace(
            current_num_replicas=target,
            target_num_replicas=target,
            total_num_requests=0,
            policy_state=state,
            config=config,
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=2,
            aggregated_metrics={"queue_depth": depth},
            current_time=time.time(),
        )
        target, state = policy(ctx)
        return target

    assert tick({"r0": 10.0}) == 2  # up at once
    deadline = time.monotonic() + 5
    while tick({"r0": 1.0, "r1": 0.0}) == 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target == 1, "the pool should shrink once downscale_delay_s has passed"


def test_app_args_name_the_problem():
    with pytest.raises(ValueError, match="repeated: a"):
        AppArgs.model_validate({"models": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match="router_policy 'best'"):
        DecodeAppArgs.model_validate({"router_policy": "best"})
    with pytest.raises(ValueError, match=r"decode workers \[5\]"):
        DecodeAppArgs.model_validate(
            {"models": ["a"], "router_policy": "partitioned", "partition": {"a": [5]}}
        )
    with pytest.raises(ValueError, match="partitioned needs `models`"):
        DecodeAppArgs.model_validate({"router_policy": "partitioned"})
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        AppArgs.model_validate({"models": [{"name": "bad name!"}]})
    decode = AppArgs.model_validate({"models": [{"name": "a"}], "decode_module": "/m"}).decode_args()
    assert decode["decode_module"] == "/m" and "models" not in decode
