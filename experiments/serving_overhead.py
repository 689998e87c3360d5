"""Where a served request's CPU goes: CPU milliseconds per request and per 1,000 streamed tokens of each Serve
process (HTTP proxy, ingress, prefill replicas, router, decode pool replicas, decode workers), rate by rate, with
the client's TTFT and TPOT. Issue 13 item 1: is the prefill-side backlog the ingress's (and the proxy's) CPU?

    RAY_AUTH_MODE=disabled python -m experiments.serving_overhead CONFIG.yaml --port 8000 \\
        --models m1 m2 --rates 8 16 32 --duration 12 --out results/overhead

CONFIG is a `serve run` YAML (e.g. deployments/gpu-8b.yaml with its tokenizer set, or a layout that
`python -m experiments.serving_capacity --dry-run` wrote). The server runs under experiments.serve_local (a Ray
instance of its own, stopped by pid). For each rate: `loadgen run` (Poisson, streaming completions) for DURATION s,
and the user + system CPU seconds of every process in the server's session, read from /proc before and after.
Also reported: the ingress's SSE events per output token (`/sunray/status`: `stream_events`, `stream_tokens`),
which shows how many tokens an event carried when the ingress coalesced outputs that queued up behind it.

CPU per request is the number to compare between builds (less noisy than latency on a shared machine); the
host's busy share during the run is reported beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import psutil

from experiments.serve_local import ServeProcess, http_json
from experiments.serving_capacity import run_loadgen
from experiments.serving_cpu import cpu_snapshot, host_cpu

ROLES = (
    ("DecodeWorker", "decode worker"),
    ("DecodePool", "decode pool"),
    ("Prefill-", "prefill"),
    ("Router", "router"),
    ("Ingress", "ingress"),
    ("ProxyActor", "proxy"),
)


def role(cmdline: str) -> str:
    return next((name for key, name in ROLES if key in cmdline), "other")


def cpu_by_role(sid: int) -> dict[int, tuple[str, float]]:
    return cpu_snapshot(sid, role)


def delta(before: dict, after: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, (r, t1) in after.items():
        out[r] = out.get(r, 0.0) + t1 - before.get(pid, (r, 0.0))[1]
    return out


def stream_counts(port: int) -> tuple[int, int]:
    s = http_json(port, "/sunray/status")
    return s.get("stream_events", 0), s.get("stream_tokens", 0)


def measure(dep: ServeProcess, rate: float, a, out: Path) -> dict:
    sid = dep.proc.pid
    ev0, tok0 = stream_counts(a.port)
    busy0, total0 = host_cpu()
    cpu0, t0 = cpu_by_role(sid), time.monotonic()
    argv = [
        "run",
        "--url",
        f"http://127.0.0.1:{a.port}",
        "--models",
        *a.models,
        "--rate",
        f"{rate:g}",
        "--input-len",
        str(a.input_len),
        "--output-len",
        str(a.output_len),
        "--duration",
        str(a.duration),
        "--drain-timeout",
        "60",
        "--num-requests",
        str(int(rate * a.duration * 2) + 10),
        "--timeout",
        "120",
        "--seed",
        "0",
        "--no-progress",
        "--out",
        str(out / f"rate-{rate:g}"),
    ]
    run_loadgen(argv)
    wall = time.monotonic() - t0
    cpu = delta(cpu0, cpu_by_role(sid))
    busy1, total1 = host_cpu()
    ev1, tok1 = stream_counts(a.port)
    run = json.loads((out / f"rate-{rate:g}" / "summary.json").read_text())["runs"][0]["overall"]
    n_req, n_tok = max(1, run["ok"]), max(1, run.get("output_tokens", 0))
    row = {
        "rate": rate,
        "wall_s": round(wall, 1),
        "requests_ok": run["ok"],
        "requests": run["requests"],
        "output_tokens": run.get("output_tokens"),
        "ttft_ms": {k: run["ttft_ms"].get(k) for k in ("p50", "p99")},
        "tpot_ms": {k: run["tpot_ms"].get(k) for k in ("p50", "p99")},
        "cpu_s": {k: round(v, 3) for k, v in sorted(cpu.items())},
        "cpu_ms_per_request": {k: round(1000 * v / n_req, 2) for k, v in sorted(cpu.items())},
        "cpu_ms_per_1k_tokens": {k: round(1e6 * v / n_tok, 1) for k, v in sorted(cpu.items())},
        "events_per_token": round((ev1 - ev0) / max(1, tok1 - tok0), 3),
        "host_busy": round((busy1 - busy0) / max(1.0, total1 - total0), 2),
    }
    return row


def table(rows: list[dict]) -> str:
    roles = sorted({r for row in rows for r in row["cpu_ms_per_request"]})
    head = ["rate", "ok", "TTFT p50/p99", "TPOT p50/p99", "events/token", "host busy"] + [
        f"{r} ms/req" for r in roles
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:

        def pair(d):
            return "/".join("-" if v is None else f"{v:.0f}" for v in d.values())

        cells = [
            f"{row['rate']:g}",
            f"{row['requests_ok']}/{row['requests']}",
            pair(row["ttft_ms"]),
            pair(row["tpot_ms"]),
            f"{row['events_per_token']:.2f}",
            f"{row['host_busy']:.2f}",
        ] + [f"{row['cpu_ms_per_request'].get(r, 0):.1f}" for r in roles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def config_port(config: Path, port: int | None) -> int:
    """The port the config serves on; a --port that differs would wait on a port nobody listens on."""
    import yaml

    doc = yaml.safe_load(config.read_text()) or {}
    theirs = int(((doc.get("http_options") or {}).get("port")) or 8000)
    if port is not None and port != theirs:
        raise ValueError(f"--port {port}, but {config} serves on port {theirs} (http_options.port)")
    return theirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a serve run YAML")
    ap.add_argument(
        "--port",
        type=int,
        default=None,
        help="the config's HTTP port (default: its http_options.port, else 8000)",
    )
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--decode-workers", type=int, default=1, help="ready when the router sees this many")
    ap.add_argument("--rates", type=float, nargs="+", default=[8.0, 16.0, 32.0])
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--label", default="", help="names this build or variant in the JSON")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", default="results/serving-overhead")
    a = ap.parse_args(argv)
    try:
        a.port = config_port(Path(a.config), a.port)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dep = ServeProcess("overhead", Path(a.config), out, a.models, a.decode_workers, a.port)
    doc = {
        "command": "python -m experiments.serving_overhead "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "label": a.label,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpus": psutil.cpu_count(),
        "rows": [],
    }
    try:
        doc["ready_s"] = round(dep.start(a.start_timeout), 1)
        for rate in a.rates:
            doc["rows"].append(measure(dep, rate, a, out))
            (out / "overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        dep.stop()
    print(table(doc["rows"]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
