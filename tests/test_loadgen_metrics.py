"""Metrics against hand-computed traces."""

from __future__ import annotations

import pytest

from loadgen.metrics import SLO, RequestRecord, percentiles, run_duration, summarize


def _trace() -> list[RequestRecord]:
    a = RequestRecord(
        0,
        "x",
        "ok",
        scheduled_s=1.0,
        sent_s=1.0,
        first_token_s=1.1,
        end_s=1.45,
        chunk_s=[1.1, 1.2, 1.4],
        prompt_len=10,
        prompt_tokens=12,
        completion_tokens=3,
    )
    # two chunks carrying four tokens: TPOT uses the usage count
    b = RequestRecord(
        1,
        "y",
        "ok",
        scheduled_s=2.0,
        sent_s=2.0,
        first_token_s=2.15,
        end_s=2.25,
        chunk_s=[2.15, 2.2],
        prompt_len=20,
        completion_tokens=4,
    )
    c = RequestRecord(2, "x", "refused", scheduled_s=3.0, sent_s=3.0, end_s=3.01, http_status=429)
    d = RequestRecord(3, "y", "error", scheduled_s=4.0, sent_s=4.0, end_s=4.02, http_status=400)
    e = RequestRecord(4, "x", "cancelled", scheduled_s=5.0, sent_s=5.5, first_token_s=5.6, chunk_s=[5.6])
    return [a, b, c, d, e]


def test_per_request_metrics():
    a, b, c, _, e = _trace()
    assert a.ttft == pytest.approx(0.1)
    assert a.tpot == pytest.approx(0.15)  # (1.4 - 1.1) / (3 - 1)
    assert a.itl == pytest.approx([0.1, 0.2])
    assert a.e2e == pytest.approx(0.45)
    assert b.tpot == pytest.approx(0.05 / 3)
    assert b.output_tokens == 4
    assert c.tpot is None and c.e2e is None and c.ttft is None
    assert e.tpot is None and e.e2e is None
    assert RequestRecord.from_json(a.to_json()) == a


def test_summary_by_hand():
    s = summarize(_trace(), duration_s=10.0, num_gpus=2, slo=SLO(ttft_ms=200, tpot_ms=100))
    o = s["overall"]
    assert (o["requests"], o["ok"], o["refused"], o["error"], o["cancelled"]) == (5, 2, 1, 1, 1)
    assert o["output_tokens"] == 7 and o["input_tokens"] == 12 + 20  # usage where given, else the spec
    assert o["request_throughput"] == pytest.approx(0.2)
    assert o["output_token_throughput"] == pytest.approx(0.7)
    assert o["output_token_throughput_per_gpu"] == pytest.approx(0.35)
    assert o["total_token_throughput"] == pytest.approx(3.9)
    assert o["ttft_ms"]["p50"] == pytest.approx(125.0)
    assert o["ttft_ms"]["p90"] == pytest.approx(145.0)
    assert o["tpot_ms"]["mean"] == pytest.approx((150 + 50 / 3) / 2, abs=1e-3)
    assert o["itl_ms"]["mean"] == pytest.approx((100 + 200 + 50) / 3, abs=1e-3)
    # a misses the TPOT SLO (150 ms), b meets both; the refused, failed and cancelled ones are misses
    assert o["slo_attainment"] == pytest.approx(0.2)
    assert o["goodput_requests"] == pytest.approx(0.1)
    assert o["goodput_tokens"] == pytest.approx(0.4)
    assert o["send_lag_ms"]["p99"] == pytest.approx(480.0)  # lags 0, 0, 0, 0, 500 ms: p99 interpolates
    assert s["per_model"]["x"]["requests"] == 3 and s["per_model"]["y"]["ok"] == 1
    assert "output_token_throughput_per_gpu" not in s["per_model"]["x"]


def test_duration_and_empty():
    assert run_duration(_trace()) == pytest.approx(4.5)  # first send 1.0, last seen 5.5 (a send)
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    s = summarize([], duration_s=0.0)
    assert s["overall"]["requests"] == 0 and s["overall"]["request_throughput"] is None


def test_slo_validation():
    with pytest.raises(ValueError):
        SLO(ttft_ms=0)
