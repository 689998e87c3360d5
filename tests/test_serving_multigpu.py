"""The multi-GPU driver's planner, YAML generation, simulator cluster and report (experiments/serving_multigpu.py),
on CPU: nothing starts."""

from __future__ import annotations

import argparse

import pytest
import yaml

from experiments import serving_multigpu as mg
from loadgen.cli import _cluster as cli_cluster
from loadgen.cli import build_parser


@pytest.fixture
def nccl_ok(monkeypatch):
    """The CPU torch build has no NCCL; the config check asks for it when kv_transport is nccl on cuda."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)


def test_eight_gpus_conventional_gets_a_dedicated_gpu_per_model():
    plans = mg.plan(8, 4)
    sun, conv = plans["sun"], plans["partitioned"]
    assert sun.fits and conv.fits
    assert sun.transport == conv.transport == "nccl"
    # the same prefill in both: a whole GPU for each of the 4 replicas
    assert (sun.prefill_gpus, sun.prefill_per_gpu, sun.prefill_share) == (4, 1, 1.0)
    assert (conv.prefill_gpus, conv.prefill_per_gpu, conv.prefill_share) == (4, 1, 1.0)
    assert conv.decode_workers == 4 and conv.decode_per_model == 1 and conv.gpus == 8
    assert sun.decode_workers == 2 and sun.gpus == 6 and sun.name == "sun-2" and conv.name == "conv-4"


def test_prefill_packs_where_conventional_leaves_too_little_room():
    # 6 GPUs: conventional's 4 decode GPUs leave 2 for 4 prefill replicas (2 per GPU, 56 GB <= 80)
    conv, sun = mg.plan(6, 4)["partitioned"], mg.plan(6, 4)["sun"]
    assert conv.fits and (conv.prefill_gpus, conv.prefill_per_gpu, conv.prefill_share) == (2, 2, 0.5)
    assert (sun.prefill_gpus, sun.prefill_per_gpu) == (2, 2) and sun.gpus == 4 and conv.gpus == 6
    # 4 x H100 with 2 models: 2 prefill GPUs + 2 dedicated decode GPUs; SUN 1 shared decode GPU
    p = mg.plan(4, 2)
    assert (p["partitioned"].gpus, p["sun"].gpus, p["sun"].decode_workers) == (4, 3, 1)


def test_conventional_that_cannot_have_dedicated_gpus_does_not_fit():
    plans = mg.plan(4, 4)  # 4 decode GPUs leave none for prefill: never time-sliced half GPUs instead
    conv, sun = plans["partitioned"], plans["sun"]
    assert not conv.fits and "4 decode GPU(s)" in conv.reason and "> 4 GPUs" in conv.reason
    assert sun.fits and sun.gpus == 4 and sun.prefill_per_gpu == 2  # SUN alone still has a plan
    # two dedicated decode GPUs per model need 8 + prefill > 8
    assert not mg.plan(8, 4, decode_per_model=2)["partitioned"].fits
    assert mg.plan(16, 4, decode_per_model=2)["partitioned"].decode_workers == 8
    # a decode worker larger than a GPU, a prefill replica larger than a GPU
    assert not mg.plan(8, 4, decode_kv_gb=70)["sun"].fits
    assert not mg.plan(8, 4, gpu_mem_gb=16)["sun"].fits


@pytest.mark.parametrize("gpus,models,dpm", [(8, 4, 1), (4, 2, 1), (16, 4, 2)])
def test_yaml_validates(tmp_path, gpus, models, dpm, nccl_ok):
    for p in mg.plan(gpus, models, decode_per_model=dpm).values():
        assert p.fits, p.reason
        path = mg.write_yaml(p, tmp_path / f"{p.name}.yaml", tokenizer="/tmp/tok")
        cfg = yaml.safe_load(path.read_text())
        mg.validate(cfg)  # the same pydantic checks build_decode_app / build_app run
        apps = {a["name"]: a["args"] for a in cfg["applications"]}
        dec, app = apps["sunray-decode"], apps["sunray"]
        assert dec["kv_transport"] == app["kv_transport"] == "nccl"
        assert dec["decode_workers"] == p.decode_workers
        assert dec["decode_worker_options"]["num_gpus"] == 1  # whole GPUs, always
        assert [m["ray_actor_options"]["num_gpus"] for m in app["models"]] == [p.prefill_share] * models
        assert cfg["http_options"]["port"] == mg.PORT and app["tokenizer"] == "/tmp/tok"
        assert (app["ingress_replicas"], app["stream_interval"]) == (4, 8)  # the same front for both layouts
        assert dec["engine"]["overlap_steps"] is True  # serving's default
        if p.policy == "partitioned":  # each model's own decode workers, disjoint
            assert dec["router_policy"] == "partitioned"
            ids = [i for ids in dec["partition"].values() for i in ids]
            assert sorted(ids) == list(range(models * dpm))
            assert all(len(ids) == dpm for ids in dec["partition"].values())
            assert set(dec["partition"]) == {m["name"] for m in app["models"]}
        else:
            assert dec["router_policy"] == "sun" and "partition" not in dec


@pytest.mark.parametrize("gpus,models", [(8, 4), (6, 4), (4, 2)])
def test_simulated_cluster_is_the_deployed_one(gpus, models):
    """The simulator's GPU count (what per GPU divides by) is the plan's, packing and all."""
    parser = build_parser()
    for p in mg.plan(gpus, models).values():
        flags = mg.sim_cluster_flags(p, 16.0, 256)
        args = parser.parse_args(["sim", "run", "--rate", "1", "--num-models", str(models), *flags])
        cl = cli_cluster(args, parser, tuple(f"model-{i}" for i in range(models)), [1.0] * models)
        assert cl.num_gpus == p.gpus
        assert cl.num_decode == p.decode_workers and cl.decode_workers_per_gpu == 1
        assert cl.prefill_modules_per_gpu == p.prefill_per_gpu


def test_dry_run_simulated_capacity_and_report(tmp_path, capsys):
    assert mg.main(["--gpus", "8", "--models", "4", "--out", str(tmp_path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "sun-2" in text and "conv-4" in text and "multigpu-sun-2.yaml" in text
    assert mg.main(["--gpus", "4", "--models", "4", "--out", str(tmp_path / "x"), "--dry-run"]) == 1
    a = argparse.Namespace(
        input_len=64,
        output_len=16,
        seed=0,
        tpot_slo_ms=[40.0],
        ttft_slo_ms=1000.0,
        target=0.9,
        warmup=1.0,
        measure=3.0,
        start_rate=16.0,
        growth=2.0,
        resolution=0.1,
        decode_kv_gb=16.0,
        max_num_seqs=256,
    )
    plans = mg.plan(8, 4)
    results = []
    for p in plans.values():
        for alpha in (0.0, 1.5):
            sim = mg.simulate(p, alpha, a, tmp_path)
            assert sim[0]["capacity_rate"] > 0 and sim[0]["tok_s_per_gpu"] > 0
            # as if live had found the simulator's capacity: the report and the comparison run on it
            results.append(
                {
                    "config": p.name,
                    "policy": p.policy,
                    "gpus": p.gpus,
                    "alpha": alpha,
                    "live": {"capacity": sim},
                }
            )
    comps = mg.comparisons(results, 0.05)
    assert [c["alpha"] for c in comps] == [0.0, 1.5]
    assert all(c["verdict"] in ("higher", "lower", "inconclusive") for c in comps)
    doc = {
        "command": "c",
        "date": "d",
        "machine": "m",
        "workload": {"target": 0.9, "ttft_slo_ms": 1000.0},
        "profile": mg.PROFILE,
        "noise": 0.05,
        "plans": {k: {**mg.asdict(p), "gpus": p.gpus} for k, p in plans.items()},
        "results": results + [{"config": "sun-2", "policy": "sun", "gpus": 6, "alpha": 1.0}],
        "comparisons": comps,
    }
    md = mg.markdown(doc)
    assert (
        "| sun-2 | 6 | 1.5 | 40 |" in md
        and "kv_transport nccl" in md
        and "| sun-2 | 6 | 1 | - | not run |" in md
    )
    assert "capacity per GPU SUN / conv." in md
