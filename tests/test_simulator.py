"""The cluster simulator on cases with closed-form answers, the profile format, and the sizing arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from loadgen.sim import (
    ClusterConfig,
    Roofline,
    allocate,
    analytic_profile,
    constant_profile,
    load_profile,
    simulate,
)
from loadgen.sim.experiment import Capacity, Setting, capacity_curves, max_cluster_rate, size_setting
from loadgen.sim.profile import Profile
from loadgen.workload import LengthDist, RequestSpec, WorkloadConfig, generate

# exact binary fractions, so event times add up exactly
C, P = 0.25, 0.5  # decode step, prefill pass (seconds)


def _cluster(decode, prefill=(1,), models=("m",), policy="sun", **kw) -> ClusterConfig:
    return ClusterConfig(
        policy, models, prefill_gpus=prefill, decode_gpus=decode, kv_link_bytes_per_s=0, **kw
    )


def test_one_request_at_a_time_is_exact():
    """Arrivals farther apart than a request's life: nobody waits. TTFT = prefill, TPOT = step."""
    n, period = 9, 4.0  # life: P + 8 C = 2.5 s < 4 s
    specs = [RequestSpec(i, i * period, "m", 100, n) for i in range(20)]
    res = simulate(specs, constant_profile(P * 1e3, C * 1e3), _cluster(1))
    np.testing.assert_allclose(res.ttft(), P)
    np.testing.assert_allclose(res.tpot(), C)
    np.testing.assert_allclose(res.end - res.arrival, P + (n - 1) * C)
    assert res.decode_busy_s[0] == pytest.approx(20 * (n - 1) * C)
    assert res.decode_mean_batch == [1.0]


def test_frontend_time_comes_before_the_prefill_queue():
    """frontend_s delays each request's entry into its prefill queue: alone, TTFT grows by exactly that and TPOT
    not at all; two requests F apart stay F apart (the queue sees them shifted, not squeezed)."""
    F = 0.125
    specs = [RequestSpec(i, i * 4.0, "m", 100, 9) for i in range(5)]
    res = simulate(specs, constant_profile(P * 1e3, C * 1e3), _cluster(1, frontend_s=F))
    np.testing.assert_allclose(res.ttft(), P + F)
    np.testing.assert_allclose(res.tpot(), C)
    np.testing.assert_allclose(res.arrival, [s.arrival_s for s in specs])
    burst = [RequestSpec(0, 0.0, "m", 100, 2), RequestSpec(1, 0.0, "m", 100, 2)]
    res = simulate(burst, constant_profile(P * 1e3, C * 1e3), _cluster(1, frontend_s=F))
    np.testing.assert_allclose(sorted(res.ttft()), [P + F, P + F])  # one prefill pass holds both
    with pytest.raises(ValueError, match="frontend_s"):
        _cluster(1, frontend_s=-1.0)


def test_decode_workers_sharing_a_gpu_take_turns():
    """Two partitioned models, one decode worker each. On two GPUs they decode in parallel (TPOT = step); two
    workers on one GPU alternate steps, so both see twice the step time, and the cluster counts one GPU fewer."""
    n = 9
    specs = [RequestSpec(0, 0.0, "a", 100, n), RequestSpec(1, 0.0, "b", 100, n)]
    prof = constant_profile(P * 1e3, C * 1e3)
    own = _cluster((1, 1), prefill=(1, 1), models=("a", "b"), policy="partitioned")
    shared = _cluster(
        (1, 1), prefill=(1, 1), models=("a", "b"), policy="partitioned", decode_workers_per_gpu=2
    )
    np.testing.assert_allclose(simulate(specs, prof, own).tpot(), C)
    res = simulate(specs, prof, shared)
    # a's steps end at P + C, P + 3C, ...; b's at P + 2C, P + 4C, ...: both finish n - 1 steps of 2C apart
    np.testing.assert_allclose(res.end, [P + (2 * (n - 1) - 1) * C, P + 2 * (n - 1) * C])
    assert (own.num_gpus, shared.num_gpus) == (4, 3)
    with pytest.raises(ValueError, match="decode_workers_per_gpu"):
        _cluster(1, decode_workers_per_gpu=0)


def test_prefill_replicas_sharing_a_gpu_take_turns():
    """Two models' prefill replicas on one GPU: two prompts arriving together get their first tokens one pass
    apart, where two GPUs give both at P."""
    specs = [RequestSpec(0, 0.0, "a", 100, 1), RequestSpec(1, 0.0, "b", 100, 1)]
    prof = constant_profile(P * 1e3, C * 1e3)
    kw = {"prefill": (1, 1), "models": ("a", "b"), "policy": "partitioned"}
    np.testing.assert_allclose(simulate(specs, prof, _cluster((1, 1), **kw)).ttft(), [P, P])
    shared = _cluster((1, 1), prefill_modules_per_gpu=2, **kw)
    np.testing.assert_allclose(sorted(simulate(specs, prof, shared).ttft()), [P, 2 * P])
    assert shared.num_gpus == 3


def test_prefill_and_decode_on_one_gpu_as_deployed():
    """A single-GPU deployment: the prefill replica and the decode worker on GPU 0. A's decode steps run at
    [P, P + C] and would end A at P + 2C; B's prompt arrives meanwhile and its prefill pass takes the GPU at P + C,
    so A's second step waits for it (turns). Apart (an in-situ profile already holds that interference), A is
    untouched. Either way the cluster is one GPU, as deployed."""
    specs = [RequestSpec(0, 0.0, "m", 100, 3), RequestSpec(1, P + 0.4 * C, "m", 100, 1)]
    prof = constant_profile(P * 1e3, C * 1e3)
    turns = _cluster(1, prefill_gpu_ids=(0,), decode_gpu_ids=(0,))
    apart = _cluster(1, prefill_gpu_ids=(0,), decode_gpu_ids=(0,), gpu_sharing="apart")
    res = simulate(specs, prof, turns)
    np.testing.assert_allclose(res.end, [P + C + P + C, P + C + P])
    res = simulate(specs, prof, apart)
    np.testing.assert_allclose(res.end, [P + 2 * C, P + 0.4 * C + P])
    assert turns.num_gpus == apart.num_gpus == 1 and _cluster(1).num_gpus == 2
    # two models, both prefill replicas and both decode workers on one GPU (conventional on one GPU)
    conv = _cluster(
        (1, 1),
        prefill=(1, 1),
        models=("a", "b"),
        policy="partitioned",
        prefill_gpu_ids=(0, 0),
        decode_gpu_ids=(0, 0),
    )
    assert conv.num_gpus == 1 and conv.placement() == ([0, 0], [0, 0])
    # only the decode workers placed: the prefill replicas get GPUs of their own after them
    assert _cluster(2, prefill=(1, 1, 1), models=("a", "b", "c"), decode_gpu_ids=(0, 0)).placement() == (
        [1, 2, 3],
        [0, 0],
    )
    with pytest.raises(ValueError, match="one GPU index"):
        _cluster(2, decode_gpu_ids=(0,))
    with pytest.raises(ValueError, match="per-GPU count"):
        _cluster(2, decode_gpu_ids=(0, 0), decode_workers_per_gpu=2)
    # none: nobody waits (an in-situ profile of this very deployment holds the interference already)
    none = _cluster(1, prefill_gpu_ids=(0,), decode_gpu_ids=(0,), gpu_sharing="none")
    np.testing.assert_allclose(simulate(specs, prof, none).end, [P + 2 * C, P + 0.4 * C + P])
    conv2 = dict(prefill=(1, 1), models=("a", "b"), policy="partitioned", prefill_gpu_ids=(0, 0))
    two = [RequestSpec(0, 0.0, "a", 100, 3), RequestSpec(1, 0.0, "b", 100, 3)]
    ends = simulate(two, prof, _cluster((1, 1), decode_gpu_ids=(0, 0), gpu_sharing="apart", **conv2)).end
    np.testing.assert_allclose(sorted(ends), [P + 2 * C, 2 * P + 2 * C])  # b's prompt waits for a's
    ends = simulate(two, prof, _cluster((1, 1), decode_gpu_ids=(0, 0), gpu_sharing="none", **conv2)).end
    np.testing.assert_allclose(ends, [P + 2 * C, P + 2 * C])
    with pytest.raises(ValueError, match="gpu_sharing"):
        _cluster(1, gpu_sharing="mps")


def test_burst_batches_then_queues_on_the_batch_limit_and_on_kv():
    """B requests at t = 0: all batched (TPOT = step); with room for B/2, the rest wait one full life (TPOT = 2
    steps), whether the limit is max_num_seqs or KV capacity."""
    b, n, plen = 8, 11, 30
    specs = [RequestSpec(i, 0.0, "m", plen, n) for i in range(b)]
    prof = constant_profile(P * 1e3, C * 1e3)
    res = simulate(specs, prof, _cluster(1, prefill_max_batched_tokens=b * plen))
    np.testing.assert_allclose(res.first_token, P)  # one prefill pass for all
    np.testing.assert_allclose(res.tpot(), C)
    for kw in ({"max_num_seqs": b // 2}, {"kv_capacity_tokens": (b // 2) * (plen + n)}):
        res = simulate(specs, prof, _cluster(1, prefill_max_batched_tokens=b * plen, **kw))
        tpot = np.sort(res.tpot())
        np.testing.assert_allclose(tpot[: b // 2], C)
        np.testing.assert_allclose(tpot[b // 2 :], 2 * C)  # waited (n - 1) steps, then n - 1 steps of its own


def test_periodic_steady_state_throughput_and_tpot():
    """Deterministic arrivals every 4.5 steps, 21 tokens: overlapping requests share steps; a request waits at
    most one step to join a batch, so C <= TPOT <= C * n / (n - 1); throughput is n tokens per period."""
    n, period, count = 21, 4.5 * C, 400
    specs = [RequestSpec(i, i * period, "m", 64, n) for i in range(count)]
    res = simulate(specs, constant_profile(P * 1e3, C * 1e3), _cluster(1))
    tpot = res.tpot()
    assert tpot.min() >= C - 1e-12 and tpot.max() <= C * n / (n - 1) + 1e-12
    mask = res.window()
    s = res.summary()
    assert s["overall"]["output_token_throughput"] == pytest.approx(n / period, rel=0.02)
    assert s["overall"]["requests"] == mask.sum()
    # mean batch = tokens in flight: (n - 1) steps of life / 4.5 steps between arrivals
    assert res.decode_mean_batch[0] == pytest.approx((n - 1) / 4.5, rel=0.03)


def test_prefill_queue_is_md1():
    """One prefill GPU, one prompt per pass of constant length D, Poisson arrivals: M/D/1, mean wait
    rho D / (2 (1 - rho))."""
    d, rate = 0.01, 60.0  # rho = 0.6
    wc = WorkloadConfig(("m",), input_len=LengthDist(100, 100), output_len=LengthDist(1, 1), seed=5)
    specs = generate(wc, 30_000, rate=rate)
    cl = ClusterConfig("sun", ("m",), prefill_gpus=(1,), decode_gpus=0, prefill_max_batched_tokens=100)
    res = simulate(specs, constant_profile(d * 1e3, 1.0), cl)
    rho = rate * d
    expected = d + rho * d / (2 * (1 - rho))
    assert res.ttft().mean() == pytest.approx(expected, rel=0.04)
    assert np.all(np.isfinite(res.end))


def test_sun_pools_where_partitioned_strands_gpus():
    """Two models, nearly all traffic on one; two decode GPUs serving one request at a time. Partitioned leaves
    the busy model one GPU (overloaded); SUN spreads over both (stable)."""
    wc = WorkloadConfig(
        ("a", "b"), alpha=12.0, input_len=LengthDist(10, 10), output_len=LengthDist(11, 11), seed=2
    )
    specs = generate(wc, 3000, rate=1.5 / (10 * 0.1))  # one GPU serves 1 request / s; load 1.5
    prof = constant_profile(1.0, 100.0)
    common = dict(prefill=(4, 1), models=("a", "b"), max_num_seqs=1)
    sun = simulate(specs, prof, _cluster(2, **common))
    part = simulate(specs, prof, _cluster((1, 1), policy="partitioned", **common))
    w_sun, w_part = np.nanmean(sun.decode_wait()), np.nanmean(part.decode_wait())
    assert w_sun < 5.0 < 100 * w_sun < w_part
    assert min(sun.decode_busy_s) > 0.6 * max(sun.decode_busy_s)  # both GPUs work
    assert part.decode_busy_s[1] < 0.05 * part.decode_busy_s[0]  # b's GPU idles


def test_rejects_requests_larger_than_the_pool():
    specs = [RequestSpec(0, 0.0, "m", 100, 10), RequestSpec(1, 0.0, "m", 10, 10)]
    res = simulate(specs, constant_profile(1.0, 1.0), _cluster(1, kv_capacity_tokens=50))
    assert res.rejected.tolist() == [True, False] and np.isfinite(res.end[1])
    recs = res.records()
    assert recs[0].status == "error" and recs[1].status == "ok"


def test_cluster_config_errors():
    with pytest.raises(ValueError, match="policy"):
        ClusterConfig("magic", ("m",), None, 1)
    with pytest.raises(ValueError, match="per model"):
        ClusterConfig("partitioned", ("a", "b"), None, (1,))
    with pytest.raises(ValueError, match="prefill_gpus"):
        ClusterConfig("sun", ("a", "b"), (1, 0), 1)
    with pytest.raises(ValueError, match="does not serve"):
        simulate([RequestSpec(0, 0.0, "x", 1, 1)], constant_profile(1, 1), _cluster(1))
    assert allocate(10, [0.7, 0.2, 0.1]) == [6, 2, 2]
    assert sum(allocate(64, [1] * 8)) == 64
    with pytest.raises(ValueError):
        allocate(3, [1, 1, 1, 1])


def test_profile_interpolation_round_trip_and_loader(tmp_path):
    prof = analytic_profile()
    roof = Roofline()
    # batch 1, context 1024: 2 ms + (16.06 GB + 1024 x 128 KiB) / 3.0 TB/s
    assert prof.decode_s(1, 1024) * 1e3 == pytest.approx(2 + (16.06e9 + 1024 * 131072) / 3e12 * 1e3, rel=1e-3)
    for b, c in ((3, 100), (77, 700), (300, 1500), (600, 5000)):
        assert prof.decode_s(b, c) * 1e3 == pytest.approx(roof.decode_ms(b, c), rel=0.03)
    assert prof.kv_capacity_tokens == roof.kv_capacity_tokens > 300_000
    assert "ANALYTIC" in prof.notes and prof.source == "analytic"
    path = tmp_path / "p.json"
    prof.save(path)
    again = load_profile(path)
    assert again.decode_s(77, 700) == prof.decode_s(77, 700) and again.prefill_s(900) == prof.prefill_s(900)
    builtin = load_profile("h100-llama-3.1-8b-analytic")
    assert builtin.source == "analytic" and builtin.model == "llama-3.1-8b"
    cpu = load_profile("cpu-smollm2-135m")
    assert cpu.source == "measured" and cpu.date and cpu.device.startswith("cpu")
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_profile("nope")
    bad = json.loads(path.read_text())
    bad["decode"]["batch"] = [4, 2] + bad["decode"]["batch"][2:]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="increasing"):
        load_profile(path)
    del bad["kv_capacity_tokens"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        load_profile(path)


def test_bilinear_reproduces_a_bilinear_table():
    prof = Profile(
        name="t",
        source="measured",
        device="x",
        date="d",
        model="m",
        kv_bytes_per_token=1,
        kv_capacity_tokens=10,
        prefill_tokens=[10, 20],
        prefill_ms=[1, 3],
        decode_batch=[1, 3],
        decode_context=[10, 30],
        decode_ms=[[1.1, 1.3], [1.3, 1.9]],
    )
    for b, c in ((2, 20), (5, 50), (1.5, 12)):  # ms = 1 + 0.01 b c, inside and beyond the table
        assert prof.decode_s(b, c) * 1e3 == pytest.approx(1 + 0.01 * b * c)
    assert prof.prefill_s(40) * 1e3 == pytest.approx(7.0)  # extended linearly
    assert prof.prefill_s(1) * 1e3 == pytest.approx(1.0)  # never below the fastest measured


def test_sizing_arithmetic():
    """Linear capacities of 10 req/s per GPU (prefill and decode), two models with 90% / 10% of the traffic."""
    lin = Capacity({1: 10.0, 2: 20.0})
    w = [0.9, 0.1]
    # 5 GPUs. partitioned: each model needs a prefill and a decode GPU: 4, the fifth goes to model a's prefill or
    # decode, and the other side caps a at 10 req/s: L = 10 / 0.9. SUN: prefill 2 + 1, decode pool 2: L = 20.
    part = max_cluster_rate("partitioned", 5, w, lin, lin)
    sun = max_cluster_rate("sun", 5, w, lin, lin)
    assert part.rate == pytest.approx(10 / 0.9, rel=1e-3)
    assert sun.rate == pytest.approx(20.0, rel=1e-3)
    assert sun.prefill == [2, 1] and sun.decode == 2
    assert max_cluster_rate("partitioned", 3, w, lin, lin) is None  # 2 models need 4 GPUs at least
    assert lin.gpus_for(25.0) == 3 and lin.rate(4) == 40.0


def test_size_setting_end_to_end_small():
    """The whole pipeline on a tiny setting (short simulations): SUN never worse than partitioned."""
    prof = analytic_profile()
    st = Setting(sim_seconds=4.0, output_len=LengthDist(32, 64), input_len=LengthDist(64, 256))
    dec, pre = capacity_curves(prof, st, decode_points=(1, 2), prefill_points=(1, 2), log=lambda s: None)
    r = size_setting(prof, st, dec, pre, num_models=2, alpha=1.5, gpus=5, log=lambda s: None)
    assert r["sun"]["fits"] and r["partitioned"]["fits"]
    assert r["sun"]["gpus_used"] <= 5 and r["partitioned"]["gpus_used"] <= 5
    assert r["ratio"] >= 0.95
    assert r["at_partitioned_load"]["decode_gpus_sun"] <= r["at_partitioned_load"]["decode_gpus_partitioned"]


def test_simulator_imports_without_torch():
    code = (
        "import sys, loadgen.sim, loadgen.sim.experiment, loadgen.cli, loadgen.client, loadgen.runner; "
        "assert 'torch' not in sys.modules and 'sunray' not in sys.modules, 'torch or sunray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- in-situ calibration (loadgen sim calibrate) ----------------------------------------------------------------------
def _grid_profile() -> Profile:
    """Decode ms = batch / 8 + context / 256 on a 3 x 2 grid (bilinear lookups reproduce it exactly)."""
    batches, contexts = [1.0, 16.0, 256.0], [256.0, 1024.0]
    return Profile(
        name="grid",
        source="measured",
        device="test",
        date="-",
        model="-",
        kv_bytes_per_token=1,
        kv_capacity_tokens=1 << 20,
        prefill_tokens=[1.0, 1000.0],
        prefill_ms=[1.0, 10.0],
        decode_batch=batches,
        decode_context=contexts,
        decode_ms=[[b / 8 + c / 256 for c in contexts] for b in batches],
    )


def test_merge_step_times_weights_each_worker_by_its_steps():
    from loadgen.sim.profile import merge_step_times

    status = {
        "router": {
            "workers": {
                "w0": {"step_times": {"8": {"steps": 10, "mean_ms": 4.0, "mean_batch": 9.0}}},
                "w1": {
                    "step_times": {
                        "8": {"steps": 30, "mean_ms": 8.0, "mean_batch": 13.0},
                        "1": {"steps": 5, "mean_ms": 2.0, "mean_batch": 1.0},
                    }
                },
            }
        }
    }
    merged = merge_step_times(status)
    assert merged["8"] == {"steps": 40, "mean_ms": 7.0, "mean_batch": 12.0}
    assert merged["1"]["steps"] == 5
    with pytest.raises(ValueError, match="no decode step times"):
        merge_step_times({"router": {"workers": {"w0": {"queue_depth": 0}}}})


def test_calibrate_in_situ_scales_decode_by_the_live_factor_per_batch():
    from loadgen.sim.profile import calibrate_in_situ

    prof = _grid_profile()
    ctx = 256.0
    # Live: 2x the profile at batch 1, 3x at batch 16; a bucket with too few steps is ignored.
    live = {
        "1": {"steps": 50, "mean_ms": 2 * (1 / 8 + 1), "mean_batch": 1.0},
        "16": {"steps": 50, "mean_ms": 3 * (16 / 8 + 1), "mean_batch": 16.0},
        "128": {"steps": 3, "mean_ms": 1000.0, "mean_batch": 200.0},
    }
    cal = calibrate_in_situ(prof, live, ctx)
    for row_in, row_out, f in zip(
        prof.decode_ms, cal.decode_ms, (2.0, 3.0, 3.0)
    ):  # 256: held at the last factor
        assert row_out == pytest.approx([f * v for v in row_in], abs=1e-3)
    assert cal.prefill_ms == prof.prefill_ms and cal.name == "grid-in-situ"
    # Between grid rows the lookup interpolates the scaled rows: halfway from 2 x 1.125 ms to 3 x 3 ms.
    assert cal.decode_s(8.5, ctx) == pytest.approx((2.25 + 9.0) / 2 / 1e3)
    with pytest.raises(ValueError, match="20 or more steps"):
        calibrate_in_situ(prof, {"1": {"steps": 3, "mean_ms": 1.0, "mean_batch": 1.0}}, ctx)


def test_sim_calibrate_cli(tmp_path):
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(_grid_profile().to_json()))
    status = tmp_path / "status.json"
    status.write_text(
        json.dumps(
            {
                "in_flight": 0,
                "router": {
                    "workers": {"w": {"step_times": {"1": {"steps": 40, "mean_ms": 2.25, "mean_batch": 1.0}}}}
                },
            }
        )
    )
    out = tmp_path / "cal.json"
    run = [sys.executable, "-m", "loadgen", "sim", "calibrate", "--profile", str(prof), "--context", "256"]
    p = subprocess.run([*run, "--status", str(status), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())["decode"]["ms"][0][0] == pytest.approx(2.25)
    status.write_text(json.dumps({"router": {"workers": {}}}))
    p = subprocess.run([*run, "--status", str(status), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "no decode step times" in p.stderr
