"""Measure a step-time profile from the real engine (`sunray.bench`). Needs torch and sunray; the simulator
itself does not (this module imports them only when called).

    python -m loadgen sim measure-profile --shape smollm2-135m --out loadgen/sim/profiles/cpu-smollm2-135m.json
    python -m loadgen sim measure-profile --shape llama-3.1-8b --device cuda \\
        --out loadgen/sim/profiles/h100-llama-3.1-8b-measured.json      # on the GPU machine
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import types
from collections.abc import Callable, Sequence

from loadgen.sim.profile import Profile


def measure_profile(
    shape: str = "smollm2-135m",
    *,
    device: str | None = None,
    dtype: str = "auto",
    batch_sizes: Sequence[int] = (1, 4, 16, 32),
    contexts: Sequence[int] = (128, 512),
    prompt_lens: Sequence[int] = (32, 128, 512),
    steps: int = 8,
    kv_cache_bytes: int | None = None,
    clock: str = "wall",
    name: str | None = None,
    command: str = "",
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Profile:
    """Time `DecodeEngine.step()` over a batch x context grid and `PrefillEngine.prefill` over prompt lengths, on
    a model of `shape` with dummy weights (sunray.models.presets), and return the profile.

    kv_cache_bytes: the decode worker's KV pool (default: EngineConfig's default on CPU; on CUDA, 90% of the free
    memory after the weights), which sets the profile's kv_capacity_tokens.
    clock: "wall" (sunray.bench as is: wall time, CUDA synchronized) or "cpu" (CPU only: one torch thread, timed by
    the process's CPU time, so that other tenants of a shared host do not inflate the profile; on a dedicated
    core the two agree).
    """
    import torch

    from sunray.bench import bench_decode, bench_prefill
    from sunray.engine.config import EngineConfig
    from sunray.models.presets import dummy_model

    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    torch.manual_seed(0)
    dt = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = dummy_model(shape, device=device, dtype=dt)
    dev = lm.device
    if clock == "cpu":
        if dev.type != "cpu":
            raise ValueError("clock 'cpu' is for CPU profiles; time GPUs by the wall clock")
        torch.set_num_threads(1)
    if dev.type == "cuda":
        dev_name = torch.cuda.get_device_name(dev)
    else:
        dev_name = f"cpu ({torch.get_num_threads()} threads)"
    kv_per_token = lm.config.kv_bytes_per_token(lm.dtype)
    if kv_cache_bytes is None:
        if dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            kv_cache_bytes = int(free * 0.9)
        else:
            kv_cache_bytes = EngineConfig().kv_cache_bytes
    log(f"# measuring {shape} on {dev_name}, dtype {lm.dtype}")
    load_before = _loadavg()
    t0 = time.perf_counter()
    decode_ms: list[list[float]] = []
    prefill_ms = []
    with _clock(clock):
        for b in batch_sizes:
            row = []
            for c in contexts:
                r = bench_decode(lm, b, c, steps)
                row.append(r["ms_per_step"])
                log(f"decode batch {b:>4} context {c:>5}: {r['ms_per_step']:9.3f} ms/step")
            decode_ms.append(row)
        for n in prompt_lens:
            r = bench_prefill(lm, n, 1, max(2, steps // 2))
            prefill_ms.append(r["ms"])
            log(f"prefill {n:>5} tokens: {r['ms']:9.2f} ms")
    log(f"# done in {time.perf_counter() - t0:.0f} s")
    load = (
        f"; host load average {load_before} before, {_loadavg()} after ({os.cpu_count()} CPUs)"
        if dev.type == "cpu"
        else ""
    )
    dtype_name = str(lm.dtype).removeprefix("torch.")
    return Profile(
        name=name or f"{dev.type}-{shape}-measured", source="measured", device=dev_name,
        date=datetime.date.today().isoformat(), model=shape, dtype=dtype_name, command=command,
        notes=(f"sunray.bench on dummy weights, {clock} clock; decode: median of {steps} DecodeEngine.step() calls per point "
               f"(attention backend 'torch', EngineConfig defaults); prefill: one prompt per pass; "
               f"KV pool {kv_cache_bytes} bytes{load}"),
        kv_bytes_per_token=kv_per_token, kv_capacity_tokens=kv_cache_bytes // kv_per_token,
        prefill_tokens=[float(n) for n in prompt_lens], prefill_ms=prefill_ms,
        decode_batch=[float(b) for b in batch_sizes], decode_context=[float(c) for c in contexts],
        decode_ms=decode_ms,
    )  # fmt: skip


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
    import sunray.bench as bench

    wall = bench.time
    bench.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        yield
    finally:
        bench.time = wall
