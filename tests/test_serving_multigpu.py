"""The issue-7 driver's planner and YAML generation (experiments/serving_multigpu.py), on CPU: nothing starts."""

from __future__ import annotations

import argparse

import pytest
import yaml

from experiments import serving_multigpu as mg


@pytest.fixture
def nccl_ok(monkeypatch):
    """The CPU torch build has no NCCL; the config check asks for it when kv_transport is nccl on cuda."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)


def test_eight_gpus_whole_gpus_and_nccl():
    plans = mg.plan(8, 4)
    sun, part = plans["sun"], plans["partitioned"]
    assert sun.fits and part.fits
    assert sun.transport == part.transport == "nccl"
    assert (sun.prefill_share, sun.decode_share, part.prefill_share, part.decode_share) == (
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert part.decode_workers == 4 and part.gpus == 8  # one decode GPU per model
    assert sun.decode_workers == 2 and sun.gpus == 6  # SUN: fewer decode GPUs
    assert sun.decode_gpus < part.decode_gpus


def test_four_gpus_pack_prefill_and_colocate_partitioned_decode():
    plans = mg.plan(
        4, 4
    )  # 4 + 4 whole GPUs do not fit 4: fractional GPUs, prefill and decode on separate GPUs
    sun, part = plans["sun"], plans["partitioned"]
    assert sun.fits and part.fits, (sun.reason, part.reason)
    assert sun.transport == part.transport == "nccl"
    assert mg.plan(4, 4, transport="object_store")["sun"].transport == "object_store"
    # prefill: 28 GB each (16 + 8 + 4), floor(80 / 28) = 2 per GPU -> 2 GPUs at num_gpus 0.5
    assert (sun.prefill_gpus, sun.prefill_share) == (2, 0.5) == (part.prefill_gpus, part.prefill_share)
    # SUN: 2 decode workers, a GPU each; partitioned: 4 workers on the 2 GPUs left, 2 x 36 GB <= 80
    assert (sun.decode_workers, sun.decode_share, sun.decode_gpus) == (2, 1.0, 2)
    assert (part.decode_workers, part.decode_share, part.decode_gpus) == (4, 0.5, 2)
    assert sun.gpus == part.gpus == 4
    assert any("2 x 36 = 72 GB" in line for line in part.memory)


def test_does_not_fit():
    # decode KV too large to share a GPU: 16 + 24 + 4 = 44 GB > 40 GB (half of 80)
    part = mg.plan(4, 4, decode_kv_gb=24)["partitioned"]
    assert not part.fits and "44 GB" in part.reason and "num_gpus 0.5" in part.reason
    assert mg.plan(4, 4, decode_kv_gb=24)["sun"].fits  # SUN's 2 workers still have a GPU each
    # forcing nccl on 4 GPUs: 4 prefill + 2 decode > 4
    sun = mg.plan(4, 4, transport="nccl")["sun"]
    assert not sun.fits and "nccl" in sun.reason
    # too few GPUs: everything shares 2 GPUs, too little memory per actor
    tiny = mg.plan(2, 4)
    assert not tiny["sun"].fits and not tiny["partitioned"].fits
    # a module larger than the GPU
    assert not mg.plan(8, 4, gpu_mem_gb=16)["sun"].fits


def test_h200_memory_packs_three_prefill_modules():
    sun = mg.plan(4, 6, gpu_mem_gb=141)["sun"]  # floor(141 / 28) = 5 -> 6 modules over 2 GPUs, 3 each
    assert sun.fits and sun.prefill_gpus == 2 and sun.prefill_share == 0.33


@pytest.mark.parametrize("gpus", [8, 4])
def test_yaml_validates(tmp_path, gpus, nccl_ok):
    for p in mg.plan(gpus, 4).values():
        path = mg.write_yaml(p, tmp_path / f"{p.name}.yaml", tokenizer="/tmp/tok")
        cfg = yaml.safe_load(path.read_text())
        mg.validate(cfg)  # the same pydantic checks build_decode_app / build_app run
        apps = {a["name"]: a["args"] for a in cfg["applications"]}
        dec, app = apps["sunray-decode"], apps["sunray"]
        assert dec["kv_transport"] == app["kv_transport"] == p.transport
        assert dec["decode_workers"] == p.decode_workers
        assert dec["decode_worker_options"]["num_gpus"] == p.decode_share
        assert [m["ray_actor_options"]["num_gpus"] for m in app["models"]] == [p.prefill_share] * 4
        assert cfg["http_options"]["port"] == mg.PORT and app["tokenizer"] == "/tmp/tok"
        if p.policy == "partitioned":  # one decode worker pinned to each model
            assert dec["router_policy"] == "partitioned"
            assert sorted(i for ids in dec["partition"].values() for i in ids) == list(range(4))
            assert all(len(ids) == 1 for ids in dec["partition"].values())
            assert set(dec["partition"]) == {m["name"] for m in app["models"]}
        else:
            assert dec["router_policy"] == "sun" and "partition" not in dec


def test_nccl_with_fractional_gpus_validates(nccl_ok):
    """Prefill replicas sharing a GPU and decode workers sharing another still move KV over NCCL: the config takes
    num_gpus < 1 with nccl (a pair on one GPU is refused when it forms, not here)."""
    p = mg.plan(4, 4)["partitioned"]
    assert p.transport == "nccl" and p.prefill_share == p.decode_share == 0.5
    mg.validate(mg.serve_config(p))


def test_dry_run_and_simulator(tmp_path, capsys):
    assert mg.main(["--gpus", "4", "--models", "4", "--out", str(tmp_path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "sun-2" in text and "partitioned-4" in text and "multigpu-sun-2.yaml" in text
    assert mg.main(["--gpus", "2", "--models", "4", "--out", str(tmp_path / "x"), "--dry-run"]) == 1
    # the simulator's prediction for the same setting, per rate
    a = argparse.Namespace(
        rates=[16.0, 64.0],
        input_len=64,
        output_len=16,
        num_requests=200,
        duration=4.0,
        seed=0,
        ttft_slo_ms=1000.0,
        tpot_slo_ms=50.0,
        decode_kv_gb=16.0,
        max_num_seqs=256,
    )
    plans = mg.plan(8, 4)
    for p in plans.values():
        pts = mg.simulate(p, 1.5, a, tmp_path)
        assert [x["rate"] for x in pts] == [16.0, 64.0]
        assert all(x["tok_s_per_gpu"] > 0 and x["tpot_p50_ms"] > 0 for x in pts)
    doc = {
        "command": "c",
        "date": "d",
        "machine": "m",
        "workload": {},
        "plans": {k: {**mg.asdict(p), "gpus": p.gpus} for k, p in plans.items()},
        "results": [{"config": "sun-2", "gpus": 6, "alpha": 1.5, "rate": 16.0, "live": None, "sim": pts[0]}],
    }
    md = mg.markdown(doc)
    assert "| sun-2 | 6 | 1.5 | 16 |" in md and "kv_transport nccl" in md
