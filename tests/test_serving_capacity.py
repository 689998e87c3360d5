"""The single-GPU capacity driver (experiments/serving_capacity.py) on CPU: plans and memory, the Serve YAMLs (MPS
share, KV budget, partition), the QSUN config's refusal, the simulated cluster, the verdicts and the report.
Nothing is deployed here; `python -m experiments.serving_capacity --dry-run` runs the whole pipeline."""

from __future__ import annotations

import argparse

import pytest
import yaml

from experiments import serving_capacity as sc
from loadgen.cli import _cluster as cli_cluster
from loadgen.cli import build_parser

H100 = sc.memory_from_shape("llama-3.1-8b", gpu_gib=78.85)
H200 = sc.memory_from_shape("llama-3.1-8b", gpu_gib=139.0)


def test_weights_from_the_shape():
    assert H100.weights_gib == pytest.approx(14.96, abs=0.01)  # 8.03e9 bf16 parameters
    assert 5.0 < H100.int4_weights_gib < 6.0  # int4 linears + bf16 embeddings and LM head


def test_what_fits_one_gpu():
    fits = {(m, k): sc.plan(m, k, H100).fits for m in (2, 4) for k in sc.KINDS}
    assert fits == {
        (2, "sun"): True,
        (2, "conv"): True,  # 4 weight copies + 8 GiB KV: 76.8 GiB
        (2, "qsun"): True,
        (4, "sun"): False,  # 5 copies alone are 74.8 GiB
        (4, "conv"): False,  # 8 copies: 119.7 GiB
        (4, "qsun"): False,
    }
    assert sc.plan(4, "sun", H200).fits and not sc.plan(4, "conv", H200).fits
    conv = sc.plan(4, "conv", H200)
    assert "4 x (14.96 weights + 2 KV) decode" in conv.memory and "> 139 GiB" in conv.reason


def test_equal_kv_budget_and_the_mps_share():
    sun, conv, q = (sc.plan(2, k, H100) for k in ("sun", "conv", "qsun"))
    assert sun.decode_workers == q.decode_workers == 1 and conv.decode_workers == 2
    assert sun.kv_mb_per_worker == 8192 and conv.kv_mb_per_worker == 4096  # the same 8 GiB in all
    assert sun.kv_mb_per_worker == conv.kv_mb_per_worker * conv.decode_workers
    assert (sun.mps_percentage, conv.mps_percentage) == (None, 50)
    assert sc.plan(4, "conv", H200).mps_percentage == 25
    assert sc.plan(2, "conv", H100, mps=False).mps_percentage is None
    # the Ray GPU shares of the actors on the one GPU add up to at most 1
    assert (
        2 * sun.prefill_share + sun.decode_share <= 1 and 2 * conv.prefill_share + 2 * conv.decode_share <= 1
    )
    assert q.quantization == "int4-g128" and conv.policy == "partitioned" and sun.policy == "sun"


def test_yamls_validate_and_carry_the_mps_share(tmp_path):
    s = sc.ServeSettings(tokenizer="/tmp/tok")
    for kind in ("sun", "conv"):
        lay = sc.plan(2, kind, H100)
        path = sc.write_yaml(lay, tmp_path / f"{lay.name}.yaml", s)
        cfg = yaml.safe_load(path.read_text())
        sc.validate(cfg)  # what build_decode_app / build_app check
        apps = {a["name"]: a["args"] for a in cfg["applications"]}
        dec, app = apps["sunray-decode"], apps["sunray"]
        assert dec["kv_transport"] == app["kv_transport"] == "cuda_ipc"
        assert (
            dec["engine"]["kv_cache_mb"] == lay.kv_mb_per_worker
            and dec["decode_workers"] == lay.decode_workers
        )
        opts = dec["decode_worker_options"]
        assert opts["num_gpus"] == lay.decode_share
        assert [m["name"] for m in app["models"]] == sc.model_names(2) and app[
            "dummy_shape"
        ] == "llama-3.1-8b"
        if kind == "conv":
            assert opts["runtime_env"] == {"env_vars": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}}
            assert dec["router_policy"] == "partitioned" and dec["partition"] == {
                "llama8b-task0": [0],
                "llama8b-task1": [1],
            }
        else:
            assert "runtime_env" not in opts and dec["router_policy"] == "sun" and "partition" not in dec
    # on a CPU (the dry run) nobody asks Ray for a GPU
    cpu = sc.serve_config(
        sc.plan(2, "conv", H100), sc.ServeSettings(device="cpu", module="/m", kv_transport="object_store")
    )
    apps = {a["name"]: a["args"] for a in cpu["applications"]}
    assert apps["sunray-decode"]["decode_worker_options"]["num_gpus"] == 0
    assert all(
        m["ray_actor_options"]["num_gpus"] == 0 and m["prefill_module"] == "/m"
        for m in apps["sunray"]["models"]
    )


def test_qsun_config_validates_and_what_does_not_fit_is_not_run(tmp_path):
    res = sc.prepare(sc.plan(2, "qsun", H100), sc.ServeSettings(tokenizer="/tmp/tok"), tmp_path)
    assert "not_run" not in res, res.get("not_run")
    written = yaml.safe_load((tmp_path / "qsun-2" / "qsun-2.yaml").read_text())
    assert all(a["args"][sc.QSUN_KEY] == "int4-g128" for a in written["applications"])
    res = sc.prepare(sc.plan(4, "conv", H100), sc.ServeSettings(), tmp_path)
    assert res["not_run"].startswith("does not fit one GPU") and "yaml" not in res
    # the shipped config names the same key
    shipped = yaml.safe_load((sc.ROOT / "deployments/gpu-8b-int4.yaml").read_text())
    assert all(a["args"][sc.QSUN_KEY] == "int4-g128" for a in shipped["applications"])


@pytest.mark.parametrize("kind", ["sun", "conv"])
def test_simulated_cluster_is_one_gpu_as_deployed(kind):
    lay = sc.plan(2, kind, H100)
    parser = build_parser()
    args = parser.parse_args(
        ["sim", "run", "--rate", "1", "--num-models", "2", *sc.sim_flags(lay, sc.ServeSettings(), 131072)]
    )
    cl = cli_cluster(args, parser, tuple(sc.model_names(2)), [0.5, 0.5])
    assert cl.num_gpus == 1 and cl.num_decode == lay.decode_workers and cl.num_prefill == 2
    assert cl.kv_capacity_tokens == lay.kv_mb_per_worker * 8  # MiB / 128 KiB per token
    assert cl.policy == lay.policy


def _row(cap, lo, hi, tpot=20.0, tok=1000.0):
    return {
        "tpot_slo_ms": tpot,
        "ttft_slo_ms": 1000.0,
        "label": "x",
        "capacity_rate": cap,
        "bracket": [lo, hi],
        "status": "converged",
        "offered_nominal_tok_s": tok,
        "offered_tok_s": tok,
        "delivered_tok_s": tok * 0.98,
        "delivered_req_s": 1.0,
        "tok_s_per_gpu": tok * 0.98,
        "tpot_ms": {"p50": 10.0, "p90": 15.0},
        "ttft_ms": {"p50": 50.0, "p90": 80.0},
        "attainment": 0.95,
        "send_lag_ms_p99": 1.0,
    }


def test_verdicts_name_a_winner_only_when_the_brackets_separate():
    assert sc.compare(_row(40, 40, 44), _row(20, 20, 22), 0.05)["verdict"] == "higher"
    assert sc.compare(_row(20, 20, 22), _row(40, 40, 44), 0.05)["verdict"] == "lower"
    c = sc.compare(_row(40, 40, 44), _row(39, 39, 42), 0.05)
    assert c["verdict"] == "inconclusive" and c["ratio"] == pytest.approx(40 / 39, abs=1e-3)
    assert sc.compare(_row(40, 40, 44), _row(37, 37, 39), 0.05)["verdict"] == "inconclusive"  # 40/39 < 1.05
    # Never failed above 40.
    assert sc.compare(_row(40, 40, None), _row(20, 20, 22), 0.05)["verdict"] == "higher"
    assert sc.compare(None, _row(20, 20, 22), 0.05)["verdict"].startswith("inconclusive")
    assert sc.compare(_row(None, None, 1.0), _row(20, 20, 22), 0.05)["verdict"].startswith("inconclusive")


def _part(tag, rows, **kw):
    layout = lambda name, m: {"name": name, "models": m, "memory": "arith"}  # noqa: E731
    return {
        "tag": tag,
        "command": f"python -m experiments.serving_capacity --tag {tag}",
        "date": "2026-12-07T10:00:00",
        "machine": "NVIDIA H100 80GB HBM3",
        "dry_run": False,
        "mps": "MPS control daemon started",
        "wall_s": 500,
        "memory": {"decode_kv_gib": 8.0},
        "settings": {},
        "profile": "h100-llama-3.1-8b-measured",
        "noise": 0.05,
        "workload": {
            "alpha": 0.0,
            "input_len": 256,
            "output_len": 128,
            "seed": 0,
            "ttft_slo_ms": 1000.0,
            "target": 0.9,
            "probe": {"warmup_s": 3, "measure_s": 6},
            "search": {"growth": 2, "resolution": 0.1},
        },
        "results": [{"layout": layout(n, 2), "describe": n, **r} for n, r in rows],
        **kw,
    }


def test_report_compares_within_one_zipf_alpha_only(tmp_path):
    """Parts of another traffic skew are neither repeats (noise) of each other nor compared across: each alpha gets
    its own comparisons, and the workload line names which part ran which."""
    import json

    def part(tag, alpha, sun, conv):
        p = _part(tag, [("sun-2", {"live": [_row(*sun)]}), ("conv-2", {"live": [_row(*conv)]})])
        p["workload"]["alpha"] = alpha
        return p

    paths = []
    for p in (part("flat", 0.0, (40, 40, 44), (36, 36, 40)), part("skew", 1.5, (40, 40, 44), (20, 20, 22))):
        paths.append(tmp_path / f"{p['tag']}.json")
        paths[-1].write_text(json.dumps(p))
    assert sc.main(["--report", *map(str, paths), "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())["report"]
    assert rep["noise"]["repeats"] == []  # the same layout names, but another alpha: not a repeat
    verdicts = {c["alpha"]: c["verdict"] for c in rep["comparisons"]}
    assert verdicts == {0.0: "inconclusive", 1.5: "higher"}
    md = (tmp_path / "rep.md").read_text()
    assert "Zipf alpha 0 (flat), 1.5 (skew)" in md and "| 2 | 1.5 | SUN vs conventional (MPS) | 20 |" in md


def test_report_states_offered_and_delivered_and_uses_measured_noise(tmp_path):
    sim = {
        "offline": [_row(30, 30, 32), _row(50, 50, 55, tpot=40)],
        "in_situ": [_row(41, 41, 44), _row(62, 62, 66, tpot=40)],
    }
    p1 = _part(
        "part1",
        [
            ("sun-2", {"live": [_row(40, 40, 44), _row(60, 60, 66, tpot=40)], "sim": sim}),
            (
                "conv-2",
                {
                    "live": [_row(20, 20, 22), _row(58, 58, 63, tpot=40)],
                    "mps_thread_percentage_seen": {"1": "50"},
                },
            ),
        ],
    )
    p2 = _part(
        "part2",
        [
            ("qsun-2", {"not_run": "the serving config is refused"}),
            ("sun-2", {"live": [_row(36, 36, 40), _row(60, 60, 66, tpot=40)]}),
        ],
    )
    a, b = tmp_path / "p1.json", tmp_path / "p2.json"
    import json

    a.write_text(json.dumps(p1))
    b.write_text(json.dumps(p2))
    assert sc.main(["--report", str(a), str(b), "--out", str(tmp_path / "serving-capacity")]) == 0
    md = (tmp_path / "serving-capacity.md").read_text()
    rep = json.loads((tmp_path / "serving-capacity.json").read_text())["report"]
    # the repeat of sun-2 at 20 ms (40 and 36 req/s) sets the noise at 11%
    assert rep["noise"]["used"] == pytest.approx(0.111, abs=1e-3)
    verdicts = {(c["what"], c["tpot_slo_ms"]): c["verdict"] for c in rep["comparisons"]}
    assert verdicts[("SUN vs conventional (MPS)", 20.0)] == "higher"  # 40 / 22 > 1.11
    assert verdicts[("SUN vs conventional (MPS)", 40.0)] == "inconclusive"  # 60-66 against 58-63
    assert verdicts[("QSUN (int4) vs bf16 SUN", 20.0)].startswith("inconclusive")
    assert (
        "offered tok/s (nominal / in window)" in md
        and "delivered tok/s" in md
        and "delivered / offered" in md
    )
    assert "| 2 | 0 | SUN vs conventional (MPS) | 40 |" in md and "| inconclusive |" in md
    assert (
        "**Not run**: the serving config is refused" in md
        and "MPS share seen in the decode workers: ['50']" in md
    )
    assert "NVIDIA H100 80GB HBM3" in md and "2026-12-07" in md and "--tag part1" in md
    sims = {(s["part"], s["layout"], s["tpot_slo_ms"]): s for s in rep["simulator"]}
    one = sims[("part1", "sun-2", 20.0)]
    assert one["offline"]["capacity_ratio"] == 0.75 and not one["offline"]["within"]
    assert one["in_situ"]["within"]  # 41/40 and TPOT 10/10


def test_dry_run_defaults():
    a = sc.parse(["--dry-run"])
    assert (
        a.layouts == ["sun", "conv", "qsun"]
        and a.tpot_slo_ms == [150.0, 400.0]
        and a.profile == sc.DRY_PROFILE
    )
    assert a.kv_bytes_per_token == 512 and a.deadline_s == 300.0 and a.out.endswith("dry-run")
    g = sc.parse(["--tpot-slo-ms", "20", "--start-rate", "12", "conv=6"])
    assert (
        g.start_rate == {"default": 12.0, "conv": 6.0}
        and g.ttft_slo_ms == 1000.0
        and g.profile == sc.OFFLINE_PROFILE
    )
    assert isinstance(g, argparse.Namespace) and sc.parse(["--ttft-slo-ms", "0"]).ttft_slo_ms is None


def test_ingress_replicas_and_overlapped_steps_are_the_same_for_every_layout():
    for overlap in (False, True):
        s = sc.ServeSettings(ingress_replicas=3, overlap_steps=overlap)
        for kind in ("sun", "conv"):
            cfg = sc.serve_config(sc.plan(2, kind, H100), s)
            sc.validate(cfg)
            apps = {a["name"]: a["args"] for a in cfg["applications"]}
            assert apps["sunray"]["ingress_replicas"] == 3
            assert apps["sunray-decode"]["engine"]["overlap_steps"] is overlap
    assert sc.parse([]).overlap_steps and not sc.parse(["--no-overlap-steps"]).overlap_steps


def test_resim_simulates_a_saved_part_again_from_its_step_times(tmp_path):
    """--resim: a part run with --no-sim gets the simulator's capacity and its latencies at the live capacity rate,
    from the decode step times it recorded."""
    import dataclasses
    import json

    lay = sc.plan(2, "sun", H100)
    steps = {str(b): {"steps": 100, "mean_ms": 8.0 + b / 16, "mean_batch": b * 0.8} for b in (1, 8, 32, 128)}
    live = [
        {"tpot_slo_ms": 20.0, "capacity_rate": 30.0, "tpot_ms": {"p50": 15.0}, "ttft_ms": {"p50": 100.0}},
        {"tpot_slo_ms": 40.0, "capacity_rate": None, "tpot_ms": None, "ttft_ms": None},  # not converged
    ]
    part = {
        "tag": "p",
        "command": "python -m experiments.serving_capacity --tokenizer /tmp/tok --tag p --models 2 --no-sim "
        "--start-rate sun=16 --max-probes 3",
        "settings": dataclasses.asdict(sc.ServeSettings()),
        "results": [
            {"layout": dataclasses.asdict(lay), "live": live, "decode_status": {"w0": {"step_times": steps}}}
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(part))
    assert sc.main(["--resim", str(path), "--out", str(tmp_path / "work")]) == 0
    sim = json.loads(path.read_text())["results"][0]["sim"]
    assert not [k for k in sim if k.endswith("error")], sim
    for kind in ("offline", "in_situ"):
        assert len(sim[kind]) == 2 and sim[f"{kind}_at_live"][1] is None
        at = sim[f"{kind}_at_live"][0]
        assert at["rate"] == 30.0 and at["tpot_ms_p50"] > 0 and at["ttft_ms_p50"] > 0
    row = sc.simulator_rows([{**json.loads(path.read_text())["results"][0], "part": "p"}])[0]
    assert row["in_situ"]["at_live"]["ttft_p50_ratio"] == pytest.approx(
        sim["in_situ_at_live"][0]["ttft_ms_p50"] / 100
    )
