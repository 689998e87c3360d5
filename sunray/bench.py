"""Engine benchmarks: decode ms/step and tok/s against batch size and context, prefill tok/s and TFLOP/s.

Decode is timed two ways on hand-offs with random prompt KV (so no prefill is needed and any context works):
- `ms_per_step`: `DecodeEngine.step()` (scheduling, the forward pass, sampling and output processing: what a
  request sees);
- `forward_ms`: the decode module alone, `ModelRunner.decode` + greedy sampling (host inputs, the forward pass or
  graph replay, one device-to-host copy of the tokens).
Each is the median of `steps` timed steps after `warmup` steps (which also compile kernels and capture graphs),
synchronized around each step; `back_to_back_ms` is `steps` engine steps in a row over their count, as a serving
loop runs them (with `overlap_steps` the only one of the three that shows the host work hidden). `floor_ms` is the time to read the weights (without an untied embedding table) and
the KV once at `bandwidth`, which `sunray bench decode` measures on the device first (`measure_copy_bandwidth`).

`sunray bench sampler` times `sample` alone on rows of next-token logits under the sampling parameters that
requests send (greedy, temperature, top-p, seeds, a mix).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.handoff import KVHandoff
from sunray.engine.model_runner import ModelRunner, kv_cache_bytes_for_free_memory
from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest
from sunray.engine.sampler import sample
from sunray.engine.sequence import SamplingParams, Sequence
from sunray.models.config import ModelConfig
from sunray.models.loader import LoadedModel
from sunray.models.quant.linear import QuantLinear, weight_bytes_read

DEFAULT_BANDWIDTH = 3.0e12  # bytes/s: H100 device-to-device copy measured on the lent machine (3.02 TB/s)
DEFAULT_PEAK_FLOPS = 790e12  # bf16 dense matmul, H100/H200, measured there


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_weight_bytes(lm: LoadedModel) -> int:
    """Bytes of weights one decode step must read: every parameter except an untied embedding table (a step reads
    only its batch's rows), plus each quantized layer's weights as the path it runs reads them (the packed int4 copy
    on the fast path, the dequantized copy on the reference path)."""
    total = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    if not lm.config.tie_word_embeddings:
        emb = lm.model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    quantized = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    return total + sum(weight_bytes_read(m, lm.device) for m in quantized)


def weights_dtype(lm: LoadedModel) -> str:
    """`int4` / `int8` for a quantized model (its decoder layers' linears), else the parameters' dtype."""
    bits = {m.bits for m in lm.model.modules() if isinstance(m, QuantLinear)}
    if bits:
        return f"int{min(bits)}"
    name = str(lm.dtype).removeprefix("torch.")
    # The names results/gpu.json uses.
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)


def quantize_for_bench(lm: LoadedModel, scheme: str) -> dict:
    """Quantize `lm` in place for a speed benchmark (round to nearest, packed for the fast path)."""
    from sunray.models.presets import quantize_dummy

    info = quantize_dummy(lm, scheme)
    free_device_memory(lm.device)
    return info


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (METHOD.md's ceiling):
    the median of `repeats` timed copies of `nbytes` after a warm-up. The decode floor divides by this."""
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    free_device_memory(device)
    return 2 * nbytes / statistics.median(times)


def decode_floor_ms(lm: LoadedModel, batch: int, context: int, bandwidth: float = DEFAULT_BANDWIDTH) -> float:
    kv = lm.config.kv_bytes_per_token(lm.dtype) * batch * context
    return (decode_weight_bytes(lm) + kv) / bandwidth * 1e3


def prefill_flops(c: ModelConfig, prompt_len: int, batch: int) -> float:
    """Matmul FLOPs of a prefill pass: projections and MLP for every token, causal attention, the LM head for the
    last position of each prompt."""
    h, d = c.hidden_size, c.head_dim
    linear = h * d * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * h * c.intermediate_size
    tokens = prompt_len * batch
    attn = 2 * 2 * c.num_heads * d * (prompt_len * (prompt_len + 1) // 2) * batch
    return c.num_layers * (2 * linear * tokens + attn) + 2 * h * c.vocab_size * batch


def _random_requests(
    lm: LoadedModel, batch: int, context: int, max_tokens: int, seed: int = 0
) -> list[KVHandoff]:
    """`batch` hand-offs whose KV covers context - 1 tokens (the step then attends over `context`). They share one
    random KV tensor on the device: the decode engine copies each into its own blocks."""
    c = lm.config
    gen = torch.Generator().manual_seed(seed)
    n = context - 1
    dev_gen = torch.Generator(device=lm.device).manual_seed(seed)
    kv = torch.randn(
        (c.num_layers, 2, n, c.num_kv_heads, c.head_dim), generator=dev_gen, device=lm.device
    ).to(lm.dtype)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for i in range(batch):
        prompt = torch.randint(0, c.vocab_size, (n,), generator=gen).tolist()
        out.append(KVHandoff(f"b{i}", "bench", lm.fingerprint, prompt, [prompt[-1]], sampling, kv))
    return out


def bench_decode(
    lm: LoadedModel,
    batch: int,
    context: int,
    steps: int,
    warmup: int = 3,
    *,
    backend: str = "auto",
    cuda_graphs: bool | None = None,
    fast_path: bool | None = None,
    bandwidth: float = DEFAULT_BANDWIDTH,
    num_splits: int | None = None,
    kernels: bool = False,
    overlap_steps: bool = False,
) -> dict:
    """Median ms per decode step for `batch` requests whose context starts at `context` tokens.
    num_splits: force the Triton decode attention's split count (None: its heuristic).
    kernels: also profile the step's kernels (`kernel_profile`, see profile_step_kernels).
    overlap_steps: the engine launches each pass before reading the last (`back_to_back_ms` shows the gain)."""
    free_device_memory(lm.device)
    total_tokens = context + steps * 3 + warmup + 32
    kv_bytes = lm.config.kv_bytes_per_token(lm.dtype) * batch * total_tokens
    if lm.device.type == "cuda" and kv_bytes > kv_cache_bytes_for_free_memory(lm.device, 0.97, 1 << 30):
        raise MemoryError(
            f"batch {batch} x context {context} needs {kv_bytes / 2**30:.1f} GiB of KV; not free"
        )
    config = EngineConfig(
        max_num_seqs=batch,
        kv_cache_bytes=kv_bytes,
        max_model_len=total_tokens,
        attention_backend=backend,
        overlap_steps=overlap_steps,
    )
    engine = DecodeEngine(lm, config)
    if cuda_graphs is not None or fast_path is not None:
        engine.runner = ModelRunner(
            lm.model, engine.kv_cache, engine.runner.backend, cuda_graphs=cuda_graphs, fast_path=fast_path
        )
    runner = engine.runner
    if num_splits is not None and hasattr(runner.backend, "num_splits"):
        runner.backend.num_splits = num_splits
    for h in _random_requests(lm, batch, context, steps * 3 + warmup + 8):
        engine.add(h)
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        sync_device(lm.device)
        t = time.perf_counter()
        engine.step()
        sync_device(lm.device)
        times.append(time.perf_counter() - t)
    # Back to back, as a serving loop runs them: with overlap_steps only this shows the host hidden under the device.
    sync_device(lm.device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync_device(lm.device)
    back_to_back_ms = (time.perf_counter() - t) / steps * 1e3
    engine.step()  # with overlap_steps: the last pass's tokens read, so the inputs below are the host's
    seqs = list(engine.running)
    fwd = []
    for _ in range(steps):  # the decode module alone: same inputs again (rewrites the same KV slots)
        sync_device(lm.device)
        t = time.perf_counter()
        sample(runner.decode(seqs), seqs)
        sync_device(lm.device)
        fwd.append(time.perf_counter() - t)
    replay_ms = _graph_replay_ms(runner, batch, steps)
    profile = profile_step_kernels(runner, seqs, lm.config.num_layers, steps) if kernels else None
    ms, fwd_ms = statistics.median(times) * 1e3, statistics.median(fwd) * 1e3
    floor = decode_floor_ms(lm, batch, context, bandwidth)
    del engine, runner, seqs
    free_device_memory(lm.device)
    return {
        "batch": batch,
        "context": context,
        "dtype": weights_dtype(lm),
        "ms_per_step": round(ms, 3),
        "tok_per_s": round(batch / ms * 1e3, 1),
        "back_to_back_ms": round(back_to_back_ms, 3),
        "overlap_steps": overlap_steps,
        "forward_ms": round(fwd_ms, 3),
        "forward_tok_per_s": round(batch / fwd_ms * 1e3, 1),
        "floor_ms": round(floor, 3),
        "bandwidth_GBps": round(bandwidth / 1e9, 1),
        "step_over_floor": round(ms / floor, 3),
        "forward_over_floor": round(fwd_ms / floor, 3),
        "floor_fraction": round(floor / ms, 3),
        "forward_floor_fraction": round(floor / fwd_ms, 3),
        "gpu_ms": None if replay_ms is None else round(replay_ms, 3),
        "backend": backend,
        "cuda_graphs": cuda_graphs,
        "fast_path": fast_path,
        "num_splits": num_splits,
        **({"kernel_profile": profile} if kernels else {}),
    }


# Kernel families by name (first match wins). cuBLAS names vary by version and GPU (sm90_xmma_gemm..., nvjet_...,
# gemv2T_kernel...); our Triton kernels keep their Python names.
KERNEL_FAMILIES = (
    (
        "int4 matmul",
        ("w4a16", "tinygemm", "int4pack"),
    ),  # before "gemm": tinygemm_m16n8k16_chunk_kernel is int4
    (
        "matmul",
        (
            "gemm",
            "gemv",
            "splitk",
            "nvjet",
            "cutlass",
            "xmma",
            "cublas",
            "matmul",
            "addmm",
            "aten::mm",
            "aten::linear",
        ),
    ),
    ("attention", ("paged_decode", "merge_splits", "attention", "sdpa", "flash")),
    ("kv store", ("store_kv", "expand_tables")),
    ("norm", ("rms_norm", "rmsnorm", "layer_norm")),
    ("rope", ("rope", "rotary")),
    ("silu*mul", ("silu",)),
    ("embedding", ("embedding", "index_select", "gather")),
    ("sampler", ("argmax", "topk", "sort", "softmax", "multinomial", "max_", "reduce")),
    ("copy/fill", ("copy", "memcpy", "memset", "fill", "cat", "elementwise")),
)


def kernel_family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in KERNEL_FAMILIES if any(k in low for k in keys)), "other")


def profile_step_kernels(runner: ModelRunner, seqs: list, num_layers: int, steps: int) -> dict:
    """Where a decode step's device time goes: each kernel family's launches and microseconds per step, their sum,
    and (CUDA graphs) the replay's wall time, whose excess over the sum is the gaps between kernels.

    On CUDA with a captured graph, it profiles `steps` replays of the step's graph (CUPTI reports each kernel of a
    replay); without one, `steps` forwards (runner.decode + sample), whose device kernels (CUDA) or operators (CPU)
    are counted. The numbers are per step: totals divided by `steps`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = next(iter(runner.model.parameters())).device.type == "cuda"
    graphs = getattr(runner, "_graphs", {})
    bucket = next((b for b in sorted(graphs) if b >= len(seqs)), None)
    graph = graphs[bucket][0] if bucket is not None else None
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            if graph is not None:
                graph.replay()
            else:
                sample(runner.decode(seqs), seqs)
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6 / steps
    families: dict[str, dict] = {}
    top: dict[str, list] = {}
    for ev in prof.events():
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (ev.cpu_parent is not None or not ev.name.startswith("aten::")):
            continue  # CPU: top-level aten operators only, so nothing is counted twice
        us = ev.device_time if cuda else ev.cpu_time
        fam = families.setdefault(kernel_family(ev.name), {"launches": 0, "us": 0.0})
        fam["launches"] += 1
        fam["us"] += us
        entry = top.setdefault(ev.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total_us = sum(f["us"] for f in families.values())
    launches = sum(f["launches"] for f in families.values())
    per_step = {
        fam: {
            "launches": round(f["launches"] / steps, 1),
            "us": round(f["us"] / steps, 1),
            "share": round(f["us"] / total_us, 3) if total_us else 0.0,
        }
        for fam, f in sorted(families.items(), key=lambda kv: -kv[1]["us"])
    }
    return {
        "source": "graph replay"
        if graph is not None
        else ("forward (CUDA)" if cuda else "forward (CPU operators)"),
        "steps": steps,
        "wall_us": round(wall_us, 1),
        "kernel_us": round(total_us / steps, 1),
        "gap_us": round(wall_us - total_us / steps, 1) if cuda else None,
        "launches": round(launches / steps, 1),
        "launches_per_layer": round(launches / steps / num_layers, 1),
        "families": per_step,
        "top": [
            {"name": n[:80], "launches": round(c / steps, 1), "us": round(us / steps, 1)}
            for n, (c, us) in sorted(top.items(), key=lambda kv: -kv[1][1])[:12]
        ],
    }


def print_kernel_profile(prof: dict, out) -> None:
    """The table `sunray bench decode --kernels` prints under each row."""
    gap = "" if prof["gap_us"] is None else f", gaps {prof['gap_us']:.0f} us"
    print(
        f"#   {prof['source']}: {prof['wall_us']:.0f} us wall per step, kernels {prof['kernel_us']:.0f} us{gap}; "
        f"{prof['launches']:.0f} launches ({prof['launches_per_layer']:.1f} per layer)",
        file=out,
    )
    for fam, f in prof["families"].items():
        print(
            f"#     {fam:<12} {f['launches']:>7.1f} launches {f['us']:>9.1f} us  {f['share']:>6.1%}", file=out
        )


def _graph_replay_ms(runner: ModelRunner, batch: int, steps: int) -> float | None:
    """GPU time of one decode step alone: the median over CUDA events of replaying the step's graph (same inputs)."""
    graphs = getattr(runner, "_graphs", {})
    bucket = next((b for b in sorted(graphs) if b >= batch), None)
    if bucket is None:
        return None
    graph = graphs[bucket][0]
    times = []
    for _ in range(max(steps, 5)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_prefill(
    lm: LoadedModel,
    prompt_len: int,
    batch: int,
    repeats: int,
    warmup: int = 1,
    *,
    backend: str = "auto",
    fast_path: bool | None = None,
    peak_flops: float = DEFAULT_PEAK_FLOPS,
) -> dict:
    free_device_memory(lm.device)
    config = EngineConfig(
        max_num_batched_tokens=prompt_len * batch, max_model_len=prompt_len + 8, attention_backend=backend
    )
    engine = PrefillEngine(lm, config)
    if fast_path is not None:
        engine.runner = ModelRunner(lm.model, engine.kv_cache, engine.runner.backend, fast_path=fast_path)
    gen = torch.Generator().manual_seed(0)
    reqs = [
        PrefillRequest(
            f"p{i}",
            torch.randint(0, lm.config.vocab_size, (prompt_len,), generator=gen).tolist(),
            SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        )
        for i in range(batch)
    ]
    for _ in range(warmup):
        engine.prefill(reqs)
    times = []
    for _ in range(repeats):
        sync_device(lm.device)
        t = time.perf_counter()
        engine.prefill(reqs)
        sync_device(lm.device)
        times.append(time.perf_counter() - t)
    del engine
    free_device_memory(lm.device)
    s = statistics.median(times)
    tokens = prompt_len * batch
    flops = prefill_flops(lm.config, prompt_len, batch)
    return {
        "prompt_len": prompt_len,
        "batch": batch,
        "dtype": weights_dtype(lm),
        "ms": round(s * 1e3, 2),
        "tok_per_s": round(tokens / s, 1),
        "tflops": round(flops / s / 1e12, 1),
        "peak_fraction": round(flops / s / peak_flops, 3),
        "backend": backend,
        "fast_path": fast_path,
    }


# What `sunray bench sampler` times: each request of a batch samples under the same parameters, except in "mixed".
SAMPLER_CASES: dict[str, SamplingParams | None] = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1": SamplingParams(temperature=1.0),
    "temperature 0.7, top-p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "temperature 1, top-k 50": SamplingParams(temperature=1.0, top_k=50),
    "temperature 1, seeded": SamplingParams(temperature=1.0, seed=7),
    "mixed": None,  # a quarter each: greedy, temperature 1, top-p 0.9, seeded
}


def sampler_logits(lm: LoadedModel, rows: int) -> tuple[torch.Tensor, str]:
    """`rows` rows of next-token logits [rows, vocab] in the model's dtype: with a tokenizer, the model's own at
    each position of an English text (this package's docstrings), so that their spread is a trained model's;
    without one (dummy weights), those of random token ids, near flat."""
    import inspect

    from sunray.engine import decode_engine, model_runner, output_processor, sampler
    from sunray.models.dense_attention import TrainContext, positions

    if lm.tokenizer is not None:
        text = "\n\n".join(
            inspect.getdoc(m) or "" for m in (decode_engine, model_runner, output_processor, sampler)
        )
        ids = lm.tokenizer(text)["input_ids"]
        ids = (ids * (rows // max(1, len(ids)) + 1))[:rows]
        source = "model"
    else:
        ids = torch.randint(
            0, lm.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(0)
        ).tolist()
        source = "random ids"
    with torch.inference_mode():
        n = min(rows, lm.config.max_position_embeddings)
        chunks = []
        for start in range(0, rows, n):  # chunks of at most the context length
            part = torch.tensor(ids[start : start + n], device=lm.device)
            hidden = lm.model(part, positions(1, len(part)).to(lm.device), TrainContext.causal(1, len(part)))
            chunks.append(lm.model.compute_logits(hidden))
    return torch.cat(chunks), source


def _sampler_batch(case: str, batch: int) -> list[Sequence]:
    params = SAMPLER_CASES[case]
    mix = [
        SamplingParams(temperature=0.0),
        SamplingParams(),
        SamplingParams(top_p=0.9),
        SamplingParams(seed=7),
    ]
    return [Sequence(f"s{i}", [0], params or mix[i % len(mix)]) for i in range(batch)]


def bench_sampler(lm: LoadedModel, batch_sizes: list[int], steps: int, warmup: int = 2) -> list[dict]:
    """Median ms of one `sample` call over a batch of logits rows, per batch size and sampling case."""
    logits, source = sampler_logits(lm, max(batch_sizes))
    out = []
    for batch in batch_sizes:
        rows = logits[:batch]
        for case in SAMPLER_CASES:
            seqs = _sampler_batch(case, batch)
            for _ in range(warmup):
                sample(rows, seqs)
            times = []
            for _ in range(steps):
                sync_device(lm.device)
                t = time.perf_counter()
                sample(rows, seqs)
                sync_device(lm.device)
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3
            out.append(
                {"batch": batch, "case": case, "ms": round(ms, 3), "logits": source, "vocab": rows.shape[1]}
            )
    return out
