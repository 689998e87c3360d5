"""Issue 13 on one GPU: capacity (the highest Poisson rate that holds a TPOT SLO), SUN against conventional serving
under CUDA MPS, and QSUN against bf16 SUN, live through Ray Serve and HTTP.

    # the GPU machine, two calls of at most 9 minutes (tests/gpu/run_capacity.sh runs exactly these):
    python -m experiments.serving_capacity --tokenizer /tmp/tok --models 2 --layouts sun conv --tag part1 --out DIR
    python -m experiments.serving_capacity --tokenizer /tmp/tok --models 2 4 --layouts qsun sun conv --tag part2 ...
    # CPU, here: the whole pipeline end to end with tiny random models (MPS skipped, with a note)
    python -m experiments.serving_capacity --dry-run
    # the committed report, from the parts' JSON files
    python -m experiments.serving_capacity --report part1.json part2.json --out docs/results/serving-capacity

**Layouts** (M task models, every actor on GPU 0, the Llama-3.1-8B shape with dummy weights, KV over CUDA IPC):

- `sun-M`: M prefill replicas and one decode worker that serves every model (router policy `sun`).
- `conv-M`: conventional serving: M prefill replicas and M decode workers, worker i pinned to model i (router
  policy `partitioned`), each an MPS client limited to `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` = 100/M of the SMs
  (set per worker through its Ray `runtime_env`). The decode workers run concurrently, each on its share; never
  plain time slicing: without MPS (a CPU dry run, or `nvidia-cuda-mps-control` missing) this layout is labelled so.
- `qsun-M`: sun-M with an int4 (group 128, round to nearest) decode module. With dummy weights the decode worker
  quantizes its module in place (`QSUN_KEY` below, the key deployments/gpu-8b-int4.yaml uses) and the prefill
  modules take the quantized fingerprint.

**Why the baseline is fair.** Same GPU and call; the MPS control daemon runs for every layout (started by this
script with its own pipe and log directories under /tmp, exported before Ray starts so every Ray worker is a
client; stopped at the end; the GPU's compute mode, clocks and MIG are never touched); the same M prefill replicas
with the same engine settings; the same total decode KV budget (`--decode-kv-gib`: SUN's one worker holds all of
it, each conventional worker 1/M); the same workload, seed, probes and SLO criterion (`loadgen capacity`, module
docstring of loadgen/capacity.py). What conventional serving pays, and SUN does not, is one decode weight copy per
model and a 1/M share of the SMs per model.

**Capacity** per layout: `loadgen capacity` against the live server (ramp x2 from `--start-rate`, bisect to
`--resolution`, probes of `--warmup` + `--measure` s; every TPOT SLO shares the probes), reported with offered vs
delivered tok/s, throughput per GPU (1 GPU), TPOT/TTFT at capacity. A comparison whose capacity brackets, widened
by `--noise`, overlap prints "inconclusive". **Simulator**: the same search over simulated rates
(`loadgen sim capacity`) on the deployed cluster (one GPU, every replica on it): with the offline profile (all
processes take turns), and with that profile calibrated in situ from this layout's own decode step times
(`/sunray/status` after the search; nobody takes turns, the step times hold the interference already).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

try:  # serve_local needs psutil; a GPU image without it has Ray's copy (Ray adds that folder only on `import ray`)
    import psutil  # noqa: F401
except ImportError:
    import importlib.util

    _ray = importlib.util.find_spec("ray")
    if _ray is not None and _ray.origin:
        sys.path.append(str(Path(_ray.origin).parent / "thirdparty_files"))

from experiments.serve_local import ROOT, ServeProcess, log  # noqa: E402

PORT = 8110
GiB = 1 << 30
QSUN_KEY = "dummy_quantization"  # DecodeArgs/app key: quantize the dummy decode module in place
KINDS = ("sun", "conv", "qsun")
OFFLINE_PROFILE = "h100-llama-3.1-8b-measured"
DRY_PROFILE = "cpu-smollm2-135m"
TOLERANCE = 0.15


def model_names(m: int) -> list[str]:
    return [f"llama8b-task{i}" for i in range(m)]


def _share(n: int) -> float:
    """num_gpus for one of n actors on one GPU: 1/n rounded down to 0.01, so that n of them fit."""
    return 1.0 if n <= 1 else math.floor(100 / n) / 100


# -- the plan: layouts and their memory -------------------------------------------------------------------------------
@dataclasses.dataclass
class Memory:
    """The memory arithmetic of one GPU (GiB)."""

    gpu_gib: float = 79.2  # H100 80GB: what torch sees free on an idle card
    weights_gib: float = 14.96  # one Llama-3.1-8B copy in bf16 (8.03e9 parameters)
    int4_weights_gib: float = 5.4  # the int4-g128 decode module: packed linears + bf16 embeddings and LM head
    decode_kv_gib: float = 8.0  # the total decode KV budget, the same for every layout
    prefill_kv_gib: float = 1.0  # each prefill replica's pool (a scratch pool: KV leaves it at the hand-off)
    overhead_gib: float = 1.5  # each process: CUDA context, activations, CUDA graphs, allocator slack
    reserve_gib: float = 1.0


@dataclasses.dataclass
class Layout:
    name: str
    kind: str  # sun | conv | qsun
    models: int
    decode_workers: int
    decode_share: float  # Ray num_gpus of each decode worker
    prefill_share: float
    kv_mb_per_worker: int
    prefill_kv_mb: int
    mps_percentage: int | None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of each decode worker (None: no limit)
    quantization: str | None = None
    fits: bool = True
    reason: str = ""
    memory: str = ""

    @property
    def policy(self) -> str:
        return "partitioned" if self.kind == "conv" else "sun"

    def describe(self) -> str:
        mps = f", CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={self.mps_percentage} each" if self.mps_percentage else ""
        q = f", decode module {self.quantization}" if self.quantization else ""
        return (
            f"{self.name}: {self.models} prefill replicas + {self.decode_workers} decode worker(s) "
            f"({self.kv_mb_per_worker / 1024:g} GiB KV each{mps}{q}), policy {self.policy}, one GPU"
        )


def plan(models: int, kind: str, mem: Memory, *, qsun_scheme: str = "int4-g128", mps: bool = True) -> Layout:
    """One layout on one GPU, with its memory arithmetic (fits or not, and why)."""
    if kind not in KINDS:
        raise ValueError(f"unknown layout {kind!r}; choose from {', '.join(KINDS)}")
    workers = models if kind == "conv" else 1
    kv_gib = mem.decode_kv_gib / workers
    dec_w = mem.int4_weights_gib if kind == "qsun" else mem.weights_gib
    procs = models + workers
    total = (
        models * (mem.weights_gib + mem.prefill_kv_gib)
        + workers * (dec_w + kv_gib)
        + procs * mem.overhead_gib
        + mem.reserve_gib
    )
    arithmetic = (
        f"{models} x ({mem.weights_gib:g} weights + {mem.prefill_kv_gib:g} KV) prefill + {workers} x "
        f"({dec_w:g} weights + {kv_gib:g} KV) decode + {procs} x {mem.overhead_gib:g} per process + "
        f"{mem.reserve_gib:g} = {total:.1f} GiB {'<=' if total <= mem.gpu_gib else '>'} {mem.gpu_gib:g} GiB"
    )
    share = _share(procs)
    lay = Layout(
        name=f"{kind}-{models}",
        kind=kind,
        models=models,
        decode_workers=workers,
        decode_share=share,
        prefill_share=share,
        kv_mb_per_worker=int(kv_gib * 1024),
        prefill_kv_mb=int(mem.prefill_kv_gib * 1024),
        mps_percentage=(100 // models) if kind == "conv" and mps else None,
        quantization=qsun_scheme if kind == "qsun" else None,
        memory=arithmetic,
    )
    if total > mem.gpu_gib:
        lay.fits, lay.reason = False, f"does not fit one GPU: {arithmetic}"
    return lay


def memory_from_shape(shape: str, **kw) -> Memory:
    """Weight sizes from the model shape (sunray.models.presets) and the int4 format (4 bits + a bf16 scale and
    zero per group of 128 for every decoder linear; embeddings, norms and the LM head stay bf16)."""
    from sunray.models.presets import SHAPES

    c = SHAPES[shape]
    n = c.num_parameters()
    h, i = c.hidden_size, c.intermediate_size
    linear = c.num_layers * (h * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * h * i)
    int4 = linear * (0.5 + 4 / 128) + (n - linear) * 2
    return Memory(weights_gib=round(n * 2 / GiB, 2), int4_weights_gib=round(int4 / GiB, 2), **kw)


# -- the Serve config ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ServeSettings:
    device: str = "cuda"
    dtype: str = "bfloat16"
    tokenizer: str = "default"
    dummy_shape: str | None = "llama-3.1-8b"
    module: str | None = None  # a model directory for every module instead of dummy_shape (the dry run)
    torch_threads: int = 4
    kv_transport: str = "cuda_ipc"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    decode_cpus: float = 1
    max_ongoing_requests: int = 4096
    ingress_replicas: int = 1  # the same for every layout (the ingress streams every token of every model)
    stream_interval: int = (
        1  # tokens per SSE chunk at most (AppArgs.stream_interval), the same for every layout
    )
    overlap_steps: bool = (
        True  # decode workers overlap their steps (EngineConfig.overlap_steps), every layout, as serving does
    )
    port: int = PORT


def serve_config(lay: Layout, s: ServeSettings) -> dict:
    names = model_names(lay.models)
    common: dict = {
        "device": s.device,
        "dtype": s.dtype,
        "torch_threads": s.torch_threads,
        "kv_transport": s.kv_transport,
    }
    if s.module:
        common["decode_module"] = s.module
    else:
        common.update(dummy_shape=s.dummy_shape, tokenizer=s.tokenizer)
    if lay.quantization:
        common[QSUN_KEY] = lay.quantization  # both applications: the prefill modules name the int4 base
    engine = {
        "max_num_seqs": s.max_num_seqs,
        "max_num_batched_tokens": s.max_num_batched_tokens,
        "max_model_len": s.max_model_len,
    }
    on_gpu = s.device.startswith("cuda")  # on a CPU (the dry run) no actor may ask for a GPU
    options: dict = {"num_cpus": s.decode_cpus, "num_gpus": lay.decode_share if on_gpu else 0}
    if lay.mps_percentage:
        options["runtime_env"] = {"env_vars": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(lay.mps_percentage)}}
    decode = {
        **common,
        "decode_workers": lay.decode_workers,
        "router_policy": lay.policy,
        "decode_worker_options": options,
        "engine": {**engine, "kv_cache_mb": lay.kv_mb_per_worker, "overlap_steps": s.overlap_steps},
    }
    if lay.kind == "conv":  # one decode worker pinned to each task model
        decode["models"] = names
        decode["partition"] = {m: [i] for i, m in enumerate(names)}
    model = {"ray_actor_options": {"num_cpus": 0, "num_gpus": lay.prefill_share if on_gpu else 0}}
    if s.module:
        model["prefill_module"] = s.module
    app = {
        **common,
        "decode_app": "sunray-decode",
        "max_ongoing_requests": s.max_ongoing_requests,
        "ingress_replicas": s.ingress_replicas,
        "stream_interval": s.stream_interval,
        "engine": {**engine, "kv_cache_mb": lay.prefill_kv_mb},
        "models": [{"name": m, **model} for m in names],
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": s.port},
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


def write_yaml(lay: Layout, path: Path, s: ServeSettings) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"# Issue 13 (experiments/serving_capacity.py), generated: {lay.describe()}\n"
        f"# memory: {lay.memory}\n"
        f"#   RAY_AUTH_MODE=disabled python -m experiments.serve_local {path.name}\n"
    )
    path.write_text(head + yaml.safe_dump(serve_config(lay, s), sort_keys=False))
    return path


def validate(cfg: dict) -> None:
    """The checks build_decode_app / build_app run on the args (pydantic), without starting anything."""
    from sunray.serve.config import AppArgs, DecodeAppArgs

    apps = {a["name"]: a for a in cfg["applications"]}
    DecodeAppArgs.model_validate(apps["sunray-decode"]["args"])
    AppArgs.model_validate(apps["sunray"]["args"])


# -- CUDA MPS -------------------------------------------------------------------------------------------------------------
class MPS:
    """The MPS control daemon of this run: its own pipe and log directories (exported into os.environ before any
    Ray starts, so every process started afterwards is a client), started and stopped here. Nothing else about the
    GPU is changed."""

    def __init__(self, root: Path) -> None:
        self.pipe, self.logs = root / "pipe", root / "log"
        self.started = False
        self.note = ""

    def _env(self) -> dict:
        return {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(self.logs),
        }

    def start(self) -> bool:
        if shutil.which("nvidia-cuda-mps-control") is None:
            self.note = "nvidia-cuda-mps-control not found: no MPS"
            return False
        self.pipe.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(
            ["nvidia-cuda-mps-control", "-d"], env=self._env(), capture_output=True, text=True, timeout=30
        )
        if p.returncode != 0:
            self.note = (
                f"nvidia-cuda-mps-control -d failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:300]}"
            )
            return False
        os.environ["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe)
        os.environ["CUDA_MPS_LOG_DIRECTORY"] = str(self.logs)
        self.started = True
        self.note = f"MPS control daemon started (pipe {self.pipe}, log {self.logs})"
        return True

    def query(self, command: str) -> str:
        if not self.started:
            return ""
        with contextlib.suppress(Exception):
            p = subprocess.run(
                ["nvidia-cuda-mps-control"],
                input=command + "\n",
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=15,
            )
            return p.stdout.strip()
        return ""

    def stop(self) -> None:
        if not self.started:
            return
        self.query("quit")
        self.started = False
        for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            os.environ.pop(k, None)

    def control_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / "control.log").read_text()[-4000:]
        return ""


# -- capacity, live and simulated ---------------------------------------------------------------------------------------
def workload_flags(models: int, alpha: float, gpus: int, a) -> list[str]:
    """loadgen's workload and SLO flags (capacity and sim capacity alike), from the driver's arguments."""
    return [
        "--models",
        *model_names(models),
        "--alpha",
        f"{alpha:g}",
        "--input-len",
        str(a.input_len),
        "--output-len",
        str(a.output_len),
        "--seed",
        str(a.seed),
        "--gpus",
        str(gpus),
        "--tpot-slo-ms",
        *(f"{t:g}" for t in a.tpot_slo_ms),
        *(["--ttft-slo-ms", f"{a.ttft_slo_ms:g}"] if a.ttft_slo_ms else []),
        "--target",
        f"{a.target:g}",
        "--warmup",
        f"{a.warmup:g}",
        "--measure",
        f"{a.measure:g}",
    ]


def search_flags(a, start_rate: float, budget_s: float) -> list[str]:
    return [
        "--start-rate",
        f"{start_rate:g}",
        "--growth",
        f"{a.growth:g}",
        "--resolution",
        f"{a.resolution:g}",
        "--max-probes",
        str(a.max_probes),
        "--budget",
        f"{budget_s:.0f}",
    ]


def live_capacity(dep: ServeProcess, lay: Layout, a, budget_s: float, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "loadgen",
        "capacity",
        "--url",
        f"http://127.0.0.1:{dep.port}",
        *workload_flags(lay.models, a.alpha, 1, a),
        *search_flags(a, a.start_rate.get(lay.kind, a.start_rate["default"]), budget_s),
        "--settle",
        f"{a.settle:g}",
        "--settle-timeout",
        f"{a.settle_timeout:g}",
        *([] if a.cancel_background else ["--drain"]),
        "--timeout",
        "120",
        "--label",
        lay.name,
        "--out",
        str(out),
    ]
    log(f"{lay.name}: {shlex.join(cmd[2:])}")
    with open(out.parent / "capacity.log", "w") as errf:
        rc = subprocess.run(
            cmd, cwd=ROOT, stdout=errf, stderr=subprocess.STDOUT, timeout=budget_s + 240
        ).returncode
    f = out / "capacity.json"
    if rc != 0 or not f.exists():
        raise RuntimeError(f"loadgen capacity failed ({rc}); see {out.parent}/capacity.log")
    doc = json.loads(f.read_text())
    doc["command"] = "python -m " + shlex.join(cmd[2:])
    return doc


def sim_flags(lay: Layout, settings: ServeSettings, kv_bytes_per_token: int) -> list[str]:
    """The deployed cluster: every prefill replica and decode worker on GPU 0."""
    m = lay.models
    ones, zeros = ",".join(["1"] * m), ",".join(["0"] * m)
    decode = (
        ["--policy", "partitioned", "--decode-gpus", ones, "--decode-gpu-ids", zeros]
        if lay.kind == "conv"
        else ["--policy", "sun", "--decode-gpus", "1", "--decode-gpu-ids", "0"]
    )
    return [
        *decode,
        "--prefill-gpus",
        ones,
        "--prefill-gpu-ids",
        zeros,
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--prefill-max-batched-tokens",
        str(settings.max_num_batched_tokens),
        "--kv-capacity-tokens",
        str((lay.kv_mb_per_worker << 20) // kv_bytes_per_token),
    ]


def run_loadgen(argv: list[str]) -> int:
    """`python -m loadgen ARGV` in this process, its tables on stderr (stdout is the driver's report)."""
    from loadgen.cli import main as loadgen_main

    with contextlib.redirect_stdout(sys.stderr):
        return loadgen_main(argv)


def sim_capacity(
    lay: Layout,
    a,
    settings: ServeSettings,
    kv_bpt: int,
    profile: str,
    sharing: str,
    out: Path,
    start_rate: float | None = None,
    max_probes: int | None = None,
) -> dict:
    """`loadgen sim capacity` on the deployed cluster; with `start_rate` and `max_probes` 1, one simulated probe at
    that rate (the simulator's latencies at a live capacity)."""
    start = start_rate or a.start_rate.get(lay.kind, a.start_rate["default"])
    argv = [
        "sim",
        "capacity",
        "--profile",
        profile,
        *sim_flags(lay, settings, kv_bpt),
        "--gpu-sharing",
        sharing,
        *workload_flags(lay.models, a.alpha, 1, a),
        *search_flags(a, start, 600),
        "--max-probes",
        str(max_probes or a.sim_max_probes),
        "--no-progress",
        "--out",
        str(out),
    ]
    if run_loadgen(argv) != 0:
        raise RuntimeError(f"loadgen {shlex.join(argv)} failed")
    doc = json.loads(out.read_text())
    doc["command"] = "loadgen " + shlex.join(argv)
    return doc


def calibrate(status_path: Path, profile: str, context: float, out: Path) -> str:
    argv = [
        "sim",
        "calibrate",
        "--profile",
        profile,
        "--status",
        str(status_path),
        "--context",
        f"{context:g}",
        "--min-steps",
        "20",
        "--out",
        str(out),
    ]
    if run_loadgen(argv) != 0:
        raise RuntimeError("loadgen sim calibrate failed")
    return str(out)


def brief(cap_doc: dict) -> list[dict]:
    """Per criterion: what the report tables need from a capacity document."""
    out = []
    for c in cap_doc["capacity"]:
        at = c.get("at_capacity") or {}
        out.append(
            {
                "tpot_slo_ms": c["criterion"]["tpot_ms"],
                "ttft_slo_ms": c["criterion"]["ttft_ms"],
                "label": c["criterion"]["label"],
                "capacity_rate": c["capacity_rate"],
                "bracket": c["bracket"],
                "status": c["status"],
                "offered_nominal_tok_s": at.get("offered_nominal_tok_s"),
                "offered_tok_s": at.get("offered_tok_s"),
                "delivered_tok_s": at.get("delivered_tok_s"),
                "delivered_req_s": at.get("delivered_req_s"),
                "tok_s_per_gpu": at.get("delivered_tok_s_per_gpu"),
                "tpot_ms": at.get("tpot_ms"),
                "ttft_ms": at.get("ttft_ms"),
                "attainment": at.get("attainment"),
                "send_lag_ms_p99": at.get("send_lag_ms_p99"),
            }
        )
    return out


# -- comparisons --------------------------------------------------------------------------------------------------------
def compare(a: dict | None, b: dict | None, noise: float) -> dict:
    """Capacity of a against b (two brief() rows of one criterion): the ratio of capacities, its range over the
    brackets, and a verdict that names a winner only when the brackets, widened by `noise`, do not overlap."""
    if not a or not b or a.get("capacity_rate") is None or b.get("capacity_rate") is None:
        return {"ratio": None, "range": None, "verdict": "inconclusive (a capacity is missing)"}
    a_lo, a_hi = a["bracket"]
    b_lo, b_hi = b["bracket"]
    ratio = a["capacity_rate"] / b["capacity_rate"]
    lo_r = a_lo / b_hi if b_hi else None  # the least a can be ahead
    hi_r = a_hi / b_lo if a_hi else None
    if lo_r is not None and lo_r > 1 + noise:
        verdict = "higher"
    elif hi_r is not None and hi_r < 1 / (1 + noise):
        verdict = "lower"
    else:
        verdict = "inconclusive"
    return {
        "ratio": round(ratio, 3),
        "range": [None if lo_r is None else round(lo_r, 3), None if hi_r is None else round(hi_r, 3)],
        "verdict": verdict,
    }


# -- the run --------------------------------------------------------------------------------------------------------------
def prepare(lay: Layout, settings: ServeSettings, out: Path) -> dict:
    """Write the layout's YAML and validate it as build_app would; the result dict says if it cannot run."""
    res: dict = {"layout": dataclasses.asdict(lay), "describe": lay.describe()}
    if not lay.fits:
        res["not_run"] = lay.reason
        return res
    ypath = write_yaml(lay, out / lay.name / f"{lay.name}.yaml", settings)
    res["yaml"] = str(ypath.relative_to(out))
    try:
        validate(yaml.safe_load(ypath.read_text()))
    except Exception as e:  # noqa: BLE001 - the config is refused: say why, run nothing
        res["not_run"] = f"the serving config is refused ({_first_error(e)})"
    return res


def run_layout(
    res: dict, lay: Layout, a, settings: ServeSettings, mps: MPS, out: Path, budget_s: float
) -> dict:
    """Deploy, search, read the status, stop; then the simulator on the same cluster."""
    dirpath = out / lay.name
    dep = ServeProcess(
        lay.name, out / res["yaml"], dirpath, model_names(lay.models), lay.decode_workers, settings.port
    )
    try:
        res["startup_s"] = round(dep.start(a.start_timeout), 1)
        if lay.mps_percentage:
            res["mps_thread_percentage_seen"] = dep.decode_worker_env("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
        if mps.started:
            res["mps_servers"] = mps.query("get_server_list")
        t0 = time.monotonic()
        doc = live_capacity(dep, lay, a, budget_s, dirpath / "capacity")
        res["search_s"] = round(time.monotonic() - t0, 1)
        res["live"] = brief(doc)
        res["live_command"] = doc["command"]
        res["probes"] = [
            {
                "rate": p["rate"],
                "stop": p["stop"],
                "wall_s": p["wall_s"],
                "holds": {k: v["holds"] for k, v in p["criteria"].items()},
                "offered_tok_s": p["offered"]["tok_s"],
                "delivered_tok_s": p["delivered"]["tok_s"],
                "tpot_ms_p50": p["tpot_ms"]["p50"],
                "tpot_ms_p90": p["tpot_ms"]["p90"],
                "ttft_ms_p50": p["ttft_ms"]["p50"],
            }
            for p in doc["probes"]
        ]
        res["search_stopped"] = doc["stopped"]
        status = dep.status(dirpath / "status-after.json")
        res["decode_status"] = (status or {}).get("router", {}).get("workers")
    except Exception as e:  # noqa: BLE001 - one layout failing must not leave its server running
        log(f"{lay.name}: FAILED: {e}")
        res["failed"] = str(e)
    finally:
        dep.stop()
    if a.no_sim or not res.get("live"):
        return res
    res["sim"] = simulate(res, lay, a, settings, dirpath, dirpath / "status-after.json")
    return res


def simulate(res: dict, lay: Layout, a, settings: ServeSettings, dirpath: Path, status_file: Path) -> dict:
    """The simulator on the layout as deployed: its capacity search with the offline profile and with the profile
    calibrated in situ (the live decode step times in `status_file`), and one simulated probe at each live
    capacity rate, so latencies are compared at the same rate too."""
    kv_bpt = a.kv_bytes_per_token
    sims: dict = {}
    profiles = [("offline", a.profile, "turns")]
    if status_file.exists():
        try:
            prof = calibrate(
                status_file, a.profile, a.input_len + a.output_len / 2, dirpath / "profile-in-situ.json"
            )
            profiles.append(("in_situ", prof, "none"))
        except Exception as e:  # noqa: BLE001 - the live result stands without it
            sims["in_situ_error"] = str(e)
    for kind, prof, sharing in profiles:
        try:
            sims[kind] = brief(
                sim_capacity(
                    lay, a, settings, kv_bpt, prof, sharing, dirpath / f"sim-{kind.replace('_', '-')}.json"
                )
            )
            at = []
            for k, lv in enumerate(res["live"]):
                rate = lv["capacity_rate"]
                if not rate:
                    at.append(None)
                    continue
                f = dirpath / f"sim-{kind.replace('_', '-')}-at-live-{k}.json"
                p = sim_capacity(lay, a, settings, kv_bpt, prof, sharing, f, start_rate=rate, max_probes=1)
                p = p["probes"][0]
                at.append(
                    {"rate": rate, "tpot_ms_p50": p["tpot_ms"]["p50"], "ttft_ms_p50": p["ttft_ms"]["p50"]}
                )
            sims[f"{kind}_at_live"] = at
        except Exception as e:  # noqa: BLE001
            sims[f"{kind}_error"] = str(e)
    return sims


def resimulate(paths: list[str], work: Path) -> int:
    """Run (again) the simulator for every live result of saved parts, from the decode step times they recorded
    (`decode_status`), also for parts that ran with --no-sim; each part's JSON is rewritten with its `sim`."""
    for path in paths:
        doc = json.loads(Path(path).read_text())
        a = parse(shlex.split(doc["command"])[3:])
        settings = ServeSettings(**doc["settings"])
        for res in doc["results"]:
            if not res.get("live") or not res.get("decode_status"):
                continue
            lay = Layout(**res["layout"])
            d = work / doc["tag"] / lay.name
            d.mkdir(parents=True, exist_ok=True)
            status = d / "status-after.json"
            status.write_text(json.dumps({"router": {"workers": res["decode_status"]}}))
            res["sim"] = simulate(res, lay, a, settings, d, status)
            log(f"{doc['tag']} {lay.name}: simulated again")
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            first = errors()[0]
            return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg')}"
    return type(e).__name__


def gpu_names() -> list[str]:
    """One line per GPU: name, memory, driver (nvidia-smi); [] without one."""
    with contextlib.suppress(Exception):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return [line.strip() for line in q.splitlines() if line.strip()]
    return []


def machine() -> str:
    gpus = gpu_names()
    if gpus:
        return f"{gpus[0]} (GPU 0 of {len(gpus)}); {os.cpu_count()} CPU cores"
    return f"no GPU (CPU only); {os.cpu_count()} CPU cores"


def gpu_memory_gib() -> float | None:
    """What the GPU holds (nvidia-smi's total, less 0.8 GiB the driver keeps); None without nvidia-smi."""
    with contextlib.suppress(Exception):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.split()
        return round(float(q[0]) / 1024 - 0.8, 1)
    return None


def layouts_for(a, mem: Memory, mps_ok: bool) -> list[Layout]:
    out = []
    for m in a.models:
        for kind in a.layouts:
            out.append(plan(m, kind, mem, qsun_scheme=a.qsun_scheme, mps=mps_ok))
    return out


def run(a, argv: list[str]) -> dict:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    if a.dry_run:
        settings, mem = dry_run_setup(a, out)
    else:
        settings = ServeSettings(
            tokenizer=a.tokenizer,
            kv_transport=a.transport,
            ingress_replicas=a.ingress_replicas,
            stream_interval=a.stream_interval,
            overlap_steps=a.overlap_steps,
        )
        mem = memory_from_shape(
            a.shape,
            gpu_gib=a.gpu_mem_gib or gpu_memory_gib() or 79.2,
            decode_kv_gib=a.decode_kv_gib,
            prefill_kv_gib=a.prefill_kv_gib,
            overhead_gib=a.overhead_gib,
        )
    mps = MPS(Path(a.mps_dir))
    wants_mps = any(k == "conv" for k in a.layouts) and not a.dry_run and not a.no_mps
    if wants_mps:
        mps.start()
        log(mps.note)
    elif a.dry_run:
        mps.note = "dry run on CPU: no GPU, no MPS; the conv layout's decode workers share the CPU"
    else:
        mps.note = "MPS not started (--no-mps or no conv layout)"
    doc: dict = {
        "tag": a.tag,
        "command": "python -m experiments.serving_capacity " + shlex.join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "dry_run": a.dry_run,
        "mps": mps.note,
        "memory": dataclasses.asdict(mem),
        "settings": dataclasses.asdict(settings),
        "workload": {
            "models": {str(m): model_names(m) for m in a.models},
            "alpha": a.alpha,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "seed": a.seed,
            "arrival": "poisson",
            "tpot_slo_ms": a.tpot_slo_ms,
            "ttft_slo_ms": a.ttft_slo_ms,
            "target": a.target,
            "probe": {
                "at_the_end": "cancelled" if a.cancel_background else "drained (up to the tail bound)",
                "warmup_s": a.warmup,
                "measure_s": a.measure,
                "settle_s": a.settle,
                "settle_timeout_s": a.settle_timeout,
            },
            "search": {"growth": a.growth, "resolution": a.resolution, "max_probes": a.max_probes},
        },
        "noise": a.noise,
        "profile": a.profile,
        "results": [],
    }
    jpath = out / f"{a.tag}.json"

    def save() -> None:
        jpath.write_text(json.dumps(doc, indent=1) + "\n")
        (out / f"{a.tag}.md").write_text(markdown(merge([doc])))

    layouts = layouts_for(a, mem, mps.started or a.dry_run)
    prepared = []
    for lay in layouts:
        res = prepare(lay, settings, out)
        if lay.kind == "conv" and not (mps.started or a.dry_run) and "not_run" not in res:
            res["not_run"] = f"no MPS ({mps.note}): conventional serving is never run time-sliced"
        if "not_run" in res:
            log(f"{lay.name}: NOT RUN: {res['not_run']}")
        prepared.append((lay, res))
    try:
        for i, (lay, res) in enumerate(prepared):
            doc["results"].append(res)
            if "not_run" in res:
                save()
                continue
            left = a.deadline_s - (time.monotonic() - t_start)
            runnable = sum("not_run" not in r for _, r in prepared[i:])
            budget = min(a.max_search_s, (left - runnable * a.overhead_s) / runnable)
            if budget < a.min_search_s:
                res["not_run"] = f"out of time ({left:.0f} s left of the {a.deadline_s:g} s deadline)"
                log(f"{lay.name}: NOT RUN: {res['not_run']}")
                save()
                continue
            log(f"{lay.name}: {lay.describe()}; search budget {budget:.0f} s")
            run_layout(res, lay, a, settings, mps, out, budget)
            save()
    finally:
        if mps.started:
            doc["mps_control_log_tail"] = mps.control_log()[-1500:]
        mps.stop()
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    save()
    return doc


def dry_run_setup(a, out: Path) -> tuple[ServeSettings, Memory]:
    from sunray.models.tiny import make_tiny_model_dir

    mdir = out / "models"
    base_dir = mdir / "base"
    if not (base_dir / "config.json").exists():
        make_tiny_model_dir(mdir, "llama", seed=0, name="base", max_position_embeddings=512)
    settings = ServeSettings(
        device="cpu",
        dtype="float32",
        dummy_shape=None,
        module=str(base_dir),
        torch_threads=1,
        kv_transport="object_store",
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_model_len=512,
        decode_cpus=0,
        max_ongoing_requests=1024,
        ingress_replicas=a.ingress_replicas,
        stream_interval=a.stream_interval,
        overlap_steps=a.overlap_steps,
    )
    mem = Memory(
        gpu_gib=1e9, weights_gib=0.0, int4_weights_gib=0.0, decode_kv_gib=0.0625, prefill_kv_gib=0.03125
    )
    return settings, mem


# -- the report ---------------------------------------------------------------------------------------------------------
def merge(docs: list[dict]) -> dict:
    """One report from the parts: every layout result, each with the part it came from."""
    rows = []
    for d in docs:
        for r in d["results"]:  # a part's Zipf alpha goes with each row: only rows of one alpha compare
            rows.append({**r, "part": d.get("tag", ""), "alpha": d["workload"]["alpha"]})
    noise = max(d.get("noise", 0.05) for d in docs)
    # repeats of one layout (the same name and alpha in several parts): their spread is measured noise
    spreads = []
    by_name: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r.get("live"):
            by_name.setdefault((r["layout"]["name"], r["alpha"]), []).append(r)
    for (name, alpha), rs in by_name.items():
        if len(rs) > 1:
            for k in range(len(rs[0]["live"])):
                caps = [x["live"][k]["capacity_rate"] for x in rs if x["live"][k]["capacity_rate"]]
                if len(caps) > 1:
                    spreads.append(
                        {
                            "layout": name,
                            "alpha": alpha,
                            "tpot_slo_ms": rs[0]["live"][k]["tpot_slo_ms"],
                            "capacities": caps,
                            "spread": round(max(caps) / min(caps) - 1, 3),
                        }
                    )
    measured = max((s["spread"] for s in spreads), default=0.0)
    return {
        "parts": [
            {
                k: d.get(k)
                for k in (
                    "tag",
                    "command",
                    "date",
                    "machine",
                    "dry_run",
                    "mps",
                    "wall_s",
                    "memory",
                    "workload",
                    "settings",
                    "profile",
                )
            }
            for d in docs
        ],
        "noise": {"assumed": noise, "repeats": spreads, "used": round(max(noise, measured), 3)},
        "results": rows,
        "comparisons": comparisons(rows, max(noise, measured)),
        "simulator": simulator_rows(rows),
    }


def _live(rows: list[dict], name: str, alpha: float) -> list[dict] | None:
    """The live capacity rows of layout `name` under Zipf `alpha` (the first part that ran it; repeats are in the
    noise)."""
    for r in rows:
        if r["layout"]["name"] == name and r["alpha"] == alpha and r.get("live"):
            return r["live"]
    return None


def comparisons(rows: list[dict], noise: float) -> list[dict]:
    out = []
    for alpha, m in sorted({(r["alpha"], r["layout"]["models"]) for r in rows}):
        for what, a_name, b_name in (
            ("SUN vs conventional (MPS)", f"sun-{m}", f"conv-{m}"),
            ("QSUN (int4) vs bf16 SUN", f"qsun-{m}", f"sun-{m}"),
        ):
            names = {r["layout"]["name"] for r in rows if r["alpha"] == alpha}
            if a_name not in names or b_name not in names:
                continue
            la, lb = _live(rows, a_name, alpha), _live(rows, b_name, alpha)
            slos = sorted({x["tpot_slo_ms"] for x in (la or []) + (lb or [])})
            for slo in slos:
                ra = next((x for x in la or [] if x["tpot_slo_ms"] == slo), None)
                rb = next((x for x in lb or [] if x["tpot_slo_ms"] == slo), None)
                c = compare(ra, rb, noise)
                out.append(
                    {
                        "alpha": alpha,
                        "models": m,
                        "what": what,
                        "a": a_name,
                        "b": b_name,
                        "tpot_slo_ms": slo,
                        **c,
                        "a_capacity": ra and ra["capacity_rate"],
                        "b_capacity": rb and rb["capacity_rate"],
                        "a_tok_s_per_gpu": ra and ra["tok_s_per_gpu"],
                        "b_tok_s_per_gpu": rb and rb["tok_s_per_gpu"],
                    }
                )
    return out


def simulator_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        live, sims = r.get("live"), r.get("sim") or {}
        if not live:
            continue
        for k, lv in enumerate(live):
            row = {
                "layout": r["layout"]["name"],
                "part": r["part"],
                "tpot_slo_ms": lv["tpot_slo_ms"],
                "live_capacity": lv["capacity_rate"],
                "live_tpot_p50": (lv["tpot_ms"] or {}).get("p50"),
                "live_ttft_p50": (lv["ttft_ms"] or {}).get("p50"),
            }
            for kind in ("offline", "in_situ"):
                s = sims.get(kind)
                if not s:
                    continue
                sv = s[k]
                cap_ratio = (
                    sv["capacity_rate"] / lv["capacity_rate"]
                    if sv["capacity_rate"] and lv["capacity_rate"]
                    else None
                )
                tp = (sv["tpot_ms"] or {}).get("p50")
                tp_ratio = tp / row["live_tpot_p50"] if tp and row["live_tpot_p50"] else None
                row[kind] = {
                    "capacity": sv["capacity_rate"],
                    "capacity_ratio": None if cap_ratio is None else round(cap_ratio, 3),
                    "tpot_p50": tp,
                    "tpot_p50_ratio": None if tp_ratio is None else round(tp_ratio, 3),
                    "within": cap_ratio is not None
                    and tp_ratio is not None
                    and abs(cap_ratio - 1) <= TOLERANCE
                    and abs(tp_ratio - 1) <= TOLERANCE,
                }
                at = (sims.get(f"{kind}_at_live") or [None] * len(live))[k]
                if at:  # the simulator at the live capacity rate: latencies compared at one rate
                    row[kind]["at_live"] = {
                        "tpot_p50": at["tpot_ms_p50"],
                        "tpot_p50_ratio": _ratio(at["tpot_ms_p50"], row["live_tpot_p50"]),
                        "ttft_p50": at["ttft_ms_p50"],
                        "ttft_p50_ratio": _ratio(at["ttft_ms_p50"], row["live_ttft_p50"]),
                    }
            out.append(row)
    return out


def _f(v, d: int = 1) -> str:
    return "-" if v is None else f"{v:,.{d}f}"


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _range(r: list | None) -> str:
    lo, hi = r or (None, None)
    if lo is None and hi is None:
        return "-"
    if hi is None:
        return f">= {lo:.2f}"
    if lo is None:
        return f"<= {hi:.2f}"
    return f"{lo:.2f}-{hi:.2f}"


def _pair(p: dict | None, d: int = 1) -> str:
    p = p or {}
    return f"{_f(p.get('p50'), d)} / {_f(p.get('p90'), d)}"


def _alphas(parts: list[dict]) -> str:
    """The parts' Zipf alphas, each with its parts when they differ."""
    by: dict[float, list[str]] = {}
    for p in parts:
        by.setdefault(p["workload"]["alpha"], []).append(p["tag"])
    if len(by) == 1:
        return f"{next(iter(by)):g}"
    return ", ".join(f"{a:g} ({', '.join(tags)})" for a, tags in sorted(by.items()))


def markdown(rep: dict) -> str:
    parts = rep["parts"]
    first = parts[0]
    wl = first["workload"]
    dry = any(p.get("dry_run") for p in parts)
    lines = [
        "# Capacity on one GPU: SUN against conventional serving under CUDA MPS, and QSUN (issue 13)",
        "",
    ]
    if dry:
        lines += [
            "**DRY RUN on CPU** (tiny random models, no GPU, no MPS): these numbers test the pipeline, not sunray.",
            "",
        ]
    for p in parts:
        lines.append(
            f"- {p['tag']}: `{p['command']}`; {p['date']}; {p['machine']}; {p['mps']}; wall {p.get('wall_s')} s."
        )
    lines += [
        "",
        f"Workload: Zipf alpha {_alphas(parts)} over the M task models (alpha 0: equal traffic), Poisson arrivals, "
        f"{wl['input_len']}-token prompts, "
        f"{wl['output_len']} output tokens (ignore_eos), seed {wl['seed']}, `/v1/completions` streaming over HTTP "
        "from `loadgen capacity`.",
        "SLO: a request meets it when it finishes with TPOT <= the TPOT SLO"
        + (f" and TTFT <= {wl['ttft_slo_ms']:g} ms" if wl.get("ttft_slo_ms") else "")
        + f"; the SLO holds at a rate when >= {100 * wl['target']:g}% of the measured requests meet it (the "
        f"p{100 * wl['target']:g} of per-request TPOT, misses counted as infinite), none fails with an error, and the "
        "server streamed >= 80% of the offered tokens during the window (a growing queue fails even while a short "
        "window's latencies hold); refused, failed and cancelled requests are misses. Capacity = the highest probed rate that holds below the "
        f"lowest that fails (ramp x{wl['search']['growth']:g}, bisection to {100 * wl['search']['resolution']:g}%); "
        f"probes of {wl['probe']['warmup_s']:g} s warm-up (excluded) + {wl['probe']['measure_s']:g} s measured, load "
        "kept on until the measured requests end; then the requests in flight are "
        + (
            "drained (up to the tail bound)"
            if "drained" in wl["probe"].get("at_the_end", "drained")
            else "cancelled"
        )
        + ".",
        "",
        "**Baseline and why it is fair.** Conventional serving gives each task model its own decode worker with its "
        "own weight copy; on one GPU the M workers share it under CUDA MPS, each limited to 100/M % of the SMs "
        "(`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, checked in each worker's environment). SUN has one decode worker for "
        "all models. Both: the same GPU and call, the same MPS daemon (SUN's processes are MPS clients too, its one "
        "decode worker unlimited), the same M prefill replicas and engine settings, KV over CUDA IPC, the same "
        f"total decode KV ({first['memory']['decode_kv_gib']:g} GiB: SUN's worker all of it, each conventional "
        "worker 1/M), the same workload, seed, probes and SLO criterion.",
        "",
        "## Layouts",
        "",
    ]
    for r in rep["results"]:
        lay = r["layout"]
        note = ""
        if r.get("not_run"):
            note = f" **Not run**: {r['not_run']}"
        elif r.get("failed"):
            note = f" **Failed**: {r['failed']}"
        seen = r.get("mps_thread_percentage_seen")
        if seen:
            note += f" MPS share seen in the decode workers: {sorted(set(map(str, seen.values())))}."
        lines.append(f"- [{r['part']}] {r['describe']}. Memory: {lay['memory']}.{note}")
    lines += [
        "",
        "## Capacity",
        "",
        "| M | Zipf alpha | layout | part | TPOT SLO ms | capacity req/s | bracket | offered tok/s (nominal / in "
        "window) | delivered tok/s | delivered / offered | tok/s per GPU | TPOT p50 / p90 ms | TTFT p50 / p90 ms "
        "| attainment | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        for lv in r.get("live") or []:
            br = lv["bracket"]
            lines.append(
                f"| {r['layout']['models']} | {r['alpha']:g} | {r['layout']['name']} | {r['part']} | {lv['tpot_slo_ms']:g} "
                f"| {_f(lv['capacity_rate'], 2)} | [{_f(br[0], 2)}, {_f(br[1], 2)}] "
                f"| {_f(lv['offered_nominal_tok_s'], 0)} / {_f(lv['offered_tok_s'], 0)} | {_f(lv['delivered_tok_s'], 0)} "
                f"| {_f(_ratio(lv['delivered_tok_s'], lv['offered_tok_s']), 2)} | {_f(lv['tok_s_per_gpu'], 0)} | {_pair(lv['tpot_ms'])} | {_pair(lv['ttft_ms'], 0)} "
                f"| {_f(lv['attainment'], 3)} | {lv['status']} |"
            )
    noise = rep["noise"]
    lines += [
        "",
        "## Comparisons",
        "",
        f"A verdict names a winner only when the capacity brackets, widened by {100 * noise['used']:g}% (noise: "
        f"{100 * noise['assumed']:g}% assumed"
        + (
            ", or the spread between repeats where larger"
            if noise["repeats"]
            else "; no repeats in these parts"
        )
        + "), do not overlap; otherwise **inconclusive**.",
        "",
        "| M | Zipf alpha | comparison | TPOT SLO ms | capacity req/s (a / b) | tok/s per GPU (a / b) | a / b | range "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rep["comparisons"]:
        v = c["verdict"]
        verdict = {"higher": f"{c['a']} higher", "lower": f"{c['b']} higher"}.get(v, v)
        rng = c["range"]
        lines.append(
            f"| {c['models']} | {c['alpha']:g} | {c['what']} | {c['tpot_slo_ms']:g} "
            f"| {_f(c['a_capacity'], 2)} / {_f(c['b_capacity'], 2)} "
            f"| {_f(c['a_tok_s_per_gpu'], 0)} / {_f(c['b_tok_s_per_gpu'], 0)} | {_f(c['ratio'], 2)} "
            f"| {_range(rng)} | {verdict} |"
        )
    if noise["repeats"]:
        lines += [
            "",
            "Repeats: "
            + "; ".join(
                f"{s['layout']} (alpha {s['alpha']:g}) at {s['tpot_slo_ms']:g} ms: "
                f"{', '.join(f'{x:.2f}' for x in s['capacities'])} req/s "
                f"(spread {100 * s['spread']:.0f}%)"
                for s in noise["repeats"]
            ),
        ]
    sim = rep["simulator"]
    if sim:
        lines += [
            "",
            "## The simulator on the deployed cluster",
            "",
            f"`loadgen sim capacity`: the same search, probes and workload over simulated rates, on the cluster as "
            f"deployed (one GPU; every prefill replica and decode worker on it). Offline: `{first.get('profile')}`, "
            "every process taking turns on the GPU. In situ: that profile's decode times scaled to this layout's own "
            "decode step times (`/sunray/status` after the search), nobody taking turns (the step times hold the "
            f"interference). Target: within {100 * TOLERANCE:g}% on capacity and on TPOT p50 at capacity.",
            "",
            "| layout | part | TPOT SLO ms | capacity live | offline (ratio) | in situ (ratio) | TPOT p50 live "
            "| offline (ratio) | in situ (ratio) | within: offline / in situ |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sim:
            o, i = s.get("offline") or {}, s.get("in_situ") or {}

            def cr(x: dict, key: str, ratio: str, d: int) -> str:
                return f"{_f(x.get(key), d)} ({_f(x.get(ratio), 2)})" if x else "-"

            w = " / ".join(("yes" if x.get("within") else "no") if x else "-" for x in (o, i))
            lines.append(
                f"| {s['layout']} | {s['part']} | {s['tpot_slo_ms']:g} | {_f(s['live_capacity'], 2)} "
                f"| {cr(o, 'capacity', 'capacity_ratio', 2)} | {cr(i, 'capacity', 'capacity_ratio', 2)} "
                f"| {_f(s['live_tpot_p50'])} | {cr(o, 'tpot_p50', 'tpot_p50_ratio', 1)} "
                f"| {cr(i, 'tpot_p50', 'tpot_p50_ratio', 1)} | {w} |"
            )
        at_rows = [s for s in sim if any("at_live" in (s.get(k) or {}) for k in ("offline", "in_situ"))]
        if at_rows:
            lines += [
                "",
                "At the live capacity rate (one simulated probe at that rate, so latencies are compared at the "
                "same load; ratio = simulated / live):",
                "",
                "| layout | part | TPOT SLO ms | rate req/s | TPOT p50 live | offline (ratio) | in situ (ratio) "
                "| TTFT p50 live | offline (ratio) | in situ (ratio) |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for s in at_rows:
                o, i = ((s.get(k) or {}).get("at_live") or {} for k in ("offline", "in_situ"))

                def at(x: dict, key: str, d: int) -> str:
                    return f"{_f(x.get(key), d)} ({_f(x.get(key + '_ratio'), 2)})" if x else "-"

                lines.append(
                    f"| {s['layout']} | {s['part']} | {s['tpot_slo_ms']:g} | {_f(s['live_capacity'], 2)} "
                    f"| {_f(s['live_tpot_p50'])} | {at(o, 'tpot_p50', 1)} | {at(i, 'tpot_p50', 1)} "
                    f"| {_f(s['live_ttft_p50'], 0)} | {at(o, 'ttft_p50', 0)} | {at(i, 'ttft_p50', 0)} |"
                )
    return "\n".join(lines) + "\n"


def report(paths: list[str], out: str) -> int:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rep = merge(docs)
    o = Path(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    o.with_suffix(".json").write_text(json.dumps({"report": rep, "parts": docs}, indent=1) + "\n")
    o.with_suffix(".md").write_text(markdown(rep))
    print(markdown(rep), end="")
    return 0


# -- main -----------------------------------------------------------------------------------------------------------------
def _start_rates(items: list[str]) -> dict[str, float]:
    out = {"default": 8.0}
    for it in items:
        k, _, v = it.rpartition("=")
        out[k or "default"] = float(v)
    return out


def add_front_flags(ap: argparse.ArgumentParser, *, ingress_replicas: int, stream_interval: int) -> None:
    """What every layout of a comparison shares (this driver's and serving_multigpu's): how many ingress replicas
    carry the token fan-out, at most how many tokens go in one SSE chunk, and whether decode steps overlap."""
    ap.add_argument(
        "--ingress-replicas",
        type=int,
        default=ingress_replicas,
        help=f"ingress replicas of every layout (the token fan-out; default {ingress_replicas})",
    )
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=stream_interval,
        help=f"tokens per SSE chunk at most, every layout (the ingress's stream_interval; default {stream_interval})",
    )
    ap.add_argument(
        "--overlap-steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode workers of every layout launch each pass before reading the last (engine overlap_steps, "
        "serving's default; --no-overlap-steps for plain steps, as every run before 2026-12-08)",
    )


def check_front_flags(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for flag in ("ingress_replicas", "stream_interval"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, nargs="+", default=[2], help="values of M (default 2)")
    ap.add_argument("--layouts", nargs="+", choices=KINDS, default=["sun", "conv"], help="in this order")
    ap.add_argument("--tag", default="capacity", help="names the output files (TAG.json, TAG.md)")
    ap.add_argument("--out", default="results/serving-capacity")
    ap.add_argument("--tokenizer", default="default", help="tokenizer directory for the dummy 8B")
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--transport", choices=("cuda_ipc", "object_store"), default="cuda_ipc")
    add_front_flags(ap, ingress_replicas=1, stream_interval=1)
    ap.add_argument("--qsun-scheme", default="int4-g128")
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tpot-slo-ms", type=float, nargs="+", default=[20.0, 40.0])
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="0: none")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument(
        "--start-rate",
        nargs="+",
        default=["16", "conv=8"],
        metavar="[KIND=]R",
        help="first rate of the search, per layout kind (default 16, conv=8)",
    )
    ap.add_argument("--growth", type=float, default=2.0)
    ap.add_argument("--resolution", type=float, default=0.1)
    ap.add_argument("--max-probes", type=int, default=10)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--measure", type=float, default=6.0)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--settle-timeout", type=float, default=20.0, help="canaries after a probe, at most (s)")
    ap.add_argument("--sim-max-probes", type=int, default=30, help="the simulator's searches (cheap probes)")
    ap.add_argument(
        "--cancel-background",
        action="store_true",
        help="cancel the requests in flight at a probe's end (default: let them finish, up to the tail bound: a "
        "cancelled submit kills the decode worker's step thread, sunray/serve/decode_worker.py _apply_inbox)",
    )
    ap.add_argument(
        "--noise", type=float, default=0.05, help="capacity noise assumed for verdicts (default 5%%)"
    )
    ap.add_argument("--deadline-s", type=float, default=510.0, help="wall time for the whole run")
    ap.add_argument("--overhead-s", type=float, default=120.0, help="per layout: start, stop, simulator")
    ap.add_argument(
        "--min-search-s", type=float, default=60.0, help="a layout with less search time is skipped"
    )
    ap.add_argument("--max-search-s", type=float, default=200.0)
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--gpu-mem-gib", type=float, default=None, help="default: from nvidia-smi")
    ap.add_argument("--decode-kv-gib", type=float, default=8.0, help="total decode KV per layout (default 8)")
    ap.add_argument("--prefill-kv-gib", type=float, default=1.0)
    ap.add_argument("--overhead-gib", type=float, default=1.5)
    ap.add_argument("--mps-dir", default="/tmp/sunray-mps")
    ap.add_argument("--no-mps", action="store_true", help="no MPS: conventional layouts are then not run")
    ap.add_argument("--profile", default=None, help=f"offline step profile (default {OFFLINE_PROFILE})")
    ap.add_argument("--no-sim", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny random models, the whole pipeline")
    ap.add_argument(
        "--report", nargs="+", default=None, metavar="PART.json", help="merge parts into --out.{md,json}"
    )
    ap.add_argument(
        "--resim",
        nargs="+",
        default=None,
        metavar="PART.json",
        help="run the simulator again for each part's live results from the decode step times it saved "
        "(also parts run with --no-sim); rewrites each PART.json (work files under --out)",
    )
    a = ap.parse_args(argv)
    check_front_flags(ap, a)
    a.start_rate = _start_rates(a.start_rate)
    a.ttft_slo_ms = a.ttft_slo_ms or None
    a.kv_bytes_per_token = 131072  # Llama-3.1-8B bf16: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes
    if a.dry_run:
        # tiny models on 2 shared CPU cores: short prompts, loose SLOs, short probes, a few minutes in all
        dflt = ap.parse_args([])
        for k, v in {
            "input_len": 16,
            "output_len": 16,
            "warmup": 1.5,
            "measure": 3.0,
            "settle": 0.5,
            "settle_timeout": 10.0,
            "resolution": 0.3,
            "max_probes": 6,
            "deadline_s": 300.0,
            "overhead_s": 45.0,
            "min_search_s": 30.0,
            "max_search_s": 60.0,
            "start_timeout": 240.0,
        }.items():
            if getattr(a, k) == getattr(dflt, k):
                setattr(a, k, v)
        if a.tpot_slo_ms == dflt.tpot_slo_ms:
            a.tpot_slo_ms = [150.0, 400.0]
        if a.ttft_slo_ms == 1000.0:
            a.ttft_slo_ms = 3000.0
        if a.start_rate == _start_rates(dflt.start_rate):
            a.start_rate = {"default": 2.0}
        if a.layouts == dflt.layouts:
            a.layouts = ["sun", "conv", "qsun"]
        if a.out == dflt.out:
            a.out = "results/serving-capacity-dry-run"
        if a.tag == dflt.tag:
            a.tag = "dry-run"
        # the tiny model's KV: 2 layers x 2 KV heads x 16 x (K, V) x 4 bytes
        a.kv_bytes_per_token = 2 * 2 * 16 * 2 * 4
    a.profile = a.profile or (DRY_PROFILE if a.dry_run else OFFLINE_PROFILE)
    return a


def _terminate(signum, frame):
    raise KeyboardInterrupt  # `timeout` sends SIGTERM: the finally blocks stop the servers and the MPS daemon


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _terminate)
    a = parse(argv)
    if a.report:
        return report(a.report, a.out)
    if a.resim:
        return resimulate(a.resim, Path(a.out))
    if Path(a.tokenizer).is_dir():
        a.tokenizer = str(Path(a.tokenizer).resolve())
    doc = run(a, argv)
    rep = merge([doc])
    print(markdown(rep), end="")
    log(f"wrote {Path(a.out).resolve() / (a.tag + '.json')} and .md")
    ran = [r for r in doc["results"] if r.get("live")]
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
