"""Results on disk and on screen: JSON lines per request, a summary JSON, and a summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from loadgen.metrics import RequestRecord


def write_records(path: str | os.PathLike, records: Iterable[RequestRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


def read_records(path: str | os.PathLike) -> list[RequestRecord]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(RequestRecord.from_json(json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a request record ({e})") from None
    return out


def read_summary(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.exists():
        raise FileNotFoundError(f"no summary file {str(p)!r}")
    data = json.loads(p.read_text())
    if "runs" not in data:
        raise ValueError(f"{p}: not a loadgen summary (no 'runs')")
    return data


def _fmt(v, width: int, digits: int = 1) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{v:>{width}}"


def _lat(d: dict) -> str:
    return "/".join(
        "-" if d.get(k) is None else f"{d[k]:.0f}" if d[k] >= 100 else f"{d[k]:.1f}"
        for k in ("p50", "p90", "p99")
    )


def table(runs: Sequence[dict]) -> str:
    """One block per run: the overall row, then a row per model."""
    head = (
        f"{'run':<14} {'model':<14} {'req':>6} {'ok':>6} {'refus':>5} {'err':>5} {'canc':>5} {'req/s':>7} "
        f"{'out tok/s':>10} {'tok/s/GPU':>9} {'TTFT ms p50/90/99':>20} {'TPOT ms p50/90/99':>18} "
        f"{'E2E ms p50/90/99':>20} {'SLO %':>6}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        rows = [("all", run["overall"])] + list(run["per_model"].items())
        for name, g in rows:
            slo = g.get("slo_attainment")
            lines.append(
                f"{run['label'][:14]:<14} {name[:14]:<14} {g['requests']:>6} {g['ok']:>6} {g['refused']:>5} "
                f"{g['error']:>5} {g['cancelled']:>5} {_fmt(g['request_throughput'], 7, 2)} "
                f"{_fmt(g['output_token_throughput'], 10)} {_fmt(g.get('output_token_throughput_per_gpu'), 9)} "
                f"{_lat(g['ttft_ms']):>20} {_lat(g['tpot_ms']):>18} {_lat(g['e2e_ms']):>20} "
                f"{_fmt(None if slo is None else 100 * slo, 6)}"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
