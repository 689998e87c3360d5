"""PNG plots from summary files: throughput-latency curves across a sweep, and per-model bars."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_latency(summaries: Sequence[dict], labels: Sequence[str], out: str | os.PathLike) -> Path:
    """TTFT p90 and TPOT p90 against output throughput (per GPU when the runs know the GPU count), one curve per
    summary, one point per run of its sweep."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    per_gpu = all("output_token_throughput_per_gpu" in r["overall"] for s in summaries for r in s["runs"])
    xkey = "output_token_throughput_per_gpu" if per_gpu else "output_token_throughput"
    for s, label in zip(summaries, labels):
        runs = [r for r in s["runs"] if r["overall"].get(xkey) is not None]
        xs = [r["overall"][xkey] for r in runs]
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
            ys = [r["overall"][metric]["p90"] for r in runs]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
    for ax, metric in zip(axes, ("TTFT p90 (ms)", "TPOT p90 (ms)")):
        ax.set_xlabel("output tokens/s per GPU" if per_gpu else "output tokens/s")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_model(summary: dict, out: str | os.PathLike, run: int = -1) -> Path:
    """Bars per model for one run of a summary: requests/s, TTFT p90, TPOT p90."""
    plt = _pyplot()
    r = summary["runs"][run]
    models = list(r["per_model"])
    panels = (
        ("request_throughput", None, "requests/s"),
        ("ttft_ms", "p90", "TTFT p90 (ms)"),
        ("tpot_ms", "p90", "TPOT p90 (ms)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, q, title) in zip(axes, panels):
        vals = [(r["per_model"][m][key] if q is None else r["per_model"][m][key][q]) or 0.0 for m in models]
        ax.bar(range(len(models)), vals)
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"per model: {r['label']}")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timeseries(report: dict, out: str | os.PathLike) -> Path:
    """A soak's curves over time (experiments/soak.py's report): requests by outcome and output tokens/s, KV
    blocks in use per decode worker, and resident memory per server process."""
    plt = _pyplot()
    samples = report["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for kind in ("complete", "refused", "disconnected", "lost"):
        ax.plot(t, [s[kind] for s in samples], label=kind)
    ax.set_ylabel("requests so far")
    twin = ax.twinx()
    twin.plot(t, [s["tok_s"] for s in samples], color="grey", alpha=0.4, label="tok/s")
    twin.set_ylabel("output tokens/s")
    ax.legend(loc="upper left")
    for ax, key, label in (
        (axes[1], "kv_used", "KV blocks in use"),
        (axes[2], "rss_mb", "resident memory (MB)"),
    ):
        names = sorted({n for s in samples for n in s[key]})
        for name in names:
            ax.plot(t, [s[key].get(name) for s in samples], label=name)
        ax.set_ylabel(label)
        if len(names) <= 12:
            ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"soak: {report['requests']} requests, {report['counts']['lost']} lost, "
        f"{report['counts']['disconnected']} disconnected by the client ({report.get('date', '')})"
    )
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
