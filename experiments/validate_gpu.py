"""Issue 5 section 3 on GPUs: the simulator against live runs, with the offline profile and calibrated in situ.

    .venv/bin/python -m experiments.validate_gpu        # from docs/results/data/sim-validation-gpu.tar.gz

Two live data sets (2026-11-26), both the Llama-3.1-8B shape with dummy weights, 256-token prompts, 128 output
tokens, Poisson arrivals, `loadgen run` over HTTP:

- h100: deployments/gpu-8b.yaml on nvidia-h100-x1 (`tests/gpu/run_serve_8b.sh`). Two task models and one decode
  worker, with prefill and decode on the same GPU and KV over CUDA IPC. Calibration: alpha 0 at 8, 32 and 64
  req/s. Held out: alpha 1.5 at 16 and 48 req/s, another seed, a fresh deployment.
- h100x4: sun-1 of docs/results/serving-multigpu.md on nvidia-h100-x4 (`tests/gpu/run_multigpu.sh`). Four task
  models on two prefill GPUs and one dedicated decode GPU, KV over NCCL. Calibration: alpha 0 at 16 and 64 req/s.
  Held out: alpha 1 and 1.5 at 16 and 64 req/s.
- h100x4-partitioned: partitioned-4 of the same document: one decode worker per model, two workers to a GPU. No
  calibration of its own: all six runs are predicted with sun-1's in-situ profile, the simulator putting two
  decode workers on each GPU (`--decode-workers-per-gpu 2`: their steps take turns).
- h100x4-sun2: sun-2 of the same document (two dedicated decode GPUs), likewise predicted with sun-1's profile.

Only the decode workers' own step times are taken from the calibration runs (the server's /sunray/status after
them: mean step time per batch bucket), never their latencies. Each held-out run is replayed (`loadgen sim
validate`: the same arrivals, models and lengths) with (1) the offline profile `h100-llama-3.1-8b-measured`
(DecodeEngine.step() timed alone on the GPU), and (2) that profile calibrated in situ (`loadgen sim calibrate`).
The in-situ profiles go to loadgen/sim/profiles/, the comparison to docs/results/sim-validation-gpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = "h100-llama-3.1-8b-measured"
KV_BYTES_PER_TOKEN = 131072  # Llama-3.1-8B, bf16
CONTEXT = 256 + 128 / 2  # tokens a sequence holds on average while it decodes: prompt + half the output
TOLERANCE = 0.15
METRICS = ("output_token_throughput", "tpot_ms p50")


def _cluster(
    prefill_modules: int,
    kv_cache_mb: int,
    partitioned: bool = False,
    sun_decode: int = 1,
    prefill_per_gpu: int = 1,
) -> list[str]:
    """As deployed: one prefill module per task model, `prefill_per_gpu` to a GPU; `sun_decode` decode workers
    (sun), or one per model, two to a GPU (partitioned); max_num_seqs 256."""
    ones = ",".join(["1"] * prefill_modules)
    decode = (
        ["--policy", "partitioned", "--decode-gpus", ones, "--decode-workers-per-gpu", "2"]
        if partitioned
        else ["--policy", "sun", "--decode-gpus", str(sun_decode)]
    )
    return [
        *decode,
        "--prefill-gpus",
        ones,
        "--prefill-modules-per-gpu",
        str(prefill_per_gpu),
        "--max-num-seqs",
        "256",
        "--kv-capacity-tokens",
        str((kv_cache_mb << 20) // KV_BYTES_PER_TOKEN),
    ]


# (directory in the tarball, what it is, calibration status file (None: use the named profile made by an earlier
#  set), held-out runs as (dir, run index, alpha, rate), the simulator's cluster, the in-situ profile's name)
DATASETS = [
    (
        "sim-validation-h100",
        "one H100, deployments/gpu-8b.yaml: prefill and decode share the GPU, KV over CUDA IPC",
        "calibration-alpha0/status-after.json",
        [("heldout-alpha1.5/rate-16", -1, 1.5, 16), ("heldout-alpha1.5/rate-48", -1, 1.5, 48)],
        _cluster(2, 12288),
        "h100-llama-3.1-8b-in-situ-colocated",
    ),
    (
        "sim-validation-h100x4",
        "4 x H100, sun-1: 4 prefill modules on 2 GPUs, one dedicated decode GPU, KV over NCCL",
        "alpha-0/status-after.json",
        [
            ("alpha-1", 0, 1.0, 16),
            ("alpha-1", 1, 1.0, 64),
            ("alpha-1.5", 0, 1.5, 16),
            ("alpha-1.5", 1, 1.5, 64),
        ],
        _cluster(4, 16384, prefill_per_gpu=2),
        "h100-llama-3.1-8b-in-situ",
    ),
    (
        "sim-validation-h100x4-partitioned",
        "4 x H100, partitioned-4: 4 prefill modules on 2 GPUs, 4 decode workers two to a GPU, KV over NCCL",
        None,
        [(f"alpha-{a}", i, float(a), r) for a in ("0", "1", "1.5") for i, r in ((0, 16), (1, 64))],
        _cluster(4, 16384, partitioned=True, prefill_per_gpu=2),
        "h100-llama-3.1-8b-in-situ",
    ),
    (
        "sim-validation-h100x4-sun2",
        "4 x H100, sun-2: 4 prefill modules on 2 GPUs, 2 dedicated decode GPUs, KV over NCCL",
        None,
        [(f"alpha-{a}", i, float(a), r) for a in ("0", "1", "1.5") for i, r in ((0, 16), (1, 64))],
        _cluster(4, 16384, sun_decode=2, prefill_per_gpu=2),
        "h100-llama-3.1-8b-in-situ",
    ),
]
NOTES = {
    "sim-validation-h100x4-sun2": "The two misses are the skewed runs at 64 req/s, where live TTFT p90 reached 2.4-2.9 s "
    "while the simulator, with the prefill modules sharing GPUs as deployed, puts it near 50 ms: prompts backed up "
    "before their first token and reached decode in bursts, which raise the batch and so the TPOT. GPU time does not "
    "explain that backlog, and its cause is not found (suspects: the prefill replica's request handling, and NCCL "
    "pairs that move one transfer at a time).",
}


def _loadgen(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "loadgen", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {p.stderr[-2000:]}")
    return p.stdout


def replay(live: Path, run: int, profile: str, cluster: list[str], out: Path) -> dict:
    _loadgen(
        [
            "sim",
            "validate",
            "--live",
            str(live),
            "--run",
            str(run),
            "--profile",
            profile,
            *cluster,
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["comparison"]
    return {r["metric"]: {k: r[k] for k in ("live", "sim", "ratio")} for r in rows}


def calibrate(data: Path, status_rel: str, name: str, tarball: str) -> tuple[Path, str]:
    profile = ROOT / "loadgen/sim/profiles" / f"{name}.json"
    status = data / status_rel
    _loadgen(
        [
            "sim",
            "calibrate",
            "--profile",
            OFFLINE,
            "--status",
            str(status),
            "--context",
            f"{CONTEXT:g}",
            "--name",
            name,
            "--out",
            str(profile),
        ]
    )
    # Name the inputs as they are in the repository, not where this run unpacked them.
    text = profile.read_text().replace(str(status), f"{data.name}/{status_rel} of {tarball}")
    profile.write_text(text.replace(str(ROOT) + "/", ""))
    return profile, json.loads(profile.read_text())["notes"].split(". Offline notes")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="docs/results/data/sim-validation-gpu.tar.gz")
    ap.add_argument("--out", default="docs/results/sim-validation-gpu")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sim-validation-"))
    with tarfile.open(ROOT / a.data) as tar:
        tar.extractall(work, filter="data")
    sets = []
    for dirname, what, status_rel, runs, cluster, name in DATASETS:
        data = work / dirname
        if status_rel is None:  # predicted with a profile calibrated on another deployment
            profile = ROOT / "loadgen/sim/profiles" / f"{name}.json"
            calibration = f"none of its own: `{name}`, calibrated on the deployment above"
        else:
            profile, calibration = calibrate(data, status_rel, name, a.data)
        results = []
        for rel, index, alpha, rate in runs:
            entry = {"run": f"{rel} #{index}", "alpha": alpha, "rate": rate}
            for kind, prof in (("offline", OFFLINE), ("in_situ", str(profile))):
                entry[kind] = replay(data / rel, index, prof, cluster, work / f"{dirname}-{kind}.json")
                entry[kind + "_within"] = all(abs(entry[kind][m]["ratio"] - 1) <= TOLERANCE for m in METRICS)
            results.append(entry)
        sets.append(
            {
                "data": dirname,
                "what": what,
                "note": NOTES.get(dirname, ""),
                "cluster_flags": cluster,
                "calibration_status": status_rel,
                "in_situ_profile": str(profile.relative_to(ROOT)),
                "calibration": calibration,
                "results": results,
            }
        )
    doc = {
        "command": "python -m experiments.validate_gpu",
        "data": a.data,
        "date": "2026-11-26",
        "context": CONTEXT,
        "tolerance": TOLERANCE,
        "offline_profile": OFFLINE,
        "sets": sets,
    }
    out = ROOT / a.out
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc), end="")
    return 0


def markdown(doc: dict) -> str:
    lines = [
        "# The simulator against live GPU runs (issue 5)",
        "",
        f"`{doc['command']}` (live data of {doc['date']} in `{doc['data']}`; the simulator runs on any CPU).",
        "",
        "Each held-out live run is replayed through the simulator (`loadgen sim validate`: the same arrivals, models "
        "and lengths) with two step-time profiles:",
        "",
        f"- offline: `{doc['offline_profile']}`, DecodeEngine.step() timed alone on the GPU;",
        "- in situ: the offline profile with its decode times scaled, batch size by batch size, to the step times "
        "the live decode worker itself reported during other runs (the calibration runs) on the same deployment "
        "(`loadgen sim calibrate`). The runs' latencies are never used.",
        "",
        f"Target: sim/live within {doc['tolerance']:.0%} on output throughput and on median TPOT.",
        "",
    ]
    runs = [r for st in doc["sets"] for r in st["results"]]
    for kind in ("in_situ", "offline"):
        lines.append(
            f"- {kind.replace('_', ' ')} profile: {sum(r[kind + '_within'] for r in runs)} of {len(runs)} "
            "runs within the target."
        )
    lines.append("")
    for st in doc["sets"]:
        lines += [
            f"## {st['what']}",
            "",
            (
                f"Calibration: `{st['calibration_status']}`, giving `{st['in_situ_profile']}`: {st['calibration']}."
                if st["calibration_status"]
                else f"Calibration: {st['calibration']}."
            ),
            f"Cluster: `{' '.join(st['cluster_flags'])}`.",
            "",
            "| held-out run | profile | tok/s live | sim | sim/live | TPOT p50 ms live | sim | sim/live | within |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in st["results"]:
            for kind in ("offline", "in_situ"):
                c = r[kind]
                t, p = c["output_token_throughput"], c["tpot_ms p50"]
                lines.append(
                    f"| alpha {r['alpha']:g}, {r['rate']:g} req/s | {kind.replace('_', ' ')} | {t['live']:.0f} "
                    f"| {t['sim']:.0f} | {t['ratio']:.3f} | {p['live']:.1f} | {p['sim']:.1f} | {p['ratio']:.3f} "
                    f"| {'yes' if r[kind + '_within'] else 'no'} |"
                )
        lines += ["", st["note"], ""] if st["note"] else [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
