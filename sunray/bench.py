"""Engine benchmarks: decode ms/step and tok/s against batch size and context, prefill tok/s.

Decode is timed through `DecodeEngine.step()` (scheduling, the forward pass, sampling and output processing:
what a request sees), on hand-offs with random prompt KV, so no prefill is needed and any context length works.
"""

from __future__ import annotations

import statistics
import time

import torch

from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest
from sunray.engine.sequence import SamplingParams
from sunray.kv.handoff import KVHandoff
from sunray.models.loader import LoadedModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_handoff(lm: LoadedModel, request_id: str, context: int, max_tokens: int, gen: torch.Generator) -> KVHandoff:
    c = lm.config
    prompt = torch.randint(0, c.vocab_size, (context,), generator=gen).tolist()
    kv = torch.randn((c.num_layers, 2, context, c.num_kv_heads, c.head_dim), generator=gen).to(lm.dtype)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return KVHandoff(request_id, "bench", lm.fingerprint, prompt, [prompt[-1]], sampling, kv.to(lm.device))


def bench_decode(lm: LoadedModel, batch: int, context: int, steps: int, warmup: int = 3) -> dict:
    """Median ms per decode step for `batch` requests whose context starts at `context` tokens."""
    kv_bytes = lm.config.kv_bytes_per_token(lm.dtype) * batch * (context + steps + warmup + 32)
    engine = DecodeEngine(lm, EngineConfig(max_num_seqs=batch, kv_cache_bytes=kv_bytes, max_model_len=context + steps + warmup + 16))
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add(_random_handoff(lm, f"b{i}", context - 1, steps + warmup + 2, gen))
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        _sync(lm.device)
        t = time.perf_counter()
        engine.step()
        _sync(lm.device)
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return {"batch": batch, "context": context, "dtype": str(lm.dtype).removeprefix("torch."),
            "ms_per_step": round(ms, 3), "tok_per_s": round(batch / ms * 1e3, 1)}  # fmt: skip


def bench_prefill(lm: LoadedModel, prompt_len: int, batch: int, repeats: int, warmup: int = 1) -> dict:
    engine = PrefillEngine(lm, EngineConfig(max_num_batched_tokens=prompt_len * batch, max_model_len=prompt_len + 8))
    gen = torch.Generator().manual_seed(0)
    reqs = [
        PrefillRequest(f"p{i}", torch.randint(0, lm.config.vocab_size, (prompt_len,), generator=gen).tolist(),
                       SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        for i in range(batch)
    ]  # fmt: skip
    for _ in range(warmup):
        engine.prefill(reqs)
    times = []
    for _ in range(repeats):
        _sync(lm.device)
        t = time.perf_counter()
        engine.prefill(reqs)
        _sync(lm.device)
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    tokens = prompt_len * batch
    flops = 2 * lm.config.num_parameters() * tokens
    return {"prompt_len": prompt_len, "batch": batch, "dtype": str(lm.dtype).removeprefix("torch."),
            "ms": round(s * 1e3, 2), "tok_per_s": round(tokens / s, 1), "tflops": round(flops / s / 1e12, 2)}  # fmt: skip
