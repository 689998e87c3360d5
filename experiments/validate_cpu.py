"""Issue 5 section 3: the simulator against live CPU runs (`loadgen sim validate` on runs of serving_cpu.py).

    .venv/bin/python -m experiments.validate_cpu --json docs/results/serving-cpu.json \\
        --runs sun-1:0:1 sun-1:1.5:1 sun-3:0:3 partitioned-3:0:2 partitioned-3:1.5:1

For each chosen live run (config:alpha:pass) it replays the run's requests through the simulator twice:

1. with the stock profile `cpu-smollm2-135m` (measured with one torch thread, timed by CPU time: the step times of
   a dedicated core);
2. with that profile divided by the CPU share the run's decode worker actually got (its CPU seconds over the run's
   wall seconds; the busiest worker, which is runnable the whole run). On a shared host every runnable thread
   gets about the same share, so this turns dedicated-core step times into the wall-clock step times of that run.
   It uses the run's own CPU accounting (not its latencies), so it is a diagnosis of why (1) misses, not a
   prediction made in advance.

The cluster shape is the deployment's: one prefill "GPU" per task model, the decode pool (sun) or one decode
worker per model (partitioned), max_num_seqs 32, the KV capacity of kv_cache_mb 256. Results go into the JSON
under "validation", the scaled profiles and the comparison files under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from loadgen.sim.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]
STOCK = "cpu-smollm2-135m"
KV_TOKENS = (256 << 20) // 46080  # kv_cache_mb 256 / KV bytes per token of SmolLM2-135M (float32)


def scaled_profile(share: float, out: Path, run: dict) -> Path:
    prof = load_profile(STOCK)
    d = prof.to_json()
    d["name"] = f"{prof.name}-share-{share:.3f}"
    d["prefill"]["ms"] = [round(v / share, 3) for v in d["prefill"]["ms"]]
    d["decode"]["ms"] = [[round(v / share, 3) for v in row] for row in d["decode"]["ms"]]
    d["notes"] = (
        f"{STOCK} divided by the CPU share {share:.3f} that the busiest decode worker got in the live run "
        f"{run['config']} alpha {run['alpha']:g} (its CPU s / the run's wall s); experiments/"
        f"validate_cpu.py"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(d, indent=1) + "\n")
    return out


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def validate(run: dict, profile: str, out: Path) -> dict:
    workers = run["decode_workers"]
    decode = str(workers) if run["policy"] == "sun" else ",".join(["1"] * workers)
    cmd = [
        sys.executable,
        "-m",
        "loadgen",
        "sim",
        "validate",
        "--live",
        run["results_dir"],
        "--profile",
        profile,
        "--policy",
        run["policy"],
        "--prefill-gpus",
        "1,1,1",
        "--decode-gpus",
        decode,
        "--max-num-seqs",
        "32",
        "--kv-capacity-tokens",
        str(KV_TOKENS),
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {p.stderr[-2000:]}")
    rows = json.loads(out.read_text())["comparison"]
    return {
        "command": "python -m " + shlex.join(cmd[2:]),
        "table": p.stdout,
        "comparison": {r["metric"]: {k: r[k] for k in ("live", "sim", "ratio")} for r in rows},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="docs/results/serving-cpu.json")
    ap.add_argument(
        "--runs",
        nargs="+",
        metavar="CONFIG:ALPHA[:PASS]",
        default=["sun-1:0:1", "sun-1:1.5:1", "sun-3:0:3", "partitioned-3:0:2", "partitioned-3:1.5:1"],
    )
    ap.add_argument("--out", default="results/serving-cpu/validation")
    a = ap.parse_args(argv)
    path = ROOT / a.json
    doc = json.loads(path.read_text())
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    validation = []
    for spec in a.runs:
        config, alpha, *rest = spec.split(":")
        npass = int(rest[0]) if rest else 1
        run = next(
            r
            for r in doc["results"]
            if r["config"] == config and r["alpha"] == float(alpha) and r.get("pass", 1) == npass
        )
        busiest = max(run["cpu_s"]["decode_workers_s"])
        share = round(busiest / run["duration_s"], 3)
        tag = f"{config}-a{float(alpha):g}-p{npass}"
        prof = scaled_profile(share, out / f"profile-{tag}.json", run)
        entry = {
            "config": config,
            "alpha": float(alpha),
            "pass": npass,
            "decode_cpu_share": share,
            "stock": validate(run, STOCK, out / f"{tag}-stock.json"),
            "scaled": validate(run, _rel(prof), out / f"{tag}-scaled.json"),
        }
        for kind in ("stock", "scaled"):
            c = entry[kind]["comparison"]
            print(
                f"{tag} {kind}: throughput sim/live {c['output_token_throughput']['ratio']}, "
                f"TPOT p50 sim/live {c['tpot_ms p50']['ratio']}, TTFT p50 sim/live {c['ttft_ms p50']['ratio']}"
            )
        validation.append(entry)
    doc["validation"] = validation
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
