"""Single-GPU consolidation (issue 5, section 2): M task models on one GPU, served conventionally or with SUN.

- **Conventional**: every task model is a whole fine-tuned LLM, so each has its own decode engine with its own
  copy of the weights. The M engines take turns on the GPU, round-robin: engine 1 steps its batch of b sequences,
  then engine 2, ..., then engine M. A sequence gets one token per round, so its TPOT is the round time (the sum of
  the M step times), and the GPU makes M x b tokens per round.
- **SUN**: the task models share one frozen decode module: one engine, one weight copy. The decode requests of all
  M models (each with its own model name and request id) batch together, B in all. TPOT is the step time, and the
  GPU makes B tokens per step.

Both run the real decode engine (`sunray.engine.decode_engine.DecodeEngine`: on CUDA, fused weights, Triton paged
attention and CUDA graphs) over hand-offs with random prompt KV, as `sunray.bench` does, on a model shape with
random weights. Nothing goes through HTTP or Ray. Each point: `warmup` steps (admission, graph capture), then
`steps` timed steps. TPOT is measured per sequence (first to last token time in the timed window, over the tokens
between) and averaged over sequences; throughput is the tokens of the window over its wall time.

Memory is real: every conventional copy is allocated, and each engine's KV pool is sized to its batch. Where M
copies plus their KV do not fit (decided from the free memory measured at the start, and checked again against
the device's free memory before each allocation), the point is recorded with `"fits": false`, the arithmetic, and a
clearly labelled projection from the measured single-engine step time (round = M x step(b)): the SUN engine at
batch b is exactly one conventional engine at per-model batch b.

    python -m experiments.consolidation_gpu --shape llama-3.1-8b --models 2 4 8 --out $OUT
    # -> $OUT/serving-gpu.json and $OUT/serving-gpu.md (about 3-5 minutes on an H100)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sunray.bench import free_device_memory, sync_device
from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.handoff import KVHandoff
from sunray.engine.sequence import SamplingParams
from sunray.models.config import ModelConfig
from sunray.models.loader import LoadedModel

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_SLOS_MS = (20.0, 30.0, 50.0, 100.0)
GiB = 1 << 30
PROJECTED = "projected (does not fit)"
MEASURED = "measured"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Setup:
    context: int  # tokens each sequence attends over at its first decode step (prompt KV + the first token)
    warmup: int
    steps: int
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.context < 2 or self.steps < 2 or self.warmup < 1:
            raise ValueError("need context >= 2, steps >= 2 (TPOT needs two tokens) and warmup >= 1")

    @property
    def tokens_per_seq(self) -> int:
        """The most tokens a sequence holds during a point (its output never finishes inside the window)."""
        return self.context + self.warmup + self.steps + 8

    def blocks_per_seq(self) -> int:
        return -(-self.tokens_per_seq // self.block_size)

    def kv_bytes(self, config: ModelConfig, dtype: torch.dtype, batch: int) -> int:
        """The KV pool of one engine that runs `batch` sequences for a whole point."""
        return batch * self.blocks_per_seq() * self.block_size * config.kv_bytes_per_token(dtype)


class MemoryBudget:
    """What may still be allocated: the device's free memory (CUDA, after emptying the cache), or, with a fake
    budget (tests, what-if runs), the budget less the model copies this experiment built. None: unknown (a CPU
    without a budget), and everything fits."""

    def __init__(self, device: torch.device, budget_bytes: int | None = None) -> None:
        self.device, self.budget, self.tracked = device, budget_bytes, 0

    @property
    def source(self) -> str:
        if self.budget is not None:
            return f"fake budget of {self.budget} bytes ({_size(self.budget)})"
        if self.device.type == "cuda":
            return "torch.cuda.mem_get_info free memory (after emptying the caching allocator)"
        return "unlimited (CPU without a budget)"

    def free(self) -> int | None:
        if self.budget is not None:
            return self.budget - self.tracked
        if self.device.type == "cuda":
            free_device_memory(self.device)
            return torch.cuda.mem_get_info(self.device)[0]
        return None

    def took(self, nbytes: int) -> None:
        self.tracked += nbytes


def _size(n: int | float) -> str:
    """Bytes as GiB, or MiB below one GiB (tiny test models)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.2f} MiB"


def model_bytes(lm: LoadedModel) -> int:
    """Bytes of one model copy on the device: parameters (each storage once) and buffers (RoPE tables)."""
    seen, total = set(), 0
    for t in [*lm.model.parameters(), *lm.model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _build_copy(shape, device: torch.device, dtype: torch.dtype | None, seed: int) -> LoadedModel:
    from sunray.models.presets import dummy_model

    lm = dummy_model(shape, device=str(device), dtype=dtype, seed=seed)
    if device.type == "cuda":
        lm.model.fuse_weights()  # what the engine's ModelRunner does first; done here so the free memory is final
        sync_device(device)
        free_device_memory(device)
    return lm


def _handoffs(
    lm: LoadedModel, kv: torch.Tensor, ids: Sequence[tuple[str, str]], setup: Setup
) -> list[KVHandoff]:
    """One hand-off per (model, request id): `context - 1` prompt tokens (random ids, the shared random KV) and the
    first token, so the first decode step attends over `context` tokens."""
    n = setup.context - 1
    gen = torch.Generator().manual_seed(len(ids))
    prompts = torch.randint(0, lm.config.vocab_size, (len(ids), n), generator=gen).tolist()
    sampling = SamplingParams(max_tokens=setup.warmup + setup.steps + 4, temperature=0.0, ignore_eos=True)
    return [
        KVHandoff(rid, model, lm.fingerprint, p, [p[-1]], sampling, kv)
        for (model, rid), p in zip(ids, prompts)
    ]


def _engine(lm: LoadedModel, batch: int, setup: Setup) -> DecodeEngine:
    blocks = batch * setup.blocks_per_seq()
    config = EngineConfig(
        block_size=setup.block_size,
        num_kv_blocks=blocks,
        kv_cache_bytes=setup.kv_bytes(lm.config, lm.dtype, batch),
        max_num_seqs=batch,
        max_model_len=setup.tokens_per_seq,
    )
    return DecodeEngine(lm, config)


def _round_robin(engines: list[DecodeEngine], setup: Setup, device: torch.device) -> dict:
    """Warm-up rounds, then `setup.steps` timed rounds; a round steps every engine once, in order. One engine: a
    round is one step (SUN)."""
    for _ in range(setup.warmup):
        for e in engines:
            e.step()
    sync_device(device)
    stamps: dict[str, list[float]] = {}
    model_of: dict[str, str] = {}
    step_s: list[list[float]] = [[] for _ in engines]
    round_s: list[float] = []
    tokens = 0
    for _ in range(setup.steps):
        t_round = time.perf_counter()
        for j, e in enumerate(engines):
            t0 = time.perf_counter()
            outs = e.step()
            sync_device(device)
            t1 = time.perf_counter()
            step_s[j].append(t1 - t0)
            for o in outs:
                if o.finished:
                    raise RuntimeError(
                        f"request {o.request_id} finished inside the timed window ({o.finish_reason})"
                    )
                if o.new_token_ids:
                    stamps.setdefault(o.request_id, []).append(t1)
                    model_of[o.request_id] = o.model
                    tokens += len(o.new_token_ids)
        round_s.append(time.perf_counter() - t_round)
    expected = sum(len(e.running) for e in engines)
    preemptions = sum(e.num_preemptions for e in engines)
    if len(stamps) != expected or preemptions:
        raise RuntimeError(
            f"{len(stamps)} of {expected} sequences produced tokens; {preemptions} preemptions"
        )
    tpot = {rid: (t[-1] - t[0]) / (len(t) - 1) for rid, t in stamps.items() if len(t) > 1}
    by_model: dict[str, list[float]] = {}
    for rid, v in tpot.items():
        by_model.setdefault(model_of[rid], []).append(v)
    values = sorted(tpot.values())
    time_s = sum(round_s)
    return {
        "tokens": tokens,
        "time_s": time_s,
        "tok_per_s": tokens / time_s,
        "tpot_ms_mean": statistics.fmean(values) * 1e3,
        "tpot_ms_p90": _quantile(values, 0.9) * 1e3,
        "tpot_ms_max": values[-1] * 1e3,
        "tpot_ms_by_model": {m: statistics.fmean(v) * 1e3 for m, v in sorted(by_model.items())},
        "step_ms": [[s * 1e3 for s in row] for row in step_s],
        "round_ms": [s * 1e3 for s in round_s],
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def measure_sun(lm: LoadedModel, num_models: int, batch: int, setup: Setup, kv: torch.Tensor) -> dict:
    """One shared engine; `batch` sequences spread round-robin over `num_models` task models."""
    ids = [(f"task-{i % num_models}", f"task-{i % num_models}/req-{i}") for i in range(batch)]
    engines = []
    try:
        engines.append(_engine(lm, batch, setup))
        for h in _handoffs(lm, kv, ids, setup):
            engines[0].add(h)
        r = _round_robin(engines, setup, lm.device)
    finally:
        engines.clear()
        free_device_memory(lm.device)
    steps = r["step_ms"][0]
    return {
        "batch": batch,
        "per_model_batch": round(batch / num_models, 3),
        "step_ms_mean": _r(statistics.fmean(steps)),
        "step_ms_median": _r(statistics.median(steps)),
        "tpot_ms_mean": _r(r["tpot_ms_mean"]),
        "tpot_ms_p90": _r(r["tpot_ms_p90"]),
        "tpot_ms_max": _r(r["tpot_ms_max"]),
        "tpot_ms_by_model": {m: _r(v) for m, v in r["tpot_ms_by_model"].items()},
        "tokens": r["tokens"],
        "time_s": _r(r["time_s"], 6),
        "tok_per_s": _r(r["tok_per_s"], 1),
        "kv_bytes": setup.kv_bytes(lm.config, lm.dtype, batch),
        "step_ms": [_r(s) for s in steps],
    }


def measure_conventional(lms: list[LoadedModel], batch: int, setup: Setup, kv: torch.Tensor) -> dict:
    """M engines, one per model copy, each with `batch` sequences of its own model, stepped round-robin."""
    engines = []
    try:
        for j, lm in enumerate(lms):
            engines.append(_engine(lm, batch, setup))
            for h in _handoffs(lm, kv, [(f"task-{j}", f"task-{j}/req-{i}") for i in range(batch)], setup):
                engines[-1].add(h)
        r = _round_robin(engines, setup, lms[0].device)
    finally:
        engines.clear()
        free_device_memory(lms[0].device)
    by_engine = [statistics.fmean(row) for row in r["step_ms"]]
    rounds = r["round_ms"]
    return {
        "step_ms_mean": _r(statistics.fmean(by_engine)),
        "step_ms_mean_by_engine": [_r(s) for s in by_engine],
        "round_ms_mean": _r(statistics.fmean(rounds)),
        "round_ms_median": _r(statistics.median(rounds)),
        "tpot_ms_mean": _r(r["tpot_ms_mean"]),
        "tpot_ms_p90": _r(r["tpot_ms_p90"]),
        "tpot_ms_max": _r(r["tpot_ms_max"]),
        "tokens": r["tokens"],
        "time_s": _r(r["time_s"], 6),
        "tok_per_s": _r(r["tok_per_s"], 1),
        "round_ms": [_r(s) for s in rounds],
        "step_ms": [[_r(s) for s in row] for row in r["step_ms"]],
    }


def project_conventional(num_models: int, batch: int, single_step_ms: float) -> dict:
    """Round = M x the single-engine step at batch b; throughput = M x b per round = the single engine's."""
    round_ms = num_models * single_step_ms
    return {
        "round_ms": _r(round_ms),
        "tpot_ms": _r(round_ms),
        "tok_per_s": _r(num_models * batch / round_ms * 1e3, 1),
        "single_step_ms": _r(single_step_ms),
        "basis": f"{num_models} x the mean step of one engine at batch {batch} (the SUN sweep's point at B = {batch})",
    }


def _memory(
    num_copies: int,
    copy_bytes: int,
    kv_bytes: int,
    engine_reserve: int,
    global_reserve: int,
    available: int | None,
) -> dict:
    need = num_copies * (copy_bytes + kv_bytes + engine_reserve) + global_reserve
    fits = available is None or need <= available
    return {
        "copies": num_copies,
        "weights_bytes": num_copies * copy_bytes,
        "kv_bytes": num_copies * kv_bytes,
        "reserve_bytes": num_copies * engine_reserve + global_reserve,
        "need_bytes": need,
        "available_bytes": available,
        "fits": fits,
        "arithmetic": (
            f"{num_copies} x ({_size(copy_bytes)} weights + {_size(kv_bytes)} KV + "
            f"{_size(engine_reserve)} reserve) + {_size(global_reserve)} = "
            f"{_size(need)} "
            + (
                "(no budget)"
                if available is None
                else f"{'<=' if fits else '>'} {_size(available)} available"
            )
        ),
    }


def _effective(p: dict) -> tuple[float, float, str] | None:
    """(TPOT ms, tok/s, status) of a conventional point: measured where it fits, else its projection."""
    if p["fits"] and p.get("tpot_ms_mean") is not None:
        return p["tpot_ms_mean"], p["tok_per_s"], MEASURED
    proj = p.get("projected")
    if proj is None:
        return None
    return proj["tpot_ms"], proj["tok_per_s"], PROJECTED


def slo_table(result: dict, slos_ms: Sequence[float]) -> list[dict]:
    """For each M and TPOT SLO: each system's best decode throughput whose mean per-sequence TPOT <= SLO."""
    rows = []
    for entry in result["models"]:
        m = entry["num_models"]
        for slo in slos_ms:
            sun = [p for p in entry["sun"] if p.get("tpot_ms_mean") is not None and p["tpot_ms_mean"] <= slo]
            best_sun = max(sun, key=lambda p: p["tok_per_s"], default=None)
            meas, anyp = None, None
            for p in entry["conventional"]:
                eff = _effective(p)
                if eff is None or eff[0] > slo:
                    continue
                cand = {
                    "per_model_batch": p["per_model_batch"],
                    "tpot_ms": eff[0],
                    "tok_per_s": eff[1],
                    "status": eff[2],
                }
                if eff[2] == MEASURED and (meas is None or cand["tok_per_s"] > meas["tok_per_s"]):
                    meas = cand
                if anyp is None or cand["tok_per_s"] > anyp["tok_per_s"]:
                    anyp = cand
            sun_row = (
                None
                if best_sun is None
                else {
                    "batch": best_sun["batch"],
                    "tpot_ms": best_sun["tpot_ms_mean"],
                    "tok_per_s": best_sun["tok_per_s"],
                }
            )

            def ratio(conv, sun_row=sun_row):
                return (
                    None
                    if sun_row is None or conv is None
                    else round(sun_row["tok_per_s"] / conv["tok_per_s"], 2)
                )

            rows.append(
                {
                    "num_models": m,
                    "tpot_slo_ms": slo,
                    "sun": sun_row,
                    "conventional_measured": meas,
                    "conventional_with_projection": anyp,
                    "ratio_measured": ratio(meas),
                    "ratio_with_projection": ratio(anyp),
                }
            )
    return rows


def run_consolidation(
    shape: str | ModelConfig = "llama-3.1-8b",
    *,
    models: Sequence[int] = (2, 4, 8),
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    conventional_batch_sizes: Sequence[int] | None = None,
    context: int = 1024,
    steps: int = 20,
    warmup: int = 3,
    device: str | None = None,
    dtype: str = "auto",
    slos_ms: Sequence[float] = DEFAULT_SLOS_MS,
    memory_budget_bytes: int | None = None,
    engine_reserve_bytes: int | None = None,
    global_reserve_bytes: int | None = None,
    command: str = "",
    log: Log = _stderr,
) -> dict:
    """The whole experiment; returns the JSON-able result (see `to_markdown`).

    conventional_batch_sizes: per-model batches b of the conventional engines (default: batch_sizes).
    memory_budget_bytes: pretend the device has this much free memory at the start (default: measure it).
    engine_reserve_bytes / global_reserve_bytes: memory counted per engine (CUDA graph pool, activations, input
    buffers) and once (the shared random KV, workspace) when deciding what fits; default 0.5 / 1 GiB on CUDA, 0
    elsewhere."""
    t_start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    dt = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    setup = Setup(context, warmup, steps)
    models = sorted(set(models))
    batch_sizes = sorted(set(batch_sizes))
    conv_batches = sorted(set(conventional_batch_sizes or batch_sizes))
    engine_reserve = engine_reserve_bytes if engine_reserve_bytes is not None else (GiB // 2 if on_gpu else 0)
    global_reserve = global_reserve_bytes if global_reserve_bytes is not None else (GiB if on_gpu else 0)

    def say(msg: str) -> None:
        log(f"[{time.perf_counter() - t_start:6.1f} s] {msg}")

    memory = MemoryBudget(dev, memory_budget_bytes)
    if on_gpu:
        torch.cuda.init()
    free0 = memory.free()
    total = torch.cuda.mem_get_info(dev)[1] if on_gpu else None
    say(f"device {dev}: {memory.source}; free at start {'-' if free0 is None else f'{_size(free0)}'}")
    copies: list[LoadedModel] = []

    def build(seed: int) -> LoadedModel | str:
        """The next model copy, or why it was not built (the live free-memory check)."""
        free = memory.free()
        if copies and free is not None and free < copy_bytes + engine_reserve:
            return (
                f"live check before copy {seed + 1}: free {_size(free)} < "
                f"{_size(copy_bytes + engine_reserve)} (one copy + reserve)"
            )
        t = time.perf_counter()
        lm = _build_copy(shape, dev, dt, seed)
        memory.took(model_bytes(lm))
        say(f"built model copy {seed + 1} in {time.perf_counter() - t:.1f} s")
        return lm

    first = build(0)
    assert not isinstance(first, str)
    copies.append(first)
    copy_bytes = model_bytes(first)
    cfg, mdtype = first.config, first.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    kv = torch.randn(
        (cfg.num_layers, 2, context - 1, cfg.num_kv_heads, cfg.head_dim), generator=gen, device=dev
    )
    kv = kv.to(mdtype)
    say(
        f"shape {shape if isinstance(shape, str) else 'custom'} {mdtype}: {_size(copy_bytes)} per copy, "
        f"KV {cfg.kv_bytes_per_token(mdtype)} bytes/token, {setup.tokens_per_seq} tokens/sequence at most"
    )

    entries = []
    for m in models:
        sun = []
        for b in batch_sizes:
            mem = _memory(
                1, copy_bytes, setup.kv_bytes(cfg, mdtype, b), engine_reserve, global_reserve, free0
            )
            if not mem["fits"]:
                sun.append({"batch": b, "per_model_batch": round(b / m, 3), "fits": False, "memory": mem})
                say(f"M={m} SUN B={b}: does not fit ({mem['arithmetic']})")
                continue
            p = measure_sun(first, m, b, setup, kv)
            p.update(fits=True, memory=mem)
            sun.append(p)
            say(
                f"M={m} SUN B={b:>3}: step {p['step_ms_mean']:8.3f} ms, TPOT {p['tpot_ms_mean']:8.3f} ms, "
                f"{p['tok_per_s']:9.1f} tok/s"
            )
        entries.append({"num_models": m, "sun": sun, "conventional": []})

    for entry in entries:
        m = entry["num_models"]
        single = {p["batch"]: p["step_ms_mean"] for p in entry["sun"] if p.get("step_ms_mean") is not None}
        weights_need = _memory(m, copy_bytes, 0, engine_reserve, global_reserve, free0)
        entry["weights_fit"] = weights_need["fits"]
        entry["weights_memory"] = weights_need
        live_failure = None
        if weights_need["fits"]:
            while len(copies) < m:
                lm = build(len(copies))
                if isinstance(lm, str):
                    live_failure = lm
                    say(f"M={m}: {lm}")
                    break
                copies.append(lm)
        else:
            say(f"M={m}: {m} weight copies do not fit ({weights_need['arithmetic']})")
        entry["copies_built"] = min(len(copies), m)
        for b in conv_batches:
            mem = _memory(
                m, copy_bytes, setup.kv_bytes(cfg, mdtype, b), engine_reserve, global_reserve, free0
            )
            p = {
                "per_model_batch": b,
                "batch": m * b,
                "fits": mem["fits"] and live_failure is None,
                "memory": mem,
            }
            if live_failure is not None:
                p["why"] = live_failure
            elif mem["fits"]:
                free = memory.free()
                need_now = m * (setup.kv_bytes(cfg, mdtype, b) + engine_reserve)
                if free is not None and free < need_now:
                    p["fits"] = False
                    p["why"] = f"live check: free {_size(free)} < {_size(need_now)} for {m} engines' KV"
                else:
                    try:
                        p.update(measure_conventional(copies[:m], b, setup, kv))
                    except torch.cuda.OutOfMemoryError as e:
                        p["fits"] = False
                        p["why"] = f"CUDA out of memory: {str(e).splitlines()[0][:200]}"
                    if not p["fits"]:
                        free_device_memory(dev)  # outside the except clause: its traceback held the engines
            if b in single:
                p["projected"] = project_conventional(m, b, single[b])
                if p["fits"]:
                    p["projected"]["measured_over_projected"] = _r(
                        p["round_ms_mean"] / p["projected"]["round_ms"]
                    )
            p["status"] = MEASURED if p["fits"] else (PROJECTED if "projected" in p else "does not fit")
            entry["conventional"].append(p)
            if p["fits"]:
                say(
                    f"M={m} conventional b={b:>3}: round {p['round_ms_mean']:8.3f} ms (steps "
                    f"{', '.join(f'{s:.2f}' for s in p['step_ms_mean_by_engine'])}), TPOT {p['tpot_ms_mean']:8.3f} ms, "
                    f"{p['tok_per_s']:9.1f} tok/s"
                )
            else:
                proj = p.get("projected")
                say(
                    f"M={m} conventional b={b:>3}: does not fit ({p.get('why') or mem['arithmetic']})"
                    + (
                        f"; projected round {proj['round_ms']:.3f} ms, {proj['tok_per_s']:.1f} tok/s"
                        if proj
                        else ""
                    )
                )

    copies.clear()
    del first, kv
    free_device_memory(dev)
    result = {
        "experiment": "single-GPU consolidation: conventional (one engine and weight copy per model, round-robin) "
        "vs SUN (one shared engine and weight copy)",
        "command": command,
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(dev) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "device_memory_bytes": total,
        "torch": torch.__version__,
        "shape": shape if isinstance(shape, str) else "custom",
        "model_config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))},
        "dtype": str(mdtype).removeprefix("torch."),
        "context": context,
        "warmup": warmup,
        "steps": steps,
        "block_size": setup.block_size,
        "tokens_per_sequence_max": setup.tokens_per_seq,
        "memory": {
            "source": memory.source,
            "free_at_start_bytes": free0,
            "copy_bytes": copy_bytes,
            "engine_reserve_bytes": engine_reserve,
            "global_reserve_bytes": global_reserve,
            "kv_bytes_per_token": cfg.kv_bytes_per_token(mdtype),
        },
        "models": entries,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result["slo"] = slo_table(result, slos_ms)
    say("done")
    return result


# -- the report --------------------------------------------------------------------------------------------------
def _f(v, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def to_markdown(result: dict) -> str:
    r = result
    mem = r["memory"]
    free0 = mem["free_at_start_bytes"]
    free0_text = "-" if free0 is None else f"{_size(free0)}"
    out = [
        "# Single-GPU consolidation: M task models, conventional vs SUN (issue 5)",
        "",
        f"**Device**: {r['device']}"
        + (f" ({r['device_memory_bytes'] / GiB:.1f} GiB)" if r.get("device_memory_bytes") else "")
        + f", torch {r['torch']}. **Date**: {r['date']}. **Shape**: {r['shape']} ({r['dtype']}, random weights), "
        f"{_size(mem['copy_bytes'])} per weight copy. **Context**: {r['context']} tokens at each sequence's "
        f"first decode step (random prompt KV), growing by one token a step; {r['warmup']} warm-up and "
        f"{r['steps']} timed steps (conventional: rounds) per point. Wall time of the run: {r['wall_s']} s.",
        "",
        "    " + (r["command"] or "python -m experiments.consolidation_gpu ..."),
        "",
        "(part (a) of `OUT=/some/dir bash experiments/run_gpu.sh`, run from the repository root with "
        "`PYTHONPATH=.`; no Ray, no HTTP: the decode engine in one process).",
        "",
        "- **Conventional**: M decode engines, each with its own weight copy (all allocated) and a KV pool sized to "
        "its batch b, stepped round-robin (engine 1, 2, ..., M). TPOT = round time; throughput = M x b per round.",
        "- **SUN**: one decode engine and one weight copy; the B sequences of all M models (model ids `task-0` ... "
        "`task-{M-1}`, spread round-robin) in one batch. TPOT = step time; throughput = B per step.",
        "- TPOT is each sequence's mean time between successive tokens in the timed window, averaged over sequences;"
        " throughput is the window's tokens over its wall time (decode only: no prefill, no HTTP).",
        f"- Memory: a point fits when M x (weights + KV + {_size(mem['engine_reserve_bytes'])} per engine) + "
        f"{_size(mem['global_reserve_bytes'])} <= the free memory at the start "
        f"({free0_text}, {mem['source']}); the device's free memory is checked again before each copy and each set of engines.",
        f'- **Projections**: conventional points that do not fit are not run; they are marked "{PROJECTED}". Their '
        "round time is projected as M x the "
        "measured step time of one engine at batch b (the SUN sweep's point at B = b: the same engine, one copy). "
        "Such a configuration cannot run on this GPU at all, so a projection is an optimistic bound for the "
        "conventional system.",
        "",
        "## Best decode throughput at equal TPOT",
        "",
        "For each TPOT SLO, each system's highest measured throughput whose mean TPOT meets it. `-`: no point meets it.",
        "",
        "| M | TPOT SLO ms | SUN tok/s (B, TPOT ms) | conventional, measured: tok/s (b, TPOT ms) | SUN / conv. | "
        "conventional incl. projected: tok/s (b, TPOT ms) | SUN / conv. incl. projected |",
        "|---:|---:|---|---|---:|---|---:|",
    ]
    for row in r["slo"]:
        s, c, a = row["sun"], row["conventional_measured"], row["conventional_with_projection"]
        sun_cell = "-" if s is None else f"{_f(s['tok_per_s'], 0)} ({s['batch']}, {_f(s['tpot_ms'])})"
        c_cell = "-" if c is None else f"{_f(c['tok_per_s'], 0)} ({c['per_model_batch']}, {_f(c['tpot_ms'])})"
        a_cell = (
            "-"
            if a is None
            else (
                f"{_f(a['tok_per_s'], 0)} ({a['per_model_batch']}, {_f(a['tpot_ms'])})"
                + (f" **{PROJECTED}**" if a["status"] == PROJECTED else "")
            )
        )
        out.append(
            f"| {row['num_models']} | {_f(row['tpot_slo_ms'], 0)} | {sun_cell} | {c_cell} | "
            f"{_f(row['ratio_measured'])} | {a_cell} | {_f(row['ratio_with_projection'])} |"
        )
    for entry in r["models"]:
        m = entry["num_models"]
        out += [
            "",
            f"## M = {m}",
            "",
            f"Weights of {m} copies: {entry['weights_memory']['arithmetic']}"
            f" ({'fit' if entry['weights_fit'] else 'do NOT fit'}; {entry['copies_built']} copies built for this M).",
            "",
            "SUN (one engine, one weight copy):",
            "",
            "| B | per model | step ms | TPOT ms (mean / p90) | tok/s | KV pool |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for p in entry["sun"]:
            if not p.get("fits", True) or p.get("tpot_ms_mean") is None:
                out.append(
                    f"| {p['batch']} | {p['per_model_batch']} | does not fit: {p['memory']['arithmetic']} | | | |"
                )
                continue
            out.append(
                f"| {p['batch']} | {p['per_model_batch']} | {_f(p['step_ms_mean'])} | "
                f"{_f(p['tpot_ms_mean'])} / {_f(p['tpot_ms_p90'])} | {_f(p['tok_per_s'], 0)} | "
                f"{_size(p['kv_bytes'])} |"
            )
        out += [
            "",
            f"Conventional ({m} engines and weight copies, round-robin):",
            "",
            "| b per model | total | status | step ms per engine | round = TPOT ms | tok/s | projected round ms | "
            "measured / projected | memory |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for p in entry["conventional"]:
            proj = p.get("projected") or {}
            if p["fits"]:
                out.append(
                    f"| {p['per_model_batch']} | {p['batch']} | {MEASURED} | {_f(p['step_ms_mean'])} | "
                    f"{_f(p['round_ms_mean'])} | {_f(p['tok_per_s'], 0)} | {_f(proj.get('round_ms'))} | "
                    f"{_f(proj.get('measured_over_projected'))} | {p['memory']['arithmetic']} |"
                )
            else:
                why = p.get("why") or p["memory"]["arithmetic"]
                out.append(
                    f"| {p['per_model_batch']} | {p['batch']} | **{p['status']}** | "
                    f"({_f(proj.get('single_step_ms'))}) | ({_f(proj.get('round_ms'))}) | "
                    f"({_f(proj.get('tok_per_s'), 0)}) | {_f(proj.get('round_ms'))} | - | {why} |"
                )
    out += [
        "",
        "## Notes",
        "",
        "- Values in parentheses are projections, not measurements. The measured / projected column checks the "
        "projection where the conventional configuration does fit.",
        "- At a given per-model batch b, conventional throughput equals one engine's (M x b tokens per M steps), "
        "while its TPOT is M times the step. SUN reaches the same TPOT with a batch of about M x b in one step, "
        "which costs far less than M steps, because a decode step reads the weights once whatever the batch.",
        "- SUN's steps do not depend on which task model a sequence belongs to; the SUN sweep is run for each M "
        "anyway (models assigned round-robin), so the M tables also show run-to-run variation.",
        "- Round-robin time-slicing at step granularity is the best case for conventional serving on one GPU: "
        "all weights resident, no switching cost. Not modelled: prefill, request arrivals and queueing, "
        "concurrent engines on separate CUDA streams or MPS (decode is memory-bound, so overlapping engines "
        "would share the same HBM bandwidth).",
        "- Weights are random (dummy) with the real shape; decode time does not depend on their values. The raw "
        "step and round times of every point are in the JSON.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.consolidation_gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shape", default="llama-3.1-8b", help="sunray.models.presets shape (default llama-3.1-8b)"
    )
    ap.add_argument("--models", type=int, nargs="+", default=[2, 4, 8], help="numbers of task models M")
    ap.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BATCHES),
        help="SUN total batches B (default 1 2 4 ... 256)",
    )
    ap.add_argument(
        "--conventional-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="conventional per-model batches b (default: --batch-sizes)",
    )
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (rounds) per point")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda, cuda:N, cpu (default cuda when available)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    ap.add_argument("--slo-ms", type=float, nargs="+", default=list(DEFAULT_SLOS_MS), help="TPOT SLOs")
    ap.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="pretend this much memory is free at the start (default: measure it)",
    )
    ap.add_argument("--engine-reserve-gib", type=float, default=None, help="per engine (default 0.5 on CUDA)")
    ap.add_argument("--global-reserve-gib", type=float, default=None, help="once (default 1 on CUDA)")
    ap.add_argument("--out", required=True, help="directory for serving-gpu.json and serving-gpu.md")
    args = ap.parse_args(argv)
    if any(v < 1 for v in [*args.models, *args.batch_sizes, *(args.conventional_batch_sizes or [])]):
        ap.error("--models and batch sizes must be >= 1")

    def gib(v: float | None) -> int | None:
        return None if v is None else int(v * GiB)

    command = shlex.join(
        ["python", "-m", "experiments.consolidation_gpu", *(sys.argv[1:] if argv is None else argv)]
    )
    result = run_consolidation(
        args.shape,
        models=args.models,
        batch_sizes=args.batch_sizes,
        conventional_batch_sizes=args.conventional_batch_sizes,
        context=args.context,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        slos_ms=args.slo_ms,
        memory_budget_bytes=gib(args.memory_budget_gib),
        engine_reserve_bytes=gib(args.engine_reserve_gib),
        global_reserve_bytes=gib(args.global_reserve_gib),
        command=command,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving-gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "serving-gpu.md").write_text(to_markdown(result))
    print(f"wrote {out / 'serving-gpu.json'} and {out / 'serving-gpu.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
