"""Measure a step-time profile for the cluster simulator (`loadgen sim`) from the real engine (`sunray.bench`).
A driver: it runs the engine in this process; loadgen itself only reads the profile it writes.

    python -m experiments.measure_profile --shape smollm2-135m --out loadgen/sim/profiles/cpu-smollm2-135m.json
    python -m experiments.measure_profile --shape llama-3.1-8b --device cuda \\
        --batch-sizes 1 8 16 32 64 128 256 --context 256 512 1024 2048 --prompt-len 128 256 512 1024 2048 \\
        --steps 16 --out loadgen/sim/profiles/h100-llama-3.1-8b-measured.json      # on the GPU machine, ~2 min

Grid points whose KV does not fit next to the weights (batch 256 x context 2048 of the 8B shape on an 80 GB card)
are not measured: they are extrapolated linearly along the context axis from the two largest measured contexts of
the same batch (decode is memory-bound, linear in the KV read), and the profile's notes list them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import sys
import time
import types
from collections.abc import Callable, Sequence

import torch

import sunray.bench as bench
from loadgen.sim.profile import Profile
from sunray.bench import bench_decode, bench_prefill, free_device_memory
from sunray.engine.config import EngineConfig
from sunray.engine.model_runner import kv_cache_bytes_for_free_memory
from sunray.models.presets import dummy_model

# Grids: the CPU one is what the shipped cpu-smollm2-135m profile used; the CUDA one covers what the simulator asks
# of an H100 decode GPU (batches to 256, contexts to 2k, prompts to 2k) in about two minutes.
CPU_GRID = {"batch_sizes": (1, 4, 16, 32), "contexts": (128, 512), "prompt_lens": (32, 128, 512), "steps": 8}
CUDA_GRID = {
    "batch_sizes": (1, 8, 16, 32, 64, 128, 256),
    "contexts": (256, 512, 1024, 2048),
    "prompt_lens": (128, 256, 512, 1024, 2048),
    "steps": 16,
}


def fill_missing(contexts: Sequence[float], row: list[float | None]) -> tuple[list[float], list[int]]:
    """Fill the unmeasured (None) entries of one batch size's row of decode ms over `contexts`, linearly through
    the two nearest measured contexts (decode is linear in the KV it reads), never below a measured neighbour.
    Returns the row and the indices filled. Needs two measured points in the row unless nothing is missing."""
    known = [i for i, v in enumerate(row) if v is not None]
    missing = [i for i, v in enumerate(row) if v is None]
    if not missing:
        return [float(v) for v in row], []
    if len(known) < 2:
        raise ValueError(f"cannot extrapolate a row with {len(known)} measured contexts: {row}")
    out = list(row)
    for i in missing:
        a, b = sorted(known, key=lambda k: (abs(k - i), k))[:2]
        a, b = sorted((a, b))
        slope = (row[b] - row[a]) / (contexts[b] - contexts[a])
        value = row[a] + slope * (contexts[i] - contexts[a])
        below = [row[k] for k in known if k < i]
        out[i] = round(max(value, max(below) if below else 0.0, 1e-6), 3)
    return [float(v) for v in out], missing


def measure_profile(
    shape="smollm2-135m",
    *,
    device: str | None = None,
    dtype: str = "auto",
    batch_sizes: Sequence[int] | None = None,
    contexts: Sequence[int] | None = None,
    prompt_lens: Sequence[int] | None = None,
    steps: int | None = None,
    kv_cache_bytes: int | None = None,
    clock: str = "wall",
    name: str | None = None,
    command: str = "",
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Profile:
    """Time `DecodeEngine.step()` over a batch x context grid and `PrefillEngine.prefill` over prompt lengths, on
    a model of `shape` (a sunray.models.presets name, or a ModelConfig) with dummy weights, and return the profile.

    The grid and `steps` default to CUDA_GRID on a GPU and CPU_GRID elsewhere. A decode point whose KV does not fit
    in free GPU memory is extrapolated (`fill_missing`) and named in the notes.
    kv_cache_bytes: the decode worker's KV pool (default: EngineConfig's default on CPU; on CUDA, what
    `kv_cache_bytes_for_free_memory` gives after the weights: free memory less 10% of the card and 1 GiB), which
    sets the profile's kv_capacity_tokens.
    clock: "wall" (sunray.bench as is: wall time, CUDA synchronized) or "cpu" (CPU only: one torch thread, timed by
    the process's CPU time, so that other tenants of a shared host do not inflate the profile; on a dedicated
    core the two agree).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    torch.manual_seed(0)
    dt = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = CUDA_GRID if torch.device(device).type == "cuda" else CPU_GRID
    batch_sizes = list(batch_sizes or grid["batch_sizes"])
    contexts = list(contexts or grid["contexts"])
    prompt_lens = list(prompt_lens or grid["prompt_lens"])
    steps = steps or grid["steps"]
    t_build = time.perf_counter()
    lm = dummy_model(shape, device=device, dtype=dt)
    dev = lm.device
    shape_name = shape if isinstance(shape, str) else "custom"
    if clock == "cpu":
        if dev.type != "cpu":
            raise ValueError("clock 'cpu' is for CPU profiles; time GPUs by the wall clock")
        torch.set_num_threads(1)
    if dev.type == "cuda":
        dev_name = torch.cuda.get_device_name(dev)
        torch.cuda.synchronize(dev)
    else:
        dev_name = f"cpu ({torch.get_num_threads()} threads)"
    log(f"# built {shape_name} ({dt or 'auto'}) on {dev} in {time.perf_counter() - t_build:.1f} s")
    kv_per_token = lm.config.kv_bytes_per_token(lm.dtype)
    kv_basis = "given"
    if kv_cache_bytes is None:
        if dev.type == "cuda":
            lm.model.fuse_weights()  # what every engine's ModelRunner does first; then measure what is left
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(dev)
            kv_cache_bytes = kv_cache_bytes_for_free_memory(dev, 0.9, 1 << 30)
            kv_basis = (
                f"free memory after the weights {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB, less 10% "
                "of the card and 1 GiB (sunray.engine.model_runner.kv_cache_bytes_for_free_memory)"
            )
        else:
            kv_cache_bytes = EngineConfig().kv_cache_bytes
            kv_basis = "EngineConfig default"
    log(
        f"# measuring {shape_name} on {dev_name}, dtype {lm.dtype}: batch {batch_sizes} x context {contexts}, "
        f"prompts {prompt_lens}, {steps} steps; KV pool {kv_cache_bytes / 2**30:.1f} GiB "
        f"({kv_cache_bytes // kv_per_token} tokens)"
    )
    load_before = _loadavg()
    t0 = time.perf_counter()
    raw: list[list[float | None]] = []
    prefill_ms = []
    oom = (MemoryError, torch.cuda.OutOfMemoryError)
    with _clock(clock):
        for b in batch_sizes:
            row: list[float | None] = []
            for c in contexts:
                try:
                    r = bench_decode(lm, b, c, steps)
                except oom as e:  # the bench refuses what does not fit before allocating; OOM is the fallback
                    row.append(None)
                    log(f"decode batch {b:>4} context {c:>5}: does not fit ({str(e).splitlines()[0][:120]})")
                    _release(dev)
                    continue
                row.append(r["ms_per_step"])
                log(
                    f"decode batch {b:>4} context {c:>5}: {r['ms_per_step']:9.3f} ms/step "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
            raw.append(row)
        for n in prompt_lens:
            r = bench_prefill(lm, n, 1, max(2, steps // 2))
            prefill_ms.append(r["ms"])
            log(f"prefill {n:>5} tokens: {r['ms']:9.2f} ms")
    decode_ms, filled = [], []
    for b, row in zip(batch_sizes, raw):
        full, idx = fill_missing(contexts, row)
        decode_ms.append(full)
        filled += [f"{b}x{contexts[i]} ({full[i]:.2f} ms)" for i in idx]
    if filled:
        log(f"# extrapolated (did not fit): {', '.join(filled)}")
    log(f"# done in {time.perf_counter() - t0:.0f} s")
    load = (
        f"; host load average {load_before} before, {_loadavg()} after ({os.cpu_count()} CPUs)"
        if dev.type == "cpu"
        else ""
    )
    backend = "triton, CUDA graphs, fused weights" if dev.type == "cuda" else "torch, eager"
    extrap = (
        f"; NOT measured (KV does not fit beside the weights), extrapolated linearly along the context axis: "
        f"{', '.join(filled)}"
        if filled
        else ""
    )
    dtype_name = str(lm.dtype).removeprefix("torch.")
    return Profile(
        name=name or f"{dev.type}-{shape_name}-measured",
        source="measured",
        device=dev_name,
        date=datetime.date.today().isoformat(),
        model=shape_name,
        dtype=dtype_name,
        command=command,
        notes=(
            f"sunray.bench on dummy weights, {clock} clock; decode: median of {steps} DecodeEngine.step() calls "
            f"per point (attention backend auto: {backend}; context = tokens each sequence attends over at its "
            f"first step, growing by one a step); prefill: one prompt per pass, median of {max(2, steps // 2)}; "
            f"KV pool {kv_cache_bytes} bytes ({kv_basis}){extrap}{load}"
        ),
        kv_bytes_per_token=kv_per_token,
        kv_capacity_tokens=kv_cache_bytes // kv_per_token,
        prefill_tokens=[float(n) for n in prompt_lens],
        prefill_ms=prefill_ms,
        decode_batch=[float(b) for b in batch_sizes],
        decode_context=[float(c) for c in contexts],
        decode_ms=decode_ms,
    )


def _release(dev) -> None:
    free_device_memory(dev)


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "unknown"


@contextlib.contextmanager
def _clock(clock: str):
    """With clock 'cpu', sunray.bench's timer reads the process's CPU time instead of the wall clock."""
    if clock == "wall":
        yield
        return
    wall = bench.time
    bench.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        yield
    finally:
        bench.time = wall


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    sm = argparse.ArgumentParser(
        prog="python -m experiments.measure_profile",
        description="measure a simulator profile from the real engine (needs torch and sunray)",
    )
    sm.add_argument(
        "--shape", default="smollm2-135m", help="sunray.models.presets shape (default smollm2-135m)"
    )
    sm.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default cuda when available)")
    sm.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    sm.add_argument(
        "--batch-sizes",
        type=_positive_int,
        nargs="+",
        default=None,
        help="decode batch sizes (default: a CPU or a GPU grid, by device)",
    )
    sm.add_argument(
        "--context", type=_positive_int, nargs="+", default=None, help="decode contexts (default by device)"
    )
    sm.add_argument(
        "--prompt-len",
        type=_positive_int,
        nargs="+",
        default=None,
        help="prefill prompt lengths (default by device)",
    )
    sm.add_argument(
        "--steps", type=_positive_int, default=None, help="timed steps per point (default by device)"
    )
    sm.add_argument("--kv-cache-bytes", type=_positive_int, default=None)
    sm.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: one thread timed by CPU time (a shared CPU host); wall: as sunray bench (default)",
    )
    sm.add_argument("--out", required=True)
    return sm


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    prof = measure_profile(
        args.shape,
        device=args.device,
        dtype=args.dtype,
        batch_sizes=args.batch_sizes,
        contexts=args.context,
        prompt_lens=args.prompt_len,
        steps=args.steps,
        kv_cache_bytes=args.kv_cache_bytes,
        clock=args.clock,
        command="python -m experiments.measure_profile " + " ".join(shlex.quote(a) for a in argv),
    )
    prof.save(args.out)
    print(f"{prof.summary()} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
