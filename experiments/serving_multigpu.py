"""Issue 7 on a multi-GPU machine: SUN's shared decode pool against conventional (partitioned) disaggregation, live
on GPUs, held against the simulator's prediction for the same setting.

    # on nvidia-h100-x4 (or -x8 with --gpus 8), carry ["devcarry/ray", "devcarry/tok"] (tests/gpu/run_serve_8b.sh
    # says how to make devcarry/tok), NCCL_NVLS_ENABLE=0 as the machine asks:
    source devcarry/ray/setup.sh; export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
    python3 -m experiments.serving_multigpu --gpus 4 --models 4 --tokenizer $PWD/devcarry/tok --out $OUT
    python3 -m experiments.serving_multigpu --gpus 4 --models 4 --dry-run   # the plan and the YAMLs only

Steps: (1) plan the GPU placement from the GPU count and the memory arithmetic (Llama-3.1-8B shape, dummy
weights): M prefill modules, a SUN decode pool of D_sun workers, and a partitioned layout of M decode workers (one
pinned to each model by the `partitioned` router policy); (2) write one `serve run` YAML per configuration;
(3) deploy each under `experiments.serve_local` (HTTP on 127.0.0.1:8100), sweep the request rate with
`loadgen run` per Zipf alpha, stop it; (4) run the simulator for the same setting (`loadgen sim run` at the same
rates, and `loadgen sim validate` replaying each live run) with the measured H100 profile; (5) write
serving-multigpu.json and .md: throughput per GPU and TPOT per point, live against simulated.

Placement. kv_transport nccl needs each prefill replica and decode worker on a GPU (a share is allowed), and a
prefill replica and a decode worker never on the same one (NCCL refuses such a pair). If one prefill GPU per model
plus the decode GPUs fit the machine, every actor gets whole GPUs. Otherwise actors take fractional num_gpus: k
prefill modules share a GPU (as many as the memory allows), and decode workers share the GPUs left when there are
more workers than GPUs; when prefill and decode still sit on separate GPUs in both plans, the KV goes over nccl,
else over object_store (host memory; it works between any two actors). Every actor's memory need must fit its share
of a GPU (Ray never puts more than 1.0 on a GPU), else the configuration does not fit and is skipped with the
reason. Both configurations always use the same transport, so that only the decode side differs between them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

try:  # serving_cpu needs psutil; a GPU image without it has Ray's copy (Ray adds that folder only on `import ray`)
    import psutil  # noqa: F401
except ImportError:
    import importlib.util

    _ray = importlib.util.find_spec("ray")
    if _ray is not None and _ray.origin:
        sys.path.append(str(Path(_ray.origin).parent / "thirdparty_files"))

from experiments import serving_cpu as base  # noqa: E402
from experiments.serving_cpu import ROOT, log  # noqa: E402

PROFILE = ROOT / "loadgen/sim/profiles/h100-llama-3.1-8b-measured.json"
KV_BYTES_PER_TOKEN = 131072  # Llama-3.1-8B: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes
PORT = base.PORT
COMMON_LINES = 3  # the memory lines every plan shares (the rest are the plan's own)


def model_names(m: int) -> list[str]:
    return [f"llama8b-task{i}" for i in range(m)]  # most popular first (the Zipf rank)


def _share(n: int) -> float:
    """num_gpus for one of n actors on a GPU: 1/n rounded down to 0.01, so that n of them fit one GPU."""
    return 1.0 if n <= 1 else math.floor(100 / n) / 100


@dataclass
class Plan:
    name: str
    policy: str
    transport: str
    models: int
    prefill_share: float  # num_gpus per prefill replica
    prefill_gpus: int  # physical GPUs the prefill replicas occupy
    decode_workers: int
    decode_share: float  # num_gpus per decode worker
    decode_gpus: int  # physical GPUs the decode workers occupy
    fits: bool
    reason: str = ""
    memory: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return self.prefill_gpus + self.decode_gpus

    def describe(self) -> str:
        head = (
            f"{self.name}: policy {self.policy}, kv_transport {self.transport}; {self.models} prefill modules at "
            f"num_gpus {self.prefill_share:g} on {self.prefill_gpus} GPU(s) + {self.decode_workers} decode "
            f"worker(s) at num_gpus {self.decode_share:g} on {self.decode_gpus} GPU(s) = {self.gpus} GPUs"
        )
        return head + ("" if self.fits else f"\n  DOES NOT FIT: {self.reason}")


def _plan(name, policy, transport, models, d, memory, fits, reason="", **kw) -> Plan:
    return Plan(
        name, policy, transport, models, decode_workers=d, memory=memory, fits=fits, reason=reason, **kw
    )


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
    transport: str = "auto",
) -> dict[str, Plan]:
    """The SUN and the partitioned placement on `gpus` GPUs of `gpu_mem_gb` each, for `models` task models."""
    sun_decode = sun_decode or max(1, models // 2)
    p_need = module_gb + prefill_kv_gb + overhead_gb
    d_need = module_gb + decode_kv_gb + overhead_gb
    mem = [
        f"GPU memory {gpu_mem_gb:g} GB; a prefill replica needs {module_gb:g} (weights) + {prefill_kv_gb:g} (KV) "
        f"+ {overhead_gb:g} (activations, CUDA context) = {p_need:g} GB; a decode worker {module_gb:g} + "
        f"{decode_kv_gb:g} + {overhead_gb:g} = {d_need:g} GB"
    ]
    per_gpu = int(gpu_mem_gb // p_need)
    mem.append(f"prefill modules per GPU: floor({gpu_mem_gb:g} / {p_need:g}) = {per_gpu}")
    decodes = {"sun": sun_decode, "partitioned": models}
    whole = all(models + d <= gpus for d in decodes.values()) and per_gpu >= 1 and d_need <= gpu_mem_gb
    auto = transport == "auto"
    if auto:
        transport = "nccl" if whole else "object_store"
    mem.append(
        f"whole GPUs for every actor (nccl): {models} prefill + max({sun_decode}, {models}) decode = "
        f"{models + max(decodes.values())} GPUs {'<=' if whole else '>'} {gpus}"
        + (f": kv_transport {transport}" if whole or not auto else ": fractional GPUs")
    )
    out = {}
    for policy, d in decodes.items():
        name = f"{policy}-{d}"
        mk = functools.partial(_plan, name, policy, transport, models, d, list(mem))
        if per_gpu < 1 or d_need > gpu_mem_gb:
            out[policy] = mk(
                False,
                f"one module does not fit a {gpu_mem_gb:g} GB GPU",
                prefill_share=1.0,
                prefill_gpus=models,
                decode_share=1.0,
                decode_gpus=d,
            )
            continue
        if transport == "nccl":
            fits = models + d <= gpus
            out[policy] = mk(
                fits,
                ""
                if fits
                else f"nccl needs a GPU per actor: {models} prefill + {d} decode = "
                f"{models + d} > {gpus} GPUs (--transport object_store lets actors share GPUs)",
                prefill_share=1.0,
                prefill_gpus=models,
                decode_share=1.0,
                decode_gpus=d,
            )
            continue
        p_gpus = math.ceil(models / per_gpu)
        k = math.ceil(models / p_gpus)  # spread the modules evenly over the prefill GPUs
        p_share = _share(k)
        left = gpus - p_gpus
        if left < 1:  # no GPU left for decode: every actor shares every GPU
            per = math.ceil((models + d) / gpus)
            share = _share(per)
            plan_ = mk(True, prefill_share=share, prefill_gpus=gpus, decode_share=share, decode_gpus=0)
            plan_.memory.append(
                f"{name}: the {models} prefill modules take {p_gpus} GPU(s), none left for decode: "
                f"{models} prefill + {d} decode actors share {gpus} GPU(s), {per} per GPU at "
                f"num_gpus {share:g} ({share * gpu_mem_gb:g} GB each)"
            )
            need = max(p_need, d_need)
            if need > share * gpu_mem_gb + 1e-9:
                plan_.fits = False
                plan_.reason = (
                    f"{models} prefill + {d} decode actors on {gpus} GPU(s) are {per} per GPU: "
                    f"{share * gpu_mem_gb:g} GB each < the {need:g} GB one needs"
                )
            out[policy] = plan_
            continue
        per_dec = math.ceil(d / left)
        d_share = _share(per_dec)
        d_gpus = math.ceil(d / per_dec)
        plan_ = mk(True, prefill_share=p_share, prefill_gpus=p_gpus, decode_share=d_share, decode_gpus=d_gpus)
        plan_.memory.append(
            f"{name}: {models} prefill modules, {k} per GPU on {p_gpus} GPU(s) at num_gpus "
            f"{p_share:g}: {k} x {p_need:g} = {k * p_need:g} GB <= {gpu_mem_gb:g}"
        )
        plan_.memory.append(
            f"{name}: {d} decode worker(s), {per_dec} per GPU on {d_gpus} GPU(s) at num_gpus "
            f"{d_share:g}: {per_dec} x {d_need:g} = {per_dec * d_need:g} GB"
        )
        for what, need, share in (("prefill replica", p_need, p_share), ("decode worker", d_need, d_share)):
            if need > share * gpu_mem_gb + 1e-9:
                plan_.fits = False
                plan_.reason = (
                    f"a {what} needs {need:g} GB but its share num_gpus {share:g} of a GPU is "
                    f"{share * gpu_mem_gb:g} GB"
                )
        out[policy] = plan_
    # Fractional GPUs, but prefill and decode on separate GPUs in both plans: NCCL can still carry the KV (the
    # config allows num_gpus < 1 with nccl; a pair that lands on one GPU is refused when it forms). Ray packs
    # fractional actors first-fit, so the decode app (deployed first) fills its GPUs before the prefill replicas.
    if auto and all(p.fits and p.decode_gpus > 0 and p.gpus <= gpus for p in out.values()):
        for p in out.values():
            p.transport = "nccl"
            p.memory.append(
                f"{p.name}: prefill and decode on separate GPUs ({p.prefill_gpus} + {p.decode_gpus} "
                f"<= {gpus}): kv_transport nccl"
            )
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
        "decode_worker_options": {"num_cpus": 1, "num_gpus": p.decode_share},
        "engine": {**engine, "kv_cache_mb": int(decode_kv_gb * 1024)},
    }
    if p.policy == "partitioned":  # one decode worker pinned to each task model
        decode["models"] = names
        decode["partition"] = {m: [i] for i, m in enumerate(names)}
    app = {
        **common,
        "decode_app": "sunray-decode",
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
        f"# Issue 7 (experiments/serving_multigpu.py), generated: {p.describe()}\n"
        + "".join(f"# {line}\n" for line in p.memory)
        + f"#   RAY_AUTH_MODE=disabled serve run --address local {path.name}\n"
    )
    path.write_text(head + yaml.safe_dump(serve_config(p, **kw), sort_keys=False))
    return path


def validate(cfg: dict) -> None:
    """The checks `build_decode_app` / `build_app` run on the args, without starting anything."""
    from sunray.serve.config import AppArgs, DecodeAppArgs

    apps = {a["name"]: a for a in cfg["applications"]}
    DecodeAppArgs.model_validate(apps["sunray-decode"]["args"])
    AppArgs.model_validate(apps["sunray"]["args"])


# -- deploy, load, simulate -------------------------------------------------------------------------------------------
class Deployment(base.Deployment):
    """serving_cpu's deployment (serve_local in a session of its own; stop() by pid), for a generated YAML."""

    def __init__(self, p: Plan, yaml_path: Path, out: Path) -> None:  # noqa: D107 - not calling base: no CONFIGS
        self.name, self.out, self.plan = p.name, out, p
        self.yaml, self.workers, self.policy = str(yaml_path), p.decode_workers, p.policy
        self.proc = None

    def start(self, timeout_s: float) -> float:
        saved = base.MODELS
        base.MODELS = tuple(model_names(self.plan.models))  # base.start waits for these models and warms them
        try:
            return super().start(timeout_s)
        finally:
            base.MODELS = saved


def sim_cluster_flags(p: Plan, decode_kv_gb: float, max_num_seqs: int) -> list[str]:
    """The simulator's cluster for plan p: it knows whole GPUs only, so each prefill module gets one GPU (more
    prefill capacity than packed modules have) and each decode worker one GPU."""
    ones = ",".join(["1"] * p.models)
    return [
        "--profile",
        str(PROFILE),
        "--policy",
        p.policy,
        "--prefill-gpus",
        ones,
        "--decode-gpus",
        str(p.decode_workers) if p.policy == "sun" else ones,
        "--max-num-seqs",
        str(max_num_seqs),
        "--kv-capacity-tokens",
        str(int(decode_kv_gb * 2**30 // KV_BYTES_PER_TOKEN)),
    ]


def workload_flags(p: Plan, alpha: float, a) -> list[str]:
    return [
        "--models",
        *model_names(p.models),
        "--alpha",
        f"{alpha:g}",
        "--rate",
        *(f"{r:g}" for r in a.rates),
        "--input-len",
        str(a.input_len),
        "--output-len",
        str(a.output_len),
        "--num-requests",
        str(a.num_requests),
        "--duration",
        f"{a.duration:g}",
        "--seed",
        str(a.seed),
        "--num-gpus",
        str(p.gpus),
        "--ttft-slo-ms",
        f"{a.ttft_slo_ms:g}",
        "--tpot-slo-ms",
        f"{a.tpot_slo_ms:g}",
    ]


def _loadgen(args: list[str]) -> int:
    from loadgen.cli import main as loadgen_main

    with contextlib.redirect_stdout(sys.stderr):
        return loadgen_main(args)


def simulate(p: Plan, alpha: float, a, out: Path) -> list[dict]:
    """`loadgen sim run` at the sweep's rates: the prediction, per rate."""
    f = out / f"sim-{p.name}-alpha-{alpha:g}.json"
    _loadgen(
        [
            "sim",
            "run",
            *workload_flags(p, alpha, a),
            *sim_cluster_flags(p, a.decode_kv_gb, a.max_num_seqs),
            "--out",
            str(f),
        ]
    )
    runs = json.loads(f.read_text())["runs"]
    return [point(r["overall"], p.gpus) | {"rate": r["rate"]} for r in runs]


def point(o: dict, gpus: int) -> dict:
    tput = o["output_token_throughput"]
    return {
        "requests": o["requests"],
        "ok": o["ok"],
        "tok_s": tput,
        "tok_s_per_gpu": None if tput is None else round(tput / gpus, 2),
        "tpot_p50_ms": o["tpot_ms"]["p50"],
        "tpot_p90_ms": o["tpot_ms"]["p90"],
        "ttft_p50_ms": o["ttft_ms"]["p50"],
        "ttft_p90_ms": o["ttft_ms"]["p90"],
        "slo_attainment": o.get("slo_attainment"),
    }


def live(dep: Deployment, alpha: float, a) -> list[dict]:
    """`loadgen run` at each rate of the sweep against the deployment; then `sim validate` replays each run."""
    from loadgen.report import read_summary

    p, out = dep.plan, dep.out / f"alpha-{alpha:g}"
    cmd = [
        sys.executable,
        "-m",
        "loadgen",
        "run",
        "--url",
        f"http://127.0.0.1:{PORT}",
        *workload_flags(p, alpha, a),
        "--drain-timeout",
        f"{a.drain_timeout:g}",
        "--timeout",
        "120",
        "--label",
        f"{p.name} a={alpha:g}",
        "--no-progress",
        "--out",
        str(out),
    ]
    log(f"{p.name} alpha {alpha:g}: {shlex.join(cmd[1:])}")
    bound = len(a.rates) * (a.duration + a.drain_timeout) + 120
    rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=bound).returncode
    status = _decode_status(out / "status-after.json")  # the decode workers' own step times, cumulative
    res = []
    for i, run in enumerate(read_summary(out)["runs"]):
        pt = point(run["overall"], p.gpus) | {
            "rate": run.get("rate", a.rates[i]),
            "loadgen_rc": rc,
            "results_dir": str(out),
            "duration_s": run["duration_s"],
        }
        if status and i == 0:
            pt["decode_status_after_alpha"] = status
        v = out / f"sim-validate-{i}.json"
        with contextlib.suppress(SystemExit, Exception):  # no successful request: nothing to replay
            _loadgen(
                [
                    "sim",
                    "validate",
                    "--live",
                    str(out),
                    "--run",
                    str(i),
                    *sim_cluster_flags(p, a.decode_kv_gb, a.max_num_seqs),
                    "--out",
                    str(v),
                ]
            )
            pt["sim_replay"] = {
                r["metric"]: {"live": r["live"], "sim": r["sim"], "ratio": r["ratio"]}
                for r in json.loads(v.read_text())["comparison"]
            }
        res.append(pt)
        log(
            f"{p.name} alpha {alpha:g} rate {pt['rate']:g}: {pt['ok']}/{pt['requests']} ok, {pt['tok_s']} tok/s "
            f"({pt['tok_s_per_gpu']} per GPU), TPOT p50 {pt['tpot_p50_ms']} ms"
        )
    return res


def _decode_status(path: Path) -> dict | None:
    """/sunray/status (router policy, per-worker queue, KV and step times), saved to `path`; None if unreachable."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/sunray/status", timeout=10) as r:
            status = json.loads(r.read())
    except Exception as e:  # noqa: BLE001 - a report without it is still a report
        log(f"no /sunray/status: {e}")
        return None
    path.write_text(json.dumps(status, indent=1) + "\n")
    return status


# -- the report -------------------------------------------------------------------------------------------------------
def _f(v, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(doc: dict) -> str:
    lines = [
        "# Issue 7: SUN against partitioned disaggregation on GPUs (live and simulated)",
        "",
        f"`{doc['command']}`, {doc['date']}; {doc['machine']}.",
        "",
        "## Plan",
        "",
    ]
    for p in doc["plans"].values():
        lines += [f"- {Plan(**{k: v for k, v in p.items() if k != 'gpus'}).describe()}"]
        lines += [f"  - {m}" for m in p["memory"][COMMON_LINES:]]
    lines += [
        "",
        "Memory arithmetic: " + "; ".join(doc["plans"]["sun"]["memory"][:COMMON_LINES]) + ".",
        "",
        f"Workload: {json.dumps(doc['workload'])}. Simulator: `{PROFILE.relative_to(ROOT)}`, one GPU per prefill "
        "module and per decode worker (it has no fractional GPUs). Per GPU = divided by the GPUs the plan "
        "occupies (prefill + decode), for live and simulated alike.",
        "",
        "| config | GPUs | alpha | rate req/s | ok/req | tok/s per GPU live | sim | TPOT p50 ms live | sim "
        "| TPOT p90 ms live | sim | replay TPOT p50 sim/live | TTFT p50 ms live | SLO % live |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        s = r.get("sim") or {}
        lv = r.get("live") or {}
        rep = (lv.get("sim_replay") or {}).get("tpot_ms p50", {}).get("ratio")
        slo = lv.get("slo_attainment")
        lines.append(
            f"| {r['config']} | {r['gpus']} | {r['alpha']:g} | {r['rate']:g} | {lv.get('ok', '-')}/{lv.get('requests', '-')} "
            f"| {_f(lv.get('tok_s_per_gpu'))} | {_f(s.get('tok_s_per_gpu'))} | {_f(lv.get('tpot_p50_ms'))} "
            f"| {_f(s.get('tpot_p50_ms'))} | {_f(lv.get('tpot_p90_ms'))} | {_f(s.get('tpot_p90_ms'))} | {_f(rep, 2)} "
            f"| {_f(lv.get('ttft_p50_ms'), 0)} | {_f(None if slo is None else 100 * slo, 0)} |"
        )
    if doc.get("failures"):
        lines += ["", "Failures:", *(f"- {k}: {v}" for k, v in doc["failures"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument(
        "--rates", type=float, nargs="+", default=[16.0, 64.0], help="req/s sweep (default 16 64)"
    )
    base.add_workload_args(
        ap,
        input_len=256,
        output_len=128,
        duration=12.0,
        drain_timeout=20.0,
        ttft_slo_ms=1000.0,
        tpot_slo_ms=50.0,
    )
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU (default 80: H100)")
    ap.add_argument("--module-gb", type=float, default=16.0, help="one 8B module in bf16 (default 16)")
    ap.add_argument("--prefill-kv-gb", type=float, default=8.0)
    ap.add_argument("--decode-kv-gb", type=float, default=16.0)
    ap.add_argument("--overhead-gb", type=float, default=4.0, help="per actor: activations, CUDA context")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--sun-decode-gpus", type=int, default=None, help="SUN's pool size (default M // 2)")
    ap.add_argument(
        "--transport",
        choices=("auto", "nccl", "object_store", "cuda_ipc"),
        default="auto",
        help="auto: nccl when prefill and decode sit on separate GPUs, else object_store",
    )
    ap.add_argument("--configs", nargs="+", choices=("sun", "partitioned"), default=["partitioned", "sun"])
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the YAMLs; start nothing")
    a = ap.parse_args(argv)

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
            )
    if a.dry_run:
        for path in yamls.values():
            print(f"\n--- {path}\n{path.read_text()}", end="")
        return 0 if yamls else 1
    doc = {
        "command": "python -m experiments.serving_multigpu "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "plans": {k: asdict(p) | {"gpus": p.gpus} for k, p in plans.items()},
        "workload": {
            "models": model_names(a.models),
            "alphas": a.alphas,
            "rates": a.rates,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "duration_s": a.duration,
            "num_requests": a.num_requests,
            "seed": a.seed,
            "slo_ms": {"ttft": a.ttft_slo_ms, "tpot": a.tpot_slo_ms},
        },
        "startup_s": {},
        "results": [],
        "failures": {},
    }
    for key in a.configs:
        if not plans[key].fits:
            doc["failures"][plans[key].name] = f"does not fit: {plans[key].reason}"
    jpath, mpath = out / "serving-multigpu.json", out / "serving-multigpu.md"

    def save() -> None:
        jpath.write_text(json.dumps(doc, indent=1) + "\n")
        mpath.write_text(markdown(doc))

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for key, path in yamls.items():
        p = plans[key]
        sims = {}
        if not a.no_sim:
            for alpha in a.alphas:
                try:
                    sims[alpha] = {s["rate"]: s for s in simulate(p, alpha, a, out)}
                except (Exception, SystemExit) as e:  # noqa: BLE001 - the live runs go on
                    doc["failures"][f"sim {p.name} alpha {alpha:g}"] = repr(e)
        dep = Deployment(p, path, out / p.name)
        try:
            doc["startup_s"][p.name] = round(dep.start(a.start_timeout), 1)
            for alpha in a.alphas:
                for pt in live(dep, alpha, a):
                    doc["results"].append(
                        {
                            "config": p.name,
                            "policy": p.policy,
                            "gpus": p.gpus,
                            "alpha": alpha,
                            "rate": pt["rate"],
                            "live": pt,
                            "sim": sims.get(alpha, {}).get(pt["rate"]),
                        }
                    )
                save()
        except Exception as e:  # noqa: BLE001 - one configuration failing must not leave its server running
            log(f"{p.name}: FAILED: {e}")
            doc["failures"][p.name] = str(e)
            for alpha, by_rate in sims.items():  # keep the prediction even without live points
                have = {(r["alpha"], r["rate"]) for r in doc["results"] if r["config"] == p.name}
                doc["results"] += [
                    {
                        "config": p.name,
                        "policy": p.policy,
                        "gpus": p.gpus,
                        "alpha": alpha,
                        "rate": r,
                        "live": None,
                        "sim": s,
                    }
                    for r, s in by_rate.items()
                    if (alpha, r) not in have
                ]
        finally:
            dep.stop()
        save()
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    save()
    print(markdown(doc), end="")
    log(f"wrote {jpath} and {mpath}")
    return 1 if doc["failures"] else 0


def _machine() -> str:
    with contextlib.suppress(Exception):
        q = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()
        )
        if q:
            return f"{len(q)} x {q[0]}; {os.cpu_count()} CPU cores"
    return f"no nvidia-smi; {os.cpu_count()} CPU cores"


if __name__ == "__main__":
    sys.exit(main())
