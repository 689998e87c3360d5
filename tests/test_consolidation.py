"""The single-GPU consolidation experiment (experiments/consolidation_gpu.py) and the profile measurement
(experiments/measure_profile.py) on a tiny model on the CPU: output structure, timing invariants, the fits logic under a
fake memory budget. The real run is on the GPU machine (experiments/run_gpu.sh)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import consolidation_gpu as cg
from experiments.measure_profile import fill_missing, measure_profile
from sunray.models import presets

pytestmark = pytest.mark.usefixtures("single_thread")

CONTEXT, WARMUP, STEPS = 24, 1, 3
SETUP = cg.Setup(CONTEXT, WARMUP, STEPS)


def _run(cfg, **kw) -> dict:
    kw = {
        "models": [2],
        "batch_sizes": [1, 3],
        "context": CONTEXT,
        "steps": STEPS,
        "warmup": WARMUP,
        "device": "cpu",
        "slos_ms": [1e-9, 1e9],
        "log": lambda s: None,
        **kw,
    }
    return cg.run_consolidation(cfg, **kw)


def test_structure_and_timing_invariants(tiny_model_config):
    r = _run(tiny_model_config)
    assert r["context"] == CONTEXT and r["steps"] == STEPS and r["device"].startswith("cpu")
    assert r["memory"]["free_at_start_bytes"] is None  # CPU without a budget: everything fits
    (entry,) = r["models"]
    assert entry["num_models"] == 2 and entry["weights_fit"] and entry["copies_built"] == 2
    for p in entry["sun"]:
        assert p["fits"] and p["tokens"] == p["batch"] * STEPS
        assert p["tok_per_s"] == pytest.approx(p["tokens"] / p["time_s"], rel=1e-3)
        assert p["tpot_ms_mean"] > 0 and len(p["step_ms"]) == STEPS
        assert set(p["tpot_ms_by_model"]) == {f"task-{i}" for i in range(min(2, p["batch"]))}
    assert [p["batch"] for p in entry["sun"]] == [1, 3]
    for p in entry["conventional"]:
        m, b = 2, p["per_model_batch"]
        assert p["fits"] and p["status"] == cg.MEASURED and p["batch"] == m * b
        assert p["tokens"] == m * b * STEPS
        assert p["tok_per_s"] == pytest.approx(p["tokens"] / p["time_s"], rel=1e-3)
        # throughput = M x b per round
        assert p["tok_per_s"] == pytest.approx(m * b / p["round_ms_mean"] * 1e3, rel=1e-2)
        assert len(p["step_ms"]) == m and all(len(row) == STEPS for row in p["step_ms"])
        for k, rnd in enumerate(p["round_ms"]):
            steps = [row[k] for row in p["step_ms"]]
            assert all(rnd >= s for s in steps)  # a round covers every engine's step
            assert rnd >= sum(steps) - 2e-3  # (values rounded to 1 us)
        # between two tokens of a sequence, every engine stepped once
        assert p["tpot_ms_mean"] >= sum(min(row) for row in p["step_ms"]) - 2e-3
        proj = p["projected"]  # checked against the measurement where it fits
        sun_step = next(q["step_ms_mean"] for q in entry["sun"] if q["batch"] == b)
        assert proj["round_ms"] == pytest.approx(m * sun_step, abs=2e-3)
        assert proj["measured_over_projected"] > 0
    tight, loose = r["slo"]
    assert tight["sun"] is None and tight["conventional_measured"] is None and tight["ratio_measured"] is None
    best_sun = max(entry["sun"], key=lambda p: p["tok_per_s"])
    best_conv = max(entry["conventional"], key=lambda p: p["tok_per_s"])
    assert loose["sun"]["tok_per_s"] == best_sun["tok_per_s"] and loose["sun"]["batch"] == best_sun["batch"]
    assert loose["conventional_measured"]["tok_per_s"] == best_conv["tok_per_s"]
    assert loose["ratio_measured"] == round(best_sun["tok_per_s"] / best_conv["tok_per_s"], 2)
    json.dumps(r)  # JSON-able
    md = cg.to_markdown(r)
    assert "## M = 2" in md and "Best decode throughput at equal TPOT" in md
    assert f"**{cg.PROJECTED}**" not in md  # nothing projected: everything fits


def test_fits_logic_with_a_fake_budget(tiny_model_config):
    """Room for two copies and their KV at b = 1, not at b = 3, and never for three copies: those points are not
    run, and carry the arithmetic and a projection from the single-engine step."""
    lm = presets.dummy_model(tiny_model_config)
    w = cg.model_bytes(lm)
    kv1, kv3 = (SETUP.kv_bytes(tiny_model_config, torch.float32, b) for b in (1, 3))
    budget = 2 * (w + kv1) + kv1 // 2
    assert 2 * (w + kv3) > budget and 3 * w > budget
    r = _run(
        tiny_model_config,
        models=[2, 3],
        memory_budget_bytes=budget,
        engine_reserve_bytes=0,
        global_reserve_bytes=0,
    )
    assert r["memory"]["free_at_start_bytes"] == budget and r["memory"]["copy_bytes"] == w
    two, three = r["models"]
    assert all(p["fits"] for e in (two, three) for p in e["sun"])  # one copy always fits
    fit, nofit = two["conventional"]
    assert fit["fits"] and fit["status"] == cg.MEASURED and fit["memory"]["need_bytes"] <= budget
    assert not nofit["fits"] and nofit["status"] == cg.PROJECTED and "tokens" not in nofit
    assert nofit["memory"]["need_bytes"] == 2 * (w + kv3) > nofit["memory"]["available_bytes"] == budget
    assert ">" in nofit["memory"]["arithmetic"]
    sun3 = next(p for p in two["sun"] if p["batch"] == 3)
    assert nofit["projected"]["round_ms"] == pytest.approx(2 * sun3["step_ms_mean"], abs=2e-3)
    assert nofit["projected"]["tok_per_s"] == pytest.approx(3 / sun3["step_ms_mean"] * 1e3, rel=1e-2)
    assert not three["weights_fit"] and three["copies_built"] == 2
    assert all(p["status"] == cg.PROJECTED and not p["fits"] for p in three["conventional"])
    loose3 = [row for row in r["slo"] if row["num_models"] == 3 and row["tpot_slo_ms"] == 1e9][0]
    assert loose3["conventional_measured"] is None and loose3["ratio_measured"] is None
    assert loose3["conventional_with_projection"]["status"] == cg.PROJECTED
    assert loose3["ratio_with_projection"] is not None
    md = cg.to_markdown(r)
    assert md.count(f"**{cg.PROJECTED}**") >= 3


def test_cli_writes_json_and_markdown(tiny_model_config, tmp_path, monkeypatch):
    monkeypatch.setitem(presets.SHAPES, "tiny-test", tiny_model_config)
    out = tmp_path / "res"
    rc = cg.main(
        [
            "--shape",
            "tiny-test",
            "--models",
            "2",
            "--batch-sizes",
            "2",
            "--context",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--slo-ms",
            "1000",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads((out / "serving-gpu.json").read_text())
    assert r["shape"] == "tiny-test" and r["command"].startswith("python -m experiments.consolidation_gpu")
    assert r["slo"][0]["tpot_slo_ms"] == 1000
    assert r["command"] in (out / "serving-gpu.md").read_text()


def test_dummy_model_builds_in_its_final_dtype(tiny_model_config, monkeypatch):
    monkeypatch.setitem(presets.SHAPES, "tiny-test", tiny_model_config)
    a = presets.dummy_model("tiny-test", seed=3)
    b = presets.dummy_model(tiny_model_config, seed=3)
    assert a.fingerprint == b.fingerprint and a.dtype == torch.float32
    # named by the recipe: values drawn on CUDA depend on the SMs a process sees (MPS limits), a seed does not
    assert (
        a.fingerprint.weights
        == presets.dummy_weights_id(3)
        != presets.dummy_model("tiny-test").fingerprint.weights
    )
    bf = presets.dummy_model(tiny_model_config, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}
    assert bf.model.rope.cos.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown shape"):
        presets.dummy_model("nope")


def test_fill_missing_extrapolates_along_context():
    row, filled = fill_missing([256, 512, 1024, 2048], [10.0, 12.0, 16.0, None])
    assert filled == [3] and row == [10.0, 12.0, 16.0, 24.0]
    row, filled = fill_missing([1, 2, 3], [None, 5.0, 6.0])
    assert filled == [0] and row[0] == 4.0
    assert fill_missing([1, 2], [1.0, 2.0]) == ([1.0, 2.0], [])
    with pytest.raises(ValueError, match="extrapolate"):
        fill_missing([1, 2, 3], [None, 5.0, None])


def test_measure_profile_on_a_tiny_model(tiny_model_config):
    prof = measure_profile(
        tiny_model_config,
        device="cpu",
        batch_sizes=[1, 2],
        contexts=[8, 16],
        prompt_lens=[8],
        steps=2,
        log=lambda s: None,
    )
    assert prof.source == "measured" and prof.model == "custom" and prof.decode_batch == [1.0, 2.0]
    assert len(prof.decode_ms) == 2 and all(len(r) == 2 and min(r) > 0 for r in prof.decode_ms)
    assert prof.kv_capacity_tokens > 0 and "torch, eager" in prof.notes and "NOT measured" not in prof.notes
