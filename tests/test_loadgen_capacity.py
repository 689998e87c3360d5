"""The capacity search (loadgen/capacity.py): the search on known answers, the accounting of misses, live probes
against the fake server's capacity model over HTTP on 127.0.0.1, and the simulator's capacity mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import pytest
import uvloop

from loadgen import cli
from loadgen.capacity import (
    Criterion,
    LiveProber,
    Probe,
    ProbeConfig,
    SearchConfig,
    bracket,
    evaluate,
    search,
    tokens_in_window,
)
from loadgen.client import ClientConfig
from loadgen.fake_server import STATS, FakeConfig, start
from loadgen.metrics import RequestRecord
from loadgen.sim import ClusterConfig
from loadgen.sim.capacity import SimProber
from loadgen.sim.profile import Profile
from loadgen.workload import LengthDist, WorkloadConfig


# -- the search on known answers ------------------------------------------------------------------------------------
def _oracle(caps: dict[str, float], calls: list[float]):
    """A probe that holds criterion c exactly up to caps[c.label] (a monotone server with a known capacity)."""

    def probe(rate: float) -> Probe:
        calls.append(rate)
        verdicts = {
            label: {"holds": rate <= cap, "attainment": 1.0 if rate <= cap else 0.0}
            for label, cap in caps.items()
        }
        stats = {
            "offered": {"rate": rate, "req_s": rate, "tok_s": 10 * rate},
            "delivered": {"tok_s": 10 * min(rate, max(caps.values())), "req_s": rate},
            "ttft_ms": {"p50": 1.0},
            "tpot_ms": {"p50": 1.0, "p90": 2.0},
            "measured_requests": 100,
        }
        return Probe(rate, stats, verdicts, "done", 0.0)

    return probe


@pytest.mark.parametrize("cap20,cap40", [(37.3, 80.0), (3.1, 5.0), (4.0, 4.0), (0.9, 250.0)])
def test_search_finds_a_known_capacity_within_its_resolution(cap20, cap40):
    crit = [Criterion(20.0), Criterion(40.0)]
    calls: list[float] = []
    cfg = SearchConfig(start_rate=4.0, growth=2.0, resolution=0.05, max_probes=40)
    res = search(_oracle({crit[0].label: cap20, crit[1].label: cap40}, calls), crit, cfg, gpus=2, log=None)
    assert res.stopped == "converged"
    for c, cap in zip(crit, (cap20, cap40)):
        out = res.capacity(c)
        lo, hi = out["bracket"]
        assert lo <= cap < hi and hi / lo <= 1.05 + 1e-9, (c.label, lo, hi, cap)
        assert out["status"] == "converged" and out["capacity_rate"] == lo and out["monotone"]
        a = out["at_capacity"]
        assert a["offered_rate"] == lo and a["delivered_tok_s_per_gpu"] == pytest.approx(
            a["delivered_tok_s"] / 2, abs=0.1
        )
    assert len(calls) == len(set(calls))  # every probe is shared by both criteria: none repeated
    assert len(calls) <= 20


def test_search_stops_at_its_bounds_and_says_so():
    crit = [Criterion(20.0)]
    cfg = SearchConfig(start_rate=4.0, resolution=0.01, max_probes=5)
    res = search(_oracle({crit[0].label: 37.3}, []), crit, cfg, log=None)
    assert res.stopped == "max probes" and len(res.probes) == 5
    out = res.capacity(crit[0])
    assert out["status"] == "not converged (max probes)" and out["bracket"][0] <= 37.3 < out["bracket"][1]
    # a time budget: each probe "takes" 10 s of a fake clock, 35 s allowed
    now = [0.0]

    def probe(rate):
        now[0] += 10.0
        return _oracle({crit[0].label: 37.3}, [])(rate)

    res = search(probe, crit, SearchConfig(budget_s=35.0, resolution=0.01), log=None, clock=lambda: now[0])
    assert res.stopped == "budget" and len(res.probes) == 3
    # holds everywhere up to the highest rate allowed; fails even at the lowest
    res = search(_oracle({crit[0].label: 1e9}, []), crit, SearchConfig(max_rate=100.0), log=None)
    assert res.capacity(crit[0])["status"].startswith("holds at every probed rate")
    assert res.capacity(crit[0])["capacity_rate"] == 100.0
    res = search(_oracle({crit[0].label: 0.01}, []), crit, SearchConfig(min_rate=0.5), log=None)
    assert res.capacity(crit[0])["status"] == "fails at every probed rate (min rate)"
    assert res.capacity(crit[0])["capacity_rate"] is None


def test_bracket_ignores_successes_above_a_failure():
    c = Criterion(20.0)
    mk = lambda r, ok: Probe(r, {}, {c.label: {"holds": ok}}, "done", 0.0)  # noqa: E731
    lo, hi, monotone = bracket([mk(4, True), mk(8, False), mk(16, True), mk(6, True)], c)
    assert (lo, hi, monotone) == (6, 8, False)


# -- the accounting of one probe -------------------------------------------------------------------------------------
def _rec(i, status="ok", ttft=0.01, tpot=0.01, n=11, sent=1.0) -> RequestRecord:
    r = RequestRecord(i, "m", status=status, scheduled_s=sent, sent_s=sent, max_tokens=n)
    if status == "ok":
        r.first_token_s = sent + ttft
        r.chunk_s = [r.first_token_s + k * tpot for k in range(n)]
        r.end_s = r.chunk_s[-1]
        r.completion_tokens = n
    elif status in ("refused", "error"):
        r.end_s = sent + 0.001
    return r


def test_refused_failed_and_cancelled_requests_are_misses():
    c = Criterion(20.0, ttft_ms=100.0, target=0.9)
    good = [_rec(i) for i in range(18)]
    slow = [_rec(18, tpot=0.03)]  # TPOT 30 ms > 20
    refused = [_rec(19, "refused")]
    v = evaluate(good + slow + refused, 20, c)
    assert v["met"] == 18 and v["misses"] == 2 and v["attainment"] == 0.9 and v["holds"]
    assert v["tpot_ms_p90_misses_inf"] == pytest.approx(10.0)
    # one more request never sent (the probe ended first): a miss too, and 18 / 21 < 0.9
    v = evaluate(good + slow + refused, 21, c)
    assert v["misses"] == 3 and not v["holds"] and v["tpot_ms_p90_misses_inf"] is None  # falls on a miss
    # an error fails the probe even where attainment holds; max_errors allows some
    errs = good * 0 + [_rec(i) for i in range(19)] + [_rec(19, "error")]
    assert evaluate(errs, 20, c)["attainment"] == 0.95 and not evaluate(errs, 20, c)["holds"]
    assert evaluate(errs, 20, Criterion(20.0, target=0.9, max_errors=1))["holds"]
    cancelled = [_rec(i) for i in range(17)] + [
        _rec(17, "cancelled"),
        _rec(18, "cancelled"),
        _rec(19, ttft=0.2),
    ]
    v = evaluate(cancelled, 20, c)
    assert v["misses"] == 3 and not v["holds"]  # TTFT 200 ms > 100 is a miss as well


def test_certainly_missed_for_early_stopping():
    c = Criterion(20.0, ttft_ms=100.0)
    waiting = RequestRecord(0, "m", sent_s=1.0, max_tokens=11)
    assert not c.certainly_missed(waiting, 1.05) and c.certainly_missed(waiting, 1.2)  # TTFT past 100 ms
    streaming = RequestRecord(1, "m", sent_s=1.0, first_token_s=1.01, max_tokens=11)
    assert not c.certainly_missed(streaming, 1.01 + 0.19)  # 10 tokens in 200 ms is still possible
    assert c.certainly_missed(streaming, 1.01 + 0.21)
    assert c.certainly_missed(_rec(2, "refused"), 5.0) and not c.certainly_missed(_rec(3), 5.0)
    assert not Criterion(20.0).certainly_missed(waiting, 100.0)  # no TTFT SLO: waiting is no miss yet


def test_tokens_in_window_from_chunks_or_spread_evenly():
    r = _rec(0, ttft=0.0, tpot=0.1, n=11, sent=0.0)  # tokens at 0.0, 0.1, ..., 1.0
    assert tokens_in_window(r, 0.25, 0.75) == 5  # 0.3 .. 0.7
    r.chunk_s = r.chunk_s[::2]  # 6 chunks carrying 11 tokens
    assert tokens_in_window(r, 0.0, 0.5) == pytest.approx(3 * 11 / 6)
    sim = RequestRecord(1, "m", status="ok", first_token_s=0.0, end_s=1.0, completion_tokens=11)
    assert tokens_in_window(sim, 0.25, 0.75) == 5 and tokens_in_window(sim, 0.0, 2.0) == 11
    assert tokens_in_window(sim, 2.0, 3.0) == 0


# -- live probes over HTTP ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_server(cfg: FakeConfig):
    """The fake server on 127.0.0.1 in a thread of its own (the prober runs an event loop per probe)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    def main():
        asyncio.set_event_loop(loop)
        box["runner"], box["url"] = loop.run_until_complete(start(cfg))
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=main, daemon=True)
    th.start()
    assert ready.wait(10)
    try:
        yield box["url"], box["runner"].app[STATS]
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)


# The capacity model: a step takes 5 + 1 ms x running; 21 output tokens; TPOT <= S holds up to
# L* = (1 - 5 / S) / (20 x 0.001) req/s with constant arrivals: 33.3 at S = 15 ms, 40 at 25 ms.
STEP_BASE_MS, STEP_PER_SEQ_MS, N_OUT = 5.0, 1.0, 21


def analytic_capacity(slo_ms: float) -> float:
    return (1 - STEP_BASE_MS / slo_ms) / ((N_OUT - 1) * STEP_PER_SEQ_MS / 1e3)


def _capacity_model(**kw) -> FakeConfig:
    return FakeConfig(
        models=("m0", "m1"),
        ttft_s=0.01,
        step_base_ms=STEP_BASE_MS,
        step_per_seq_ms=STEP_PER_SEQ_MS,
        max_tokens_cap=64,
        **kw,
    )


def test_live_search_finds_the_fake_servers_capacity():
    wc = WorkloadConfig(
        ("m0", "m1"), input_len=LengthDist(8, 8), output_len=LengthDist(N_OUT, N_OUT), arrival="constant"
    )
    crit = [Criterion(15.0), Criterion(25.0)]
    pcfg = ProbeConfig(warmup_s=0.7, measure_s=1.5, settle_s=0.2)
    with fake_server(_capacity_model()) as (url, stats):
        prober = LiveProber(wc, ClientConfig(url), crit, pcfg, runner=uvloop.run, log=None)
        assert prober.measure_baseline() < 0.5
        res = search(
            prober, crit, SearchConfig(start_rate=4.0, resolution=0.1, max_probes=14), gpus=1, log=None
        )
        # Batching happened; background cancelled.
        assert stats["peak_batch"] > 5 and stats["disconnected"] > 0
    for c in crit:
        out = res.capacity(c)
        want = analytic_capacity(c.tpot_ms)
        assert out["status"] == "converged", out
        # never above the known capacity by more than the resolution; below it by timing on a shared 2-core machine
        # (a loaded host slows the fake server's steps: it can only lower the capacity found). The exact checks, on
        # a deterministic probe, are the oracle and simulator tests.
        assert 0.6 * want <= out["capacity_rate"] <= 1.1 * want, (c.label, out["bracket"], want)
        a = out["at_capacity"]
        assert a["tpot_ms"]["p90"] <= c.tpot_ms and a["attainment"] >= 0.9
        # at capacity the server keeps up: delivered tokens about the offered ones (window noise aside)
        assert a["delivered_tok_s"] == pytest.approx(a["offered_tok_s"], rel=0.35)
        assert a["delivered_tok_s_per_gpu"] == a["delivered_tok_s"]
    # a failing probe above capacity stopped early or at the tail bound, never ran without bound
    over = [p for p in res.probes if not p.holds(crit[-1])]
    assert over and all(p.stop in ("early stop", "tail bound", "done") for p in over)
    assert all(p.wall_s < pcfg.warmup_s + pcfg.measure_s + pcfg.tail(crit, N_OUT) + 1.0 for p in res.probes)


def test_live_probe_counts_refusals_and_errors():
    wc = WorkloadConfig(("m0",), input_len=LengthDist(4, 4), output_len=LengthDist(5, 5), arrival="constant")
    c = Criterion(200.0, target=0.9)
    pcfg = ProbeConfig(warmup_s=0.3, measure_s=1.0, settle_s=0.0)
    # every 20th request refused: 5% misses, so 90% still holds; the refusals are counted, not errors
    with fake_server(FakeConfig(models=("m0",), ttft_s=0.005, tpot_s=0.002, refuse_every=20)) as (url, _):
        p = LiveProber(wc, ClientConfig(url), [c], pcfg, runner=uvloop.run, log=None)(40.0)
    v = p.verdicts[c.label]
    n = p.stats["measured_requests"]
    refused = sum(r.status == "refused" for r in p.records if 0.3 <= r.scheduled_s < 1.3)
    assert n in (40, 41) and refused == 2 and v["misses"] == refused and v["errors"] == 0 and v["holds"]
    # every 20th a 500: attainment would hold, but an error fails the probe (at once: it stops early), unless
    # the criterion tolerates that many
    lax = Criterion(200.0, target=0.9, max_errors=3)
    with fake_server(FakeConfig(models=("m0",), ttft_s=0.005, tpot_s=0.002, error_every=20)) as (url, _):
        p = LiveProber(wc, ClientConfig(url), [c, lax], pcfg, runner=uvloop.run, log=None)(40.0)
    assert p.stop == "done" and not p.holds(c) and p.holds(lax)
    assert p.verdicts[c.label]["errors"] == 2 and p.verdicts[lax.label]["attainment"] >= 0.9
    with fake_server(FakeConfig(models=("m0",), ttft_s=0.005, tpot_s=0.002, error_every=20)) as (url, _):
        p = LiveProber(wc, ClientConfig(url), [c], pcfg, runner=uvloop.run, log=None)(40.0)
    assert p.stop == "early stop" and not p.holds(c) and p.verdicts[c.label]["errors"] >= 1
    # a server far too slow for the SLO: the probe stops early instead of waiting for its tail
    slow = FakeConfig(models=("m0",), ttft_s=0.005, tpot_s=0.5)
    with fake_server(slow) as (url, _):
        p = LiveProber(wc, ClientConfig(url), [Criterion(20.0)], pcfg, runner=uvloop.run, log=None)(20.0)
    assert p.stop == "early stop" and not p.holds(Criterion(20.0)) and p.wall_s < 2.5


def test_a_server_that_falls_behind_does_not_hold():
    """One request at a time (max_batch 1): about 16 req/s, offered 40. The TPOT and TTFT SLOs are so loose that
    every measured request meets them within the window, but the server streams well under the offered tokens."""
    wc = WorkloadConfig(
        ("m0",), input_len=LengthDist(4, 4), output_len=LengthDist(11, 11), arrival="constant"
    )
    c = Criterion(10_000.0, ttft_ms=10_000.0)
    pcfg = ProbeConfig(warmup_s=0.3, measure_s=1.0, settle_s=0.0, tail_s=3.0)
    with fake_server(_capacity_model(max_batch=1)) as (url, _):
        p = LiveProber(wc, ClientConfig(url), [c], pcfg, runner=uvloop.run, log=None)(40.0)
    v = p.verdicts[c.label]
    assert v["attainment"] == 1.0 and not v["keeps_up"] and not v["holds"]
    assert p.stats["delivered"]["tok_s"] < 0.6 * p.stats["offered"]["tok_s"]
    # judged without the keep-up condition the same probe would have held
    assert evaluate([r for r in p.records if 0.3 <= r.scheduled_s < 1.3], v["met"], c)["holds"]


def test_drain_lets_requests_in_flight_finish():
    """With drain, the probe stops issuing when its measured requests are done and lets the rest finish: no client
    disconnects (a server that mishandles cancelled requests is spared them)."""
    wc = WorkloadConfig(
        ("m0",), input_len=LengthDist(4, 4), output_len=LengthDist(11, 11), arrival="constant"
    )
    c = Criterion(200.0)
    for drain in (False, True):
        pcfg = ProbeConfig(warmup_s=0.3, measure_s=0.6, settle_s=0.0, drain=drain)
        with fake_server(FakeConfig(models=("m0",), ttft_s=0.005, tpot_s=0.02)) as (url, stats):
            p = LiveProber(wc, ClientConfig(url), [c], pcfg, runner=uvloop.run, log=None)(40.0)
            disconnected = stats["disconnected"]
        assert p.holds(c)
        statuses = {r.status for r in p.records}
        if drain:
            assert statuses == {"ok"} and disconnected == 0
        else:
            assert "cancelled" in statuses


def test_capacity_cli_writes_every_probe(tmp_path, capsys):
    with fake_server(_capacity_model()) as (url, _):
        rc = cli.main(
            [
                "capacity",
                "--url",
                url,
                "--models",
                "m0",
                "m1",
                "--output-len",
                str(N_OUT),
                "--input-len",
                "8",
                "--arrival",
                "constant",
                "--tpot-slo-ms",
                "25",
                "--gpus",
                "2",
                "--start-rate",
                "16",
                "--resolution",
                "0.3",
                "--warmup",
                "0.5",
                "--measure",
                "1",
                "--settle",
                "0.1",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == 0
    doc = json.loads((tmp_path / "capacity.json").read_text())
    assert (
        doc["gpus"] == 2 and doc["criteria"][0]["tpot_ms"] == 25.0 and "p90" in doc["criteria"][0]["meaning"]
    )
    assert len(doc["probes"]) >= 2 and all((tmp_path / p["requests_file"]).exists() for p in doc["probes"])
    cap = doc["capacity"][0]
    assert cap["capacity_rate"] and cap["at_capacity"]["delivered_tok_s_per_gpu"] > 0
    assert doc["probe"]["tail_s"] == pytest.approx(5.0 + 20 * 0.025 + 1.0)  # no TTFT SLO: 5 s allowance
    assert "TPOT<=25ms @90%" in capsys.readouterr().out


# -- the simulator's capacity mode ----------------------------------------------------------------------------------
def _linear_profile(base_ms: float, per_seq_ms: float) -> Profile:
    """Decode step = base + per_seq x batch at any context (the fake server's model); prefill 10 ms."""
    return Profile(
        name="linear",
        source="analytic",
        device="-",
        date="-",
        model="-",
        kv_bytes_per_token=1,
        kv_capacity_tokens=1 << 30,
        prefill_tokens=[1.0],
        prefill_ms=[10.0],
        decode_batch=[1.0, 1001.0],
        decode_context=[1.0, 1e5],
        decode_ms=[[base_ms + per_seq_ms] * 2, [base_ms + 1001 * per_seq_ms] * 2],
    )


@pytest.mark.parametrize("slo", [15.0, 25.0])
def test_sim_capacity_finds_the_analytic_capacity(slo):
    wc = WorkloadConfig(
        ("m0",), input_len=LengthDist(8, 8), output_len=LengthDist(N_OUT, N_OUT), arrival="constant"
    )
    cl = ClusterConfig("sun", ("m0",), prefill_gpus=None, decode_gpus=1, kv_link_bytes_per_s=0)
    c = Criterion(slo)
    prober = SimProber(
        wc, _linear_profile(STEP_BASE_MS, STEP_PER_SEQ_MS), cl, [c], ProbeConfig(warmup_s=2, measure_s=6)
    )
    res = search(prober, [c], SearchConfig(start_rate=4, resolution=0.02), log=None)
    want = analytic_capacity(slo)
    out = res.capacity(c)
    assert out["status"] == "converged"
    # the analytic mean field is exact for constant arrivals up to the wait for the next step boundary
    assert 0.9 * want <= out["capacity_rate"] <= 1.02 * want, (out["bracket"], want)


def test_sim_capacity_cli_uses_the_deployed_gpu_count(tmp_path, capsys):
    out = tmp_path / "cap.json"
    assert (
        cli.main(
            [
                "sim",
                "capacity",
                "--profile",
                "h100-llama-3.1-8b-measured",
                "--policy",
                "partitioned",
                "--prefill-gpus",
                "1,1",
                "--decode-gpus",
                "1,1",
                "--prefill-gpu-ids",
                "0,0",
                "--decode-gpu-ids",
                "0,0",
                "--num-models",
                "2",
                "--tpot-slo-ms",
                "40",
                "--ttft-slo-ms",
                "1000",
                "--start-rate",
                "8",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["simulated"] and doc["gpus"] == 1 and doc["cluster"]["num_gpus"] == 1
    cap = doc["capacity"][0]
    assert cap["status"] == "converged" and cap["at_capacity"]["delivered_tok_s_per_gpu"] == pytest.approx(
        cap["at_capacity"]["delivered_tok_s"]
    )
