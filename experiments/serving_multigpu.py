"""Issue 13 item 4 on a multi-GPU machine: the SUN headline live. Conventional disaggregation gives every task model
its own dedicated, whole decode GPU(s); SUN serves every model from fewer shared decode GPUs; both are measured by
capacity (the highest Poisson rate that holds the same TPOT SLO) per Zipf alpha, and throughput per GPU is taken
at that rate.

    # on nvidia-h100-x8 (or -x4 with --models 2), carry ["devcarry/ray", "devcarry/tok"] (tests/gpu/run_serve_8b.sh
    # says what devcarry/tok is); longer than one call, so tests/gpu/run_multigpu.sh starts it in the background:
    bash tests/gpu/run_multigpu.sh start 540 --gpus 8 --models 4
    bash tests/gpu/run_multigpu.sh wait 540          # as often as needed
    python3 -m experiments.serving_multigpu --gpus 8 --models 4 --dry-run   # the plan and the YAMLs only

**Placement** (`plan`). Conventional: M x `--decode-per-model` decode workers, each on a GPU of its own
(`num_gpus: 1`; never two workers time-sliced on one GPU), worker(s) i pinned to model i (router policy
`partitioned`). SUN: `--sun-decode-gpus` workers (default half of conventional's), each on a whole GPU, shared by
every model (policy `sun`). Prefill is the same in both: one replica per task model, on whole GPUs where the
machine has room beside conventional's decode GPUs, else packed k to a GPU (k as the memory allows). KV moves
over NCCL (prefill and decode never share a GPU). A layout that does not fit is reported with its arithmetic.

**Per layout and alpha** (0, 1.0, 1.5 by default): `loadgen capacity` over HTTP (module docstring of
loadgen/capacity.py: ramp, bisection, warm-up excluded, attainment at the stated percentile), reported with offered
vs delivered tok/s and throughput per GPU (divided by every GPU the layout occupies, prefill and decode); then the
simulator on the deployed cluster (`loadgen sim capacity`, the same GPU count and packing, the same search): with
the offline profile, and calibrated in situ from the layout's own decode step times. SUN against conventional is
compared per GPU; brackets that overlap within `--noise` print "inconclusive".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from experiments import serving_capacity as cap
from experiments.serve_local import ServeProcess, log
from experiments.serving_capacity import brief, compare

ROOT = cap.ROOT
PROFILE = "h100-llama-3.1-8b-measured"
KV_BYTES_PER_TOKEN = 131072  # Llama-3.1-8B: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes
PORT = cap.PORT
COMMON_LINES = 2  # the memory lines every plan shares (the rest are the plan's own)


model_names = cap.model_names  # most popular first (the Zipf rank): the single-GPU driver's names


@dataclass
class Plan:
    name: str
    policy: str
    transport: str
    models: int
    prefill_share: float  # num_gpus per prefill replica
    prefill_gpus: int  # physical GPUs the prefill replicas occupy
    prefill_per_gpu: int  # prefill replicas sharing one GPU
    decode_workers: int  # each on a whole GPU of its own
    decode_per_model: int  # conventional: dedicated decode GPUs of each model (SUN: 0, a shared pool)
    fits: bool
    reason: str = ""
    memory: list[str] = field(default_factory=list)

    @property
    def decode_gpus(self) -> int:
        return self.decode_workers

    @property
    def gpus(self) -> int:
        return self.prefill_gpus + self.decode_gpus

    def describe(self) -> str:
        dec = (
            f"{self.decode_workers} dedicated decode GPU(s), {self.decode_per_model} per model"
            if self.policy == "partitioned"
            else f"{self.decode_workers} shared decode GPU(s) for all {self.models} models"
        )
        head = (
            f"{self.name}: policy {self.policy}, kv_transport {self.transport}; {self.models} prefill replicas on "
            f"{self.prefill_gpus} GPU(s) ({self.prefill_per_gpu} per GPU, num_gpus {self.prefill_share:g}) + {dec} "
            f"= {self.gpus} GPUs"
        )
        return head + ("" if self.fits else f"\n  DOES NOT FIT: {self.reason}")


def plan(
    gpus: int,
    models: int,
    *,
    gpu_mem_gb: float = 80.0,
    module_gb: float = 16.0,
    prefill_kv_gb: float = 8.0,
    decode_kv_gb: float = 16.0,
    overhead_gb: float = 4.0,
    sun_decode: int | None = None,
    decode_per_model: int = 1,
    transport: str = "nccl",
) -> dict[str, Plan]:
    """The conventional and the SUN placement on `gpus` GPUs of `gpu_mem_gb` each, for `models` task models."""
    conv_decode = models * decode_per_model
    sun_decode = sun_decode or max(1, conv_decode // 2)
    p_need = module_gb + prefill_kv_gb + overhead_gb
    d_need = module_gb + decode_kv_gb + overhead_gb
    per_gpu = int(gpu_mem_gb // p_need)
    mem = [
        f"GPU memory {gpu_mem_gb:g} GB; a prefill replica needs {module_gb:g} (weights) + {prefill_kv_gb:g} (KV) "
        f"+ {overhead_gb:g} (activations, CUDA context) = {p_need:g} GB, so at most {per_gpu} to a GPU; a decode "
        f"worker {module_gb:g} + {decode_kv_gb:g} + {overhead_gb:g} = {d_need:g} GB on a GPU of its own",
        f"conventional: {models} models x {decode_per_model} dedicated decode GPU(s) = {conv_decode}; SUN: "
        f"{sun_decode} shared decode GPU(s); the prefill replicas get the same GPUs in both",
    ]

    def prefill_on(room: int) -> tuple[int, int] | None:
        """(GPUs, replicas per GPU) for the M prefill replicas on at most `room` GPUs; None if they do not fit."""
        if per_gpu < 1 or room < 1:
            return None
        k = max(1, math.ceil(models / room))
        if k > per_gpu:
            return None
        return math.ceil(models / k), k

    out: dict[str, Plan] = {}
    pre = prefill_on(gpus - conv_decode)  # conventional's room decides the prefill placement of both
    for policy, workers in (("partitioned", conv_decode), ("sun", sun_decode)):
        name = f"{'conv' if policy == 'partitioned' else 'sun'}-{workers}"
        p = pre if pre is not None or policy == "partitioned" else prefill_on(gpus - workers)
        reason = ""
        if d_need > gpu_mem_gb:
            reason = f"a decode worker needs {d_need:g} GB > {gpu_mem_gb:g} GB"
        elif p is None:
            need = math.ceil(models / max(1, per_gpu)) if per_gpu >= 1 else models
            reason = (
                f"{workers} decode GPU(s) + at least {need} prefill GPU(s) ({per_gpu} replicas to a GPU at most) "
                f"> {gpus} GPUs"
                if per_gpu >= 1
                else f"a prefill replica needs {p_need:g} GB > {gpu_mem_gb:g} GB"
            )
        p_gpus, k = p if p is not None else (models, 1)
        plan_ = Plan(
            name,
            policy,
            transport,
            models,
            prefill_share=cap._share(k),
            prefill_gpus=p_gpus,
            prefill_per_gpu=k,
            decode_workers=workers,
            decode_per_model=decode_per_model if policy == "partitioned" else 0,
            fits=not reason,
            reason=reason,
            memory=list(mem),
        )
        if not reason:
            plan_.memory.append(
                f"{name}: {models} prefill replicas, {k} per GPU on {p_gpus} GPU(s) at num_gpus {cap._share(k):g} "
                f"({k} x {p_need:g} = {k * p_need:g} GB <= {gpu_mem_gb:g}); {workers} decode worker(s) at num_gpus 1 "
                f"on {workers} GPU(s); {plan_.gpus} of {gpus} GPUs"
            )
            if policy == "sun" and pre is None:
                plan_.memory.append(
                    f"{name}: conventional does not fit, so SUN's prefill gets the room SUN leaves"
                )
        out[policy] = plan_
    return out


# -- the Serve YAML -----------------------------------------------------------------------------------------------------
def serve_config(
    p: Plan,
    *,
    tokenizer: str = "default",
    prefill_kv_gb: float = 8.0,
    decode_kv_gb: float = 16.0,
    max_num_seqs: int = 256,
    port: int = PORT,
    ingress_replicas: int = 4,
    stream_interval: int = 8,
    overlap_steps: bool = True,
) -> dict:
    names = model_names(p.models)
    common = {
        "dummy_shape": "llama-3.1-8b",
        "tokenizer": tokenizer,
        "device": "cuda",
        "dtype": "bfloat16",
        "torch_threads": 4,
        "kv_transport": p.transport,
    }
    engine = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": 8192, "max_model_len": 4096}
    decode = {
        **common,
        "decode_workers": p.decode_workers,
        "router_policy": p.policy,
        "decode_worker_options": {"num_cpus": 1, "num_gpus": 1},  # a whole GPU for every decode worker
        "engine": {**engine, "kv_cache_mb": int(decode_kv_gb * 1024), "overlap_steps": overlap_steps},
    }
    if p.policy == "partitioned":  # each model's own decode worker(s)
        k = p.decode_per_model
        decode["models"] = names
        decode["partition"] = {m: list(range(i * k, (i + 1) * k)) for i, m in enumerate(names)}
    app = {
        **common,
        "decode_app": "sunray-decode",
        "max_ongoing_requests": 4096,
        # The HTTP front must not be what saturates first: on one H100 an ingress replica spent ~29 ms of CPU per
        # request with chunks of 8 tokens (docs/results/serving-capacity.md), about 34 req/s a core. The same for both
        # layouts, so whichever decode layout holds more also gets the front to carry it.
        "ingress_replicas": ingress_replicas,
        "stream_interval": stream_interval,
        "engine": {**engine, "kv_cache_mb": int(prefill_kv_gb * 1024)},
        "models": [
            {"name": m, "ray_actor_options": {"num_cpus": 0, "num_gpus": p.prefill_share}} for m in names
        ],
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "sunray-decode",
                "route_prefix": None,
                "import_path": "sunray.serve.app:build_decode_app",
                "args": decode,
            },
            {"name": "sunray", "route_prefix": "/", "import_path": "sunray.serve.app:build_app", "args": app},
        ],
    }


def write_yaml(p: Plan, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"# Issue 13 (experiments/serving_multigpu.py), generated: {p.describe()}\n"
        + "".join(f"# {line}\n" for line in p.memory)
        + f"#   RAY_AUTH_MODE=disabled serve run --address local {path.name}\n"
    )
    path.write_text(head + yaml.safe_dump(serve_config(p, **kw), sort_keys=False))
    return path


validate = cap.validate


# -- capacity, live and simulated ---------------------------------------------------------------------------------------
def sim_cluster_flags(p: Plan, decode_kv_gb: float, max_num_seqs: int) -> list[str]:
    """The simulator's cluster as deployed: one prefill replica per model, packed p.prefill_per_gpu to a GPU in
    model order (as Ray packs them), and every decode worker on a GPU of its own; its GPU count is p.gpus."""
    ones = ",".join(["1"] * p.models)
    decode = (
        ["--policy", "partitioned", "--decode-gpus", ",".join([str(p.decode_per_model)] * p.models)]
        if p.policy == "partitioned"
        else ["--policy", "sun", "--decode-gpus", str(p.decode_workers)]
    )
    return [
        *decode,
        "--prefill-gpus",
        ones,
        "--prefill-modules-per-gpu",
        str(p.prefill_per_gpu),
        "--max-num-seqs",
        str(max_num_seqs),
        "--kv-capacity-tokens",
        str(int(decode_kv_gb * 2**30 // KV_BYTES_PER_TOKEN)),
    ]


def workload_flags(p: Plan, alpha: float, a) -> list[str]:
    """The single-GPU driver's workload flags on this plan's GPUs, and the search's ramp."""
    return [
        *cap.workload_flags(p.models, alpha, p.gpus, a),
        "--start-rate",
        f"{a.start_rate:g}",
        "--growth",
        f"{a.growth:g}",
        "--resolution",
        f"{a.resolution:g}",
    ]


def simulate(
    p: Plan, alpha: float, a, out: Path, profile: str = PROFILE, sharing: str = "turns"
) -> list[dict]:
    """`loadgen sim capacity` on the deployed cluster: the predicted capacity, per criterion."""
    f = out / f"sim-{p.name}-alpha-{alpha:g}-{Path(profile).stem}.json"
    rc = cap.run_loadgen(
        [
            "sim",
            "capacity",
            "--profile",
            str(profile),
            *sim_cluster_flags(p, a.decode_kv_gb, a.max_num_seqs),
            "--gpu-sharing",
            sharing,
            *workload_flags(p, alpha, a),
            "--max-probes",
            "30",
            "--no-progress",
            "--out",
            str(f),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"loadgen sim capacity failed for {p.name}")
    return brief(json.loads(f.read_text()))


def live(dep: ServeProcess, p: Plan, alpha: float, a, out: Path) -> dict:
    """`loadgen capacity` against the deployment at one alpha; the decode workers' status after it."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "loadgen",
        "capacity",
        "--url",
        f"http://127.0.0.1:{dep.port}",
        *workload_flags(p, alpha, a),
        "--max-probes",
        str(a.max_probes),
        "--budget",
        f"{a.search_budget_s:g}",
        "--settle",
        f"{a.settle:g}",
        *([] if a.cancel_background else ["--drain"]),
        "--timeout",
        "120",
        "--label",
        f"{p.name} a={alpha:g}",
        "--out",
        str(out / "capacity"),
    ]
    out.mkdir(parents=True, exist_ok=True)
    log(f"{p.name} alpha {alpha:g}: {shlex.join(cmd[2:])}")
    with open(out / "capacity.log", "w") as f:
        rc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=a.search_budget_s + 300
        ).returncode
    path = out / "capacity" / "capacity.json"
    if rc != 0 or not path.exists():
        raise RuntimeError(f"loadgen capacity failed ({rc}); see {out}/capacity.log")
    doc = json.loads(path.read_text())
    dep.status(out / "status-after.json")
    return {"command": "python -m " + shlex.join(cmd[2:]), "capacity": brief(doc), "stopped": doc["stopped"]}


def per_gpu(row: dict | None, gpus: int) -> dict | None:
    """A capacity row with its rates divided by the GPUs of its layout (for comparing layouts of other sizes)."""
    if not row or row.get("capacity_rate") is None:
        return None
    lo, hi = row["bracket"]
    return {
        "capacity_rate": row["capacity_rate"] / gpus,
        "bracket": [None if lo is None else lo / gpus, None if hi is None else hi / gpus],
    }


def comparisons(results: list[dict], noise: float) -> list[dict]:
    out = []
    for alpha in sorted({r["alpha"] for r in results}):
        rows = {r["policy"]: r for r in results if r["alpha"] == alpha and r.get("live")}
        s, c = rows.get("sun"), rows.get("partitioned")
        if not s or not c:
            continue
        for k, crit in enumerate(s["live"]["capacity"]):
            rs, rc = crit, c["live"]["capacity"][k]
            cmp = compare(per_gpu(rs, s["gpus"]), per_gpu(rc, c["gpus"]), noise)
            out.append(
                {
                    "alpha": alpha,
                    "tpot_slo_ms": crit["tpot_slo_ms"],
                    "sun": s["config"],
                    "conventional": c["config"],
                    "sun_tok_s_per_gpu": rs["tok_s_per_gpu"],
                    "conv_tok_s_per_gpu": rc["tok_s_per_gpu"],
                    **cmp,
                }
            )
    return out


# -- the report ---------------------------------------------------------------------------------------------------------
def _f(v, d: int = 1) -> str:
    return "-" if v is None else f"{v:,.{d}f}"


def markdown(doc: dict) -> str:
    lines = [
        "# Issue 13: SUN against conventional disaggregation on dedicated GPUs, by capacity (live and simulated)",
        "",
        f"`{doc['command']}`, {doc['date']}; {doc['machine']}.",
        "",
        "## Plan",
        "",
    ]
    for p in doc["plans"].values():
        fields = {k: v for k, v in p.items() if k in {f.name for f in dataclasses.fields(Plan)}}
        lines += [f"- {Plan(**fields).describe()}"]
        lines += [f"  - {m}" for m in p["memory"][COMMON_LINES:]]
    some = next(iter(doc["plans"].values()))
    lines += ["", "Memory arithmetic: " + "; ".join(some["memory"][:COMMON_LINES]) + ".", ""]
    wl = doc["workload"]
    lines += [
        f"Workload: {json.dumps(wl)}. Capacity: `loadgen capacity` (loadgen/capacity.py: the highest Poisson rate "
        f"at which >= {100 * wl['target']:g}% of the measured requests meet the TPOT"
        + (" and TTFT" if wl.get("ttft_slo_ms") else "")
        + " SLO, refusals and failures counted as misses). Per GPU: delivered tok/s at capacity divided by every GPU "
        "the layout occupies (prefill + decode), live and simulated alike. Simulator: `loadgen sim capacity` on the "
        f"deployed cluster, offline profile `{doc['profile']}` (every process on a shared GPU taking turns) and in "
        "situ (calibrated on the layout's own decode step times).",
        "",
        "| config | GPUs | alpha | TPOT SLO ms | capacity req/s | bracket | offered tok/s | delivered tok/s "
        "| tok/s per GPU | TPOT p50 / p90 ms | TTFT p50 / p90 ms | sim offline req/s (ratio) | sim in situ req/s "
        "(ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        rows = (r.get("live") or {}).get("capacity")
        if not rows:
            lines.append(f"| {r['config']} | {r['gpus']} | {r['alpha']:g} | - | not run | | | | | | | | |")
            continue
        for k, row in enumerate(rows):
            sims = []
            for key in ("sim_offline", "sim_in_situ"):
                s = (r.get(key) or [None] * (k + 1))[k]
                if s and s["capacity_rate"] and row["capacity_rate"]:
                    sims.append(
                        f"{_f(s['capacity_rate'], 2)} ({s['capacity_rate'] / row['capacity_rate']:.2f})"
                    )
                else:
                    sims.append(_f(s and s["capacity_rate"], 2))
            tp, tt = row["tpot_ms"] or {}, row["ttft_ms"] or {}
            br = row["bracket"]
            lines.append(
                f"| {r['config']} | {r['gpus']} | {r['alpha']:g} | {row['tpot_slo_ms']:g} "
                f"| {_f(row['capacity_rate'], 2)} | [{_f(br[0], 2)}, {_f(br[1], 2)}] | {_f(row['offered_tok_s'], 0)} "
                f"| {_f(row['delivered_tok_s'], 0)} | {_f(row['tok_s_per_gpu'], 0)} "
                f"| {_f(tp.get('p50'))} / {_f(tp.get('p90'))} | {_f(tt.get('p50'), 0)} / {_f(tt.get('p90'), 0)} "
                f"| {' | '.join(sims)} |"
            )
    if doc.get("comparisons"):
        lines += [
            "",
            f"SUN against conventional, capacity per GPU (a verdict only where the per-GPU brackets, widened by "
            f"{100 * doc['noise']:g}%, do not overlap):",
            "",
            "| alpha | TPOT SLO ms | SUN | conventional | tok/s per GPU SUN / conv. | capacity per GPU SUN / conv. "
            "| range | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in doc["comparisons"]:
            v = {"higher": "SUN higher", "lower": "conventional higher"}.get(c["verdict"], c["verdict"])
            lines.append(
                f"| {c['alpha']:g} | {c['tpot_slo_ms']:g} | {c['sun']} | {c['conventional']} "
                f"| {_f(c['sun_tok_s_per_gpu'], 0)} / {_f(c['conv_tok_s_per_gpu'], 0)} | {_f(c['ratio'], 2)} "
                f"| {cap._range(c['range'])} | {v} |"
            )
    if doc.get("failures"):
        lines += ["", "Failures:", *(f"- {k}: {v}" for k, v in doc["failures"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, required=True, help="GPUs on this machine")
    ap.add_argument("--models", type=int, default=4, help="task models M (default 4)")
    ap.add_argument(
        "--out", default="results/serving-multigpu", help="YAMLs, loadgen records, logs, the report"
    )
    ap.add_argument(
        "--tokenizer", default="default", help="tokenizer directory for the dummy 8B (default: embedded)"
    )
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 1.5])
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tpot-slo-ms", type=float, nargs="+", default=[40.0], help="the same SLO(s) for both")
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="0: none")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--start-rate", type=float, default=16.0)
    ap.add_argument("--growth", type=float, default=2.0)
    ap.add_argument("--resolution", type=float, default=0.1)
    ap.add_argument("--max-probes", type=int, default=10)
    ap.add_argument("--search-budget-s", type=float, default=150.0, help="per layout and alpha")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--measure", type=float, default=6.0)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument(
        "--cancel-background",
        action="store_true",
        help="cancel requests in flight at a probe's end (default: drain them; see serving_capacity --help)",
    )
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU (default 80: H100)")
    ap.add_argument("--module-gb", type=float, default=16.0, help="one 8B module in bf16 (default 16)")
    ap.add_argument("--prefill-kv-gb", type=float, default=8.0)
    ap.add_argument("--decode-kv-gb", type=float, default=16.0)
    ap.add_argument("--overhead-gb", type=float, default=4.0, help="per actor: activations, CUDA context")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    cap.add_front_flags(ap, ingress_replicas=4, stream_interval=8)
    ap.add_argument(
        "--sun-decode-gpus", type=int, default=None, help="SUN's pool (default half of conventional's)"
    )
    ap.add_argument(
        "--decode-per-model", type=int, default=1, help="conventional: dedicated decode GPUs per model"
    )
    ap.add_argument("--transport", choices=("nccl", "object_store"), default="nccl")
    ap.add_argument("--configs", nargs="+", choices=("sun", "partitioned"), default=["partitioned", "sun"])
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the YAMLs; start nothing")
    a = ap.parse_args(argv)
    cap.check_front_flags(ap, a)
    a.ttft_slo_ms = a.ttft_slo_ms or None

    out = Path(a.out).resolve()
    if Path(a.tokenizer).is_dir():  # the Serve actors do not share this directory
        a.tokenizer = str(Path(a.tokenizer).resolve())
    plans = plan(
        a.gpus,
        a.models,
        gpu_mem_gb=a.gpu_mem_gb,
        module_gb=a.module_gb,
        prefill_kv_gb=a.prefill_kv_gb,
        decode_kv_gb=a.decode_kv_gb,
        overhead_gb=a.overhead_gb,
        sun_decode=a.sun_decode_gpus,
        decode_per_model=a.decode_per_model,
        transport=a.transport,
    )
    print("\n".join(plans["sun"].memory[:COMMON_LINES]))
    yamls = {}
    for key in a.configs:
        p = plans[key]
        print(p.describe())
        print("\n".join(f"  {m}" for m in p.memory[COMMON_LINES:]))
        if p.fits:
            yamls[key] = write_yaml(
                p,
                out / f"multigpu-{p.name}.yaml",
                tokenizer=a.tokenizer,
                prefill_kv_gb=a.prefill_kv_gb,
                decode_kv_gb=a.decode_kv_gb,
                max_num_seqs=a.max_num_seqs,
                ingress_replicas=a.ingress_replicas,
                stream_interval=a.stream_interval,
                overlap_steps=a.overlap_steps,
            )
    if a.dry_run:
        for path in yamls.values():
            print(f"\n--- {path}\n{path.read_text()}", end="")
        return 0 if len(yamls) == len(a.configs) else 1
    signal.signal(signal.SIGTERM, cap._terminate)
    doc = {
        "command": "python -m experiments.serving_multigpu " + shlex.join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "plans": {k: asdict(p) | {"gpus": p.gpus} for k, p in plans.items()},
        "workload": {
            "models": model_names(a.models),
            "alphas": a.alphas,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "seed": a.seed,
            "tpot_slo_ms": a.tpot_slo_ms,
            "ttft_slo_ms": a.ttft_slo_ms,
            "target": a.target,
            "probe": {"warmup_s": a.warmup, "measure_s": a.measure, "settle_s": a.settle},
        },
        "profile": PROFILE,
        "noise": a.noise,
        "startup_s": {},
        "results": [],
        "failures": {},
    }
    for key in a.configs:
        if not plans[key].fits:
            doc["failures"][plans[key].name] = f"does not fit: {plans[key].reason}"
    jpath, mpath = out / "serving-multigpu.json", out / "serving-multigpu.md"

    def save() -> None:
        doc["comparisons"] = comparisons(doc["results"], a.noise)
        jpath.write_text(json.dumps(doc, indent=1) + "\n")
        mpath.write_text(markdown(doc))

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for key, path in yamls.items():
        p = plans[key]
        dep = ServeProcess(p.name, path, out / p.name, model_names(p.models), p.decode_workers, PORT)
        try:
            doc["startup_s"][p.name] = round(dep.start(a.start_timeout), 1)
            for alpha in a.alphas:
                r = {"config": p.name, "policy": p.policy, "gpus": p.gpus, "alpha": alpha}
                doc["results"].append(r)
                try:
                    r["live"] = live(dep, p, alpha, a, out / p.name / f"alpha-{alpha:g}")
                except Exception as e:  # noqa: BLE001 - the other alphas go on
                    doc["failures"][f"{p.name} alpha {alpha:g}"] = str(e)
                save()
        except Exception as e:  # noqa: BLE001 - one configuration failing must not leave its server running
            log(f"{p.name}: FAILED: {e}")
            doc["failures"][p.name] = str(e)
        finally:
            dep.stop()
        if not a.no_sim:  # after the server is gone: the simulator needs no GPU
            for r in (x for x in doc["results"] if x["config"] == p.name):
                alpha = r["alpha"]
                try:
                    r["sim_offline"] = simulate(p, alpha, a, out / p.name)
                    status = out / p.name / f"alpha-{alpha:g}" / "status-after.json"
                    if status.exists():
                        prof = out / p.name / f"profile-in-situ-alpha-{alpha:g}.json"
                        cap.calibrate(status, PROFILE, a.input_len + a.output_len / 2, prof)
                        r["sim_in_situ"] = simulate(p, alpha, a, out / p.name, str(prof), "apart")
                except (Exception, SystemExit) as e:  # noqa: BLE001 - the live results stand without it
                    doc["failures"][f"sim {p.name} alpha {alpha:g}"] = repr(e)
        save()
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    save()
    print(markdown(doc), end="")
    log(f"wrote {jpath} and {mpath}")
    return 1 if doc["failures"] else 0


def _machine() -> str:
    gpus = cap.gpu_names()
    return (f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU") + f"; {cap.os.cpu_count()} CPU cores"


if __name__ == "__main__":
    sys.exit(main())
