"""Issue 5 on CPU: SUN's shared decode pool against partitioned (conventional) disaggregation, live.

    make experiment-serving
    # = RAY_AUTH_MODE=disabled .venv/bin/python -m experiments.serving_cpu --out results/serving-cpu \\
    #       --json docs/results/serving-cpu.json --plots docs/results

For each configuration (a `serve run` YAML under deployments/experiments/, HTTP on 127.0.0.1:8100) it deploys the
CPU default once (SmolLM2-135M-Instruct, three task models), then sweeps the Zipf alpha of the task-model mix with
`loadgen run` against the live server (streaming completions, closed loop, fixed prompt and output lengths,
bounded in requests and seconds), then stops the deployment. Per run it records, besides loadgen's results:

- the host's load average and CPU busy share (the machine is shared: say how loaded it was);
- the CPU seconds each of this deployment's processes used during the run, by role (decode workers, prefill
  replicas, the rest), read from /proc. On a shared host, output tokens per decode-worker CPU second measures the
  decode side's batching efficiency with much less noise than tokens per wall second;
- steady-state throughput: output tokens streamed between 15% and 100% of the issue window, per second (the
  whole-run figure of loadgen also counts the ramp-up and the drain, when fewer users are left).

`--append` runs another pass on the same host later (a repeat, to see the noise): the earlier runs stay in the JSON,
the new ones get `"pass": N` and their records go under OUT/pass-N/.

Processes: each deployment runs under `python -m experiments.serve_local` (a fresh local Ray instance, no
dashboard) in a session of its own. It is stopped with SIGINT (Serve and Ray shut down), then SIGTERM, and any
process left in that session is killed by PID. Nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil

from experiments.serve_local import ROOT, ServeProcess, log, session_procs
from loadgen.report import read_records, read_summary

MODELS = ("smollm2-math", "smollm2-code", "smollm2-tool")  # most popular first (the Zipf rank)
CONFIGS = {  # name: (YAML, decode workers, policy)
    "partitioned-3": ("deployments/experiments/serving-cpu-partitioned-3.yaml", 3, "partitioned"),
    "sun-3": ("deployments/experiments/serving-cpu-sun-3.yaml", 3, "sun"),
    "sun-2": ("deployments/experiments/serving-cpu-sun-2.yaml", 2, "sun"),
    "sun-1": ("deployments/experiments/serving-cpu-sun-1.yaml", 1, "sun"),
}
PORT = 8100


# -- the deployment's processes ---------------------------------------------------------------------------------------
def role(cmdline: str) -> str:
    if "DecodeWorker" in cmdline:
        return "decode"
    if "Prefill-" in cmdline:
        return "prefill"
    if "Ingress" in cmdline or "ProxyActor" in cmdline:
        return "ingress"
    return "other"


def cpu_snapshot(sid: int, role_of=None) -> dict[int, tuple[str, float]]:
    """pid -> (role, user+system CPU seconds) for the session's processes; `role_of(cmdline)` names the role
    (default: `role`)."""
    role_of = role_of or role
    snap = {}
    for p in session_procs(sid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            snap[p.pid] = (role_of(" ".join(p.cmdline())), t.user + t.system)
    return snap


def cpu_delta(before: dict, after: dict) -> dict:
    roles: dict[str, float] = {}
    decode_workers = []
    for pid, (r, t1) in after.items():
        t0 = before.get(pid, (r, 0.0))[1]
        roles[r] = roles.get(r, 0.0) + (t1 - t0)
        if r == "decode":
            decode_workers.append(round(t1 - t0, 2))
    return {
        "by_role_s": {k: round(v, 2) for k, v in sorted(roles.items())},
        "decode_workers_s": sorted(decode_workers, reverse=True),
    }


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    f = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


# -- deploy and stop ----------------------------------------------------------------------------------------------------
class Deployment(ServeProcess):
    """One of CONFIGS, served on PORT; a slow shared host may need a minute and a half to shut Serve down."""

    def __init__(self, name: str, out: Path) -> None:
        yaml_path, workers, self.policy = CONFIGS[name]
        super().__init__(name, yaml_path, out, list(MODELS), workers, PORT, stop_wait_s=90.0)


# -- one load run -------------------------------------------------------------------------------------------------------
def steady_throughput(records, t_from: float, t_to: float) -> float | None:
    """Output tokens streamed in [t_from, t_to] per second (chunks with text, scaled to the usage counts)."""
    chunks = sum(len(r.chunk_s) for r in records if r.status == "ok")
    tokens = sum(r.output_tokens for r in records if r.status == "ok")
    scale = tokens / chunks if chunks else 1.0
    n = sum(t_from <= t <= t_to for r in records for t in r.chunk_s)
    return round(n * scale / (t_to - t_from), 3) if t_to > t_from else None


def load_run(dep: Deployment, alpha: float, a) -> dict:
    out = dep.out / f"alpha-{alpha:g}"
    cmd = [
        sys.executable,
        "-m",
        "loadgen",
        "run",
        "--url",
        f"http://127.0.0.1:{PORT}",
        "--models",
        *MODELS,
        "--alpha",
        f"{alpha:g}",
        "--concurrency",
        str(a.concurrency),
        "--input-len",
        str(a.input_len),
        "--output-len",
        str(a.output_len),
        "--num-requests",
        str(a.num_requests),
        "--duration",
        f"{a.duration:g}",
        "--drain-timeout",
        f"{a.drain_timeout:g}",
        "--timeout",
        "300",
        "--seed",
        str(a.seed),
        "--num-gpus",
        str(dep.workers),
        "--ttft-slo-ms",
        f"{a.ttft_slo_ms:g}",
        "--tpot-slo-ms",
        f"{a.tpot_slo_ms:g}",
        "--label",
        f"{dep.name} a={alpha:g}",
        "--no-progress",
        "--out",
        str(out),
    ]
    sid = dep.proc.pid
    load0, cpu0, host0, t0 = os.getloadavg(), cpu_snapshot(sid), host_cpu(), time.monotonic()
    log(f"{dep.name} alpha {alpha:g}: load average {load0[0]:.1f}; {shlex.join(cmd[1:])}")
    rc = subprocess.run(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=a.duration + a.drain_timeout + 120
    ).returncode
    wall = time.monotonic() - t0
    cpu1, host1, load1 = cpu_snapshot(sid), host_cpu(), os.getloadavg()
    summary = read_summary(out)
    run = summary["runs"][-1]
    records = read_records(out / run["requests_file"])
    cpu = cpu_delta(cpu0, cpu1)
    o = run["overall"]
    steady = steady_throughput(records, 0.15 * a.duration, a.duration)
    dec_cpu = cpu["by_role_s"].get("decode", 0.0)
    res = {
        "config": dep.name,
        "policy": dep.policy,
        "decode_workers": dep.workers,
        "alpha": alpha,
        "loadgen_rc": rc,
        "results_dir": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
        "command": "python -m " + shlex.join(cmd[2:]),
        "requests": o["requests"],
        "ok": o["ok"],
        "refused": o["refused"],
        "error": o["error"],
        "cancelled": o["cancelled"],
        "duration_s": run["duration_s"],
        "output_tokens": o["output_tokens"],
        "throughput_tok_s": o["output_token_throughput"],
        "throughput_tok_s_per_worker": o.get("output_token_throughput_per_gpu"),
        "steady_tok_s": steady,
        "steady_tok_s_per_worker": None if steady is None else round(steady / dep.workers, 3),
        "request_throughput": o["request_throughput"],
        "ttft_ms": o["ttft_ms"],
        "tpot_ms": o["tpot_ms"],
        "e2e_ms": o["e2e_ms"],
        "slo_attainment": o.get("slo_attainment"),
        "goodput_tok_s": o.get("goodput_tokens"),
        "per_model": {
            m: {
                k: g[k]
                for k in ("requests", "ok", "output_token_throughput", "ttft_ms", "tpot_ms", "slo_attainment")
            }
            for m, g in run["per_model"].items()
        },
        "cpu_s": cpu,
        "wall_s": round(wall, 1),
        "decode_tok_per_cpu_s": round(o["output_tokens"] / dec_cpu, 2) if dec_cpu > 0 else None,
        "load_average_before": [round(x, 2) for x in load0],
        "load_average_after": [round(x, 2) for x in load1],
        "host_cpu_busy": round((host1[0] - host0[0]) / max(1.0, host1[1] - host0[1]), 3),
    }
    log(
        f"{dep.name} alpha {alpha:g}: {o['ok']}/{o['requests']} ok, {o['output_token_throughput']} tok/s "
        f"(steady {steady}), TPOT p50 {o['tpot_ms']['p50']} ms, decode CPU {dec_cpu:.0f} s, load {load1[0]:.1f}"
    )
    return res


# -- the report ---------------------------------------------------------------------------------------------------------
def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(results: list[dict]) -> str:
    head = (
        "| config | alpha | pass | ok/req | tok/s | tok/s per worker | steady tok/s | steady per worker | TTFT p50 / p90 ms "
        "| TPOT p50 / p90 ms | SLO % | tok per decode CPU-s | decode CPU-s per worker | load avg |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in sorted(results, key=lambda r: (r["config"], r["alpha"], r.get("pass", 1))):
        rows.append(
            f"| {r['config']} | {r['alpha']:g} | {r.get('pass', 1)} | {r['ok']}/{r['requests']} | {_f(r['throughput_tok_s'])} "
            f"| {_f(r['throughput_tok_s_per_worker'])} | {_f(r['steady_tok_s'])} | {_f(r['steady_tok_s_per_worker'])} "
            f"| {_f(r['ttft_ms']['p50'], 0)} / {_f(r['ttft_ms']['p90'], 0)} "
            f"| {_f(r['tpot_ms']['p50'], 0)} / {_f(r['tpot_ms']['p90'], 0)} "
            f"| {_f(None if r['slo_attainment'] is None else 100 * r['slo_attainment'], 0)} "
            f"| {_f(r['decode_tok_per_cpu_s'])} | {' / '.join(f'{x:.0f}' for x in r['cpu_s']['decode_workers_s'])} "
            f"| {r['load_average_before'][0]:.0f} -> {r['load_average_after'][0]:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


# A run is "contended" when its busiest decode worker got less than this share of one core: other tenants of the
# host took the CPU. Chosen after the runs, at the gap in the data: contended runs got 0.13-0.25, all others
# 0.37-0.46 (three workers) or 0.64-0.73 (one); the 1-minute load average at the end of a contended run was 19-64,
# at the end of the others 7-20. Tables give the all-runs figures beside the uncontended ones.
CONTENDED_SHARE = 0.3


def decode_share(r: dict) -> float:
    return max(r["cpu_s"]["decode_workers_s"]) / r["duration_s"]


def contended(r: dict) -> bool:
    return decode_share(r) < CONTENDED_SHARE


def summary_table(results: list[dict]) -> str:
    """Per configuration and alpha: the mean over the uncontended passes (range when several), and over all."""

    def cell(vals: list[float], digits: int = 1) -> str:
        if not vals:
            return "-"
        m = sum(vals) / len(vals)
        return f"{m:.{digits}f}" + (
            f" ({min(vals):.{digits}f}-{max(vals):.{digits}f})" if len(vals) > 1 else ""
        )

    head = (
        "| config | alpha | runs (contended) | steady tok/s | per decode worker | TPOT p50 ms | TPOT p90 ms "
        "| TTFT p50 ms | SLO % | tok per decode CPU-s | steady tok/s, all runs |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in list(dict.fromkeys(r["config"] for r in results)):
        for alpha in sorted({r["alpha"] for r in results if r["config"] == c}):
            every = [r for r in results if r["config"] == c and r["alpha"] == alpha]
            rs = [r for r in every if not contended(r)]
            rows.append(
                f"| {c} | {alpha:g} | {len(every)} ({len(every) - len(rs)}) | {cell([r['steady_tok_s'] for r in rs])} "
                f"| {cell([r['steady_tok_s_per_worker'] for r in rs])} | {cell([r['tpot_ms']['p50'] for r in rs], 0)} "
                f"| {cell([r['tpot_ms']['p90'] for r in rs], 0)} | {cell([r['ttft_ms']['p50'] for r in rs], 0)} "
                f"| {cell([100 * r['slo_attainment'] for r in rs], 0)} | {cell([r['decode_tok_per_cpu_s'] for r in rs])} "
                f"| {cell([r['steady_tok_s'] for r in every])} |"
            )
    return head + "\n".join(rows) + "\n"


def plots(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in results))
    panels = [
        ("steady_tok_s", "output tok/s (steady state)"),
        ("steady_tok_s_per_worker", "tok/s per decode worker"),
        ("tpot_p50", "TPOT p50 (ms)"),
        ("decode_tok_per_cpu_s", "tokens per decode-worker CPU second"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.7))
    for ax, (key, title) in zip(axes, panels):
        for k, c in enumerate(configs):
            rs = [r for r in results if r["config"] == c]
            value = {id(r): r["tpot_ms"]["p50"] if key == "tpot_p50" else r[key] for r in rs}
            alphas = sorted({r["alpha"] for r in rs})
            clean = [[value[id(r)] for r in rs if r["alpha"] == x and not contended(r)] for x in alphas]
            ax.plot(
                [x for x, v in zip(alphas, clean) if v],
                [sum(v) / len(v) for v in clean if v],
                marker="o",
                color=f"C{k}",
                label=c,
            )
            for bad in (False, True):
                sel = [r for r in rs if contended(r) == bad]
                ax.scatter(
                    [r["alpha"] for r in sel],
                    [value[id(r)] for r in sel],
                    s=22 if bad else 12,
                    marker="x" if bad else "o",
                    color=f"C{k}",
                    alpha=0.8 if bad else 0.4,
                )
        ax.set_xlabel("Zipf alpha")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "sunray on 2 shared CPU cores: SmolLM2-135M, 3 task models, 24 closed-loop users. Lines: mean of "
        f"the uncontended runs; dots: each run; x: contended (decode worker < {CONTENDED_SHARE} of a core)",
        fontsize=9,
    )
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    p1 = out_dir / "serving-cpu.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    # per-worker CPU seconds: how evenly each configuration spread the decode work
    n_runs = [sum(r["config"] == c for r in results) for c in configs]
    fig, axes = plt.subplots(
        1,
        len(configs),
        figsize=(max(12, 0.75 * sum(n_runs)), 3.4),
        sharey=True,
        gridspec_kw={"width_ratios": n_runs},
    )
    axes = axes if len(configs) > 1 else [axes]
    for ax, c in zip(axes, configs):
        rs = sorted((r for r in results if r["config"] == c), key=lambda r: (r["alpha"], r.get("pass", 1)))
        width = 0.8 / max(len(r["cpu_s"]["decode_workers_s"]) for r in rs)
        for i, r in enumerate(rs):
            for j, v in enumerate(r["cpu_s"]["decode_workers_s"]):
                ax.bar(i + j * width, v, width, color=f"C{j}", hatch="//" if contended(r) else None)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(rs))],
            [f"{r['alpha']:g}\np{r.get('pass', 1)}" for r in rs],
            fontsize=8,
        )
        ax.set_xlabel("Zipf alpha / pass")
        ax.set_title(f"{c}: CPU s per decode worker (busiest first; hatched: contended)", fontsize=8)
    fig.tight_layout()
    p2 = out_dir / "serving-cpu-workers.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


# -- main ---------------------------------------------------------------------------------------------------------------
def add_workload_args(
    p: argparse.ArgumentParser,
    *,
    input_len: int,
    output_len: int,
    duration: float,
    drain_timeout: float,
    ttft_slo_ms: float,
    tpot_slo_ms: float,
    num_requests: int = 600,
) -> None:
    """The loadgen workload flags every serving experiment takes (each with its own defaults)."""
    p.add_argument("--input-len", type=int, default=input_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument(
        "--num-requests", type=int, default=num_requests, help=f"per run, at most (default {num_requests})"
    )
    p.add_argument(
        "--duration", type=float, default=duration, help=f"seconds of issuing per run (default {duration:g})"
    )
    p.add_argument("--drain-timeout", type=float, default=drain_timeout)
    p.add_argument("--ttft-slo-ms", type=float, default=ttft_slo_ms)
    p.add_argument("--tpot-slo-ms", type=float, default=tpot_slo_ms)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["partitioned-3", "sun-3", "sun-1"], choices=list(CONFIGS))
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    p.add_argument("--concurrency", type=int, default=24, help="closed-loop users (default 24)")
    add_workload_args(
        p,
        input_len=32,
        output_len=32,
        duration=75.0,
        drain_timeout=60.0,
        ttft_slo_ms=5000.0,
        tpot_slo_ms=750.0,
    )
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", default="results/serving-cpu", help="loadgen results and server logs")
    p.add_argument("--json", default=None, help="write all results here (e.g. docs/results/serving-cpu.json)")
    p.add_argument("--plots", default=None, help="write PNG plots into this directory")
    p.add_argument("--replot", action="store_true", help="only redo the table and plots from --json")
    p.add_argument(
        "--append",
        action="store_true",
        help="add these configurations' results to those already in --json (same workload flags)",
    )
    a = p.parse_args(argv)

    if a.replot:
        doc = json.loads(Path(a.json).read_text())
        print(markdown(doc["results"]), end="")
        print("\n" + summary_table(doc["results"]), end="")
        if a.plots:
            print("\n".join(str(x) for x in plots(doc["results"], Path(a.plots))))
        return 0
    out = Path(a.out)
    if not out.is_absolute():
        out = ROOT / out
    doc = {
        "command": "python -m experiments.serving_cpu " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, shared with other engineers' runs; "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
        "workload": {
            "models": list(MODELS),
            "alphas": a.alphas,
            "closed_loop_users": a.concurrency,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "num_requests": a.num_requests,
            "duration_s": a.duration,
            "seed": a.seed,
            "endpoint": "/v1/completions, stream, ignore_eos",
        },
        "slo": {"ttft_ms": a.ttft_slo_ms, "tpot_ms": a.tpot_slo_ms},
        "startup_s": {},
        "results": [],
    }
    passes = 1
    if a.append and a.json and Path(a.json).exists():
        # a second pass (a repeat on the same host, later): every earlier run is kept, the new ones are numbered
        old = json.loads(Path(a.json).read_text())
        same = {k: v for k, v in old["workload"].items() if k != "alphas"}
        if same != {k: v for k, v in doc["workload"].items() if k != "alphas"} or old["slo"] != doc["slo"]:
            p.error("--append: the workload or SLO flags differ from those of the results in --json")
        doc["workload"]["alphas"] = sorted(set(old["workload"]["alphas"]) | set(a.alphas))
        doc["command"] = f"{old['command']}; then {doc['command']}"
        doc["date"] = f"{old['date']} / {doc['date']}"
        doc["startup_s"] = old["startup_s"]
        passes = 1 + max(r.get("pass", 1) for r in old["results"])
        doc["results"] = old["results"]
        doc["wall_s_passes"] = old.get("wall_s_passes", [old.get("wall_s")])
        out = out / f"pass-{passes}"  # never overwrite the records an earlier pass's results point to
    t_start = time.monotonic()
    for name in a.configs:
        dep = Deployment(name, out / name)
        try:
            doc["startup_s"][name if passes == 1 else f"{name} (pass {passes})"] = round(
                dep.start(a.start_timeout), 1
            )
            for alpha in a.alphas:
                doc["results"].append({**load_run(dep, alpha, a), "pass": passes})
                if a.json:
                    Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        except Exception as e:  # noqa: BLE001 - one configuration failing must not leave its server running
            log(f"{name}: FAILED: {e}")
            doc.setdefault("failures", {})[name] = str(e)
        finally:
            dep.stop()
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    if "wall_s_passes" in doc:
        doc["wall_s_passes"].append(doc["wall_s"])
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc["results"]), end="")
    if doc["results"]:
        print("\n" + summary_table(doc["results"]), end="")
    if a.plots and doc["results"]:
        for x in plots(doc["results"], Path(a.plots)):
            print(x)
    return 1 if doc.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
