"""experiments/validate_gpu.py on CPU: its simulated clusters are the deployed ones, and its capacity mode runs the
simulator's capacity search against live capacity points (synthetic here) with the three profiles."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import serving_capacity as sc
from experiments import validate_gpu as vg
from loadgen.cli import _cluster as cli_cluster
from loadgen.cli import build_parser

DEPLOYED_GPUS = {
    "sim-validation-h100": 1,  # deployments/gpu-8b.yaml: two prefill replicas and the decode worker on one GPU
    "sim-validation-h100x4": 3,
    "sim-validation-h100x4-partitioned": 4,
    "sim-validation-h100x4-sun2": 4,
}


@pytest.mark.parametrize("dataset", vg.DATASETS, ids=lambda d: d[0])
def test_validation_clusters_count_the_deployed_gpus(dataset):
    name, _, _, _, flags, _ = dataset
    parser = build_parser()
    m = 2 if name == "sim-validation-h100" else 4
    args = parser.parse_args(["sim", "run", "--rate", "1", "--num-models", str(m), *flags])
    cl = cli_cluster(args, parser, tuple(f"m{i}" for i in range(m)), [1.0] * m)
    assert cl.num_gpus == DEPLOYED_GPUS[name]


def _status(ms_per_batch: dict[int, float]) -> dict:
    return {
        "router": {
            "workers": {
                "w0": {
                    "step_times": {
                        str(b): {"steps": 500, "mean_ms": ms, "mean_batch": float(b)}
                        for b, ms in ms_per_batch.items()
                    }
                }
            }
        }
    }


def _live(cap: float, tpot_p50: float, slo: float) -> dict:
    return {
        "tpot_slo_ms": slo,
        "ttft_slo_ms": 1000.0,
        "label": "x",
        "capacity_rate": cap,
        "bracket": [cap, cap * 1.1],
        "status": "converged",
        "tpot_ms": {"p50": tpot_p50, "p90": tpot_p50 * 1.2},
        "ttft_ms": {"p50": 60.0},
    }


def test_capacity_mode_compares_live_and_simulated_capacity(tmp_path):
    mem = sc.memory_from_shape("llama-3.1-8b", gpu_gib=78.85)
    sun, conv = sc.plan(2, "sun", mem), sc.plan(2, "conv", mem)
    part = {
        "tag": "part1",
        "command": "c",
        "date": "2026-12-07",
        "machine": "NVIDIA H100 80GB HBM3",
        "dry_run": False,
        "profile": "h100-llama-3.1-8b-measured",
        "settings": dataclasses.asdict(sc.ServeSettings()),
        "workload": {
            "alpha": 0.0,
            "input_len": 256,
            "output_len": 128,
            "seed": 0,
            "tpot_slo_ms": [20.0, 40.0],
            "ttft_slo_ms": 1000.0,
            "target": 0.9,
            "probe": {"warmup_s": 3.0, "measure_s": 6.0},
            "search": {"growth": 2.0, "resolution": 0.1},
        },
        "results": [
            {"layout": dataclasses.asdict(sun), "live": [_live(30.0, 15.0, 20.0), _live(50.0, 30.0, 40.0)]},
            {"layout": dataclasses.asdict(conv), "live": [_live(12.0, 17.0, 20.0), _live(30.0, 35.0, 40.0)]},
            {"layout": dataclasses.asdict(sc.plan(2, "qsun", mem)), "not_run": "refused"},
        ],
    }
    (tmp_path / "part1.json").write_text(json.dumps(part))
    rec = tmp_path / "records" / "part1"
    for name, steps in (
        ("sun-2", {1: 7.5, 16: 9.0, 64: 13.0, 128: 19.0}),
        ("conv-2", {1: 9.0, 16: 11.0, 64: 16.0}),
    ):
        (rec / name).mkdir(parents=True)
        (rec / name / "status-after.json").write_text(json.dumps(_status(steps)))
    out = tmp_path / "val" / "cap"
    assert (
        vg.main(
            [
                "--capacity",
                str(tmp_path / "part1.json"),
                "--records",
                str(tmp_path / "records"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["layout"], r["tpot_slo_ms"]): r for r in doc["rows"]}
    assert set(rows) == {("sun-2", 20.0), ("sun-2", 40.0), ("conv-2", 20.0), ("conv-2", 40.0)}
    for (layout, _), r in rows.items():
        assert {"offline", "in_situ"} <= set(r) and ("held_out" in r) == (layout == "conv-2")
        for kind in ("offline", "in_situ"):
            s = r[kind]
            assert s["capacity"] > 0 and s["capacity_ratio"] == pytest.approx(
                s["capacity"] / r["live_capacity"], abs=1e-3
            )
    # the SLO of 40 ms is looser: the simulator finds at least the capacity it found at 20 ms
    assert rows[("sun-2", 40.0)]["in_situ"]["capacity"] >= rows[("sun-2", 20.0)]["in_situ"]["capacity"]
    md = out.with_suffix(".md").read_text()
    assert "| part1 | conv-2 | 20 |" in md and "held out" in md and "points within the target" in md
