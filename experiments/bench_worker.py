"""What streaming through a Ray decode worker costs on top of the bare engine.

    python -m experiments.bench_worker --streams 64 --tokens 128                       # tiny random model, CPU
    python -m experiments.bench_worker --streams 64 --tokens 128 --emulate-gpu-ms 8    # a GPU-like step (below)
    python -m experiments.bench_worker --shape llama-3.1-8b --device cuda --dtype bfloat16 --streams 128

It runs one DecodeWorker actor (the serving code as it is, with a stand-in router), hands it `--streams` prefilled
requests at once over the object store, and reads their outputs as the ingress does (sunray.serve.streams). It prints the worker's own step times by batch size, decode tokens/s, and the same decode run on the
bare engine in this process with no Ray and no streams: the difference is the serving layer's overhead.

`--emulate-gpu-ms` adds that many milliseconds to every step as a sleep that releases the GIL, the way a step on a
GPU waits for its kernels. On a GPU the step thread mostly waits, so it must get the GIL back from the event loop
(which serves the streams in the same process) every time it wakes: that hand-over is what this measures on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import torch

from sunray.engine.config import EngineConfig
from sunray.engine.decode_engine import DecodeEngine
from sunray.engine.prefill_engine import PrefillEngine, PrefillRequest
from sunray.engine.sequence import SamplingParams


def _emulate_gpu(engine: DecodeEngine, ms: float) -> None:
    if ms <= 0:
        return
    step = engine.step

    def slow_step():
        out = step()
        time.sleep(ms / 1e3)  # releases the GIL, as a CUDA synchronize does
        return out

    engine.step = slow_step


def _model(a):
    if a.shape:
        from sunray.models.presets import dummy_model

        return dummy_model(a.shape, device=a.device, dtype=getattr(torch, a.dtype))
    from sunray.models.loader import load_model

    return load_model(a.model_dir, device=a.device, dtype=getattr(torch, a.dtype))


def _handoffs(lm, a, prefix: str) -> list:
    engine = PrefillEngine(
        lm,
        EngineConfig(
            max_num_batched_tokens=max(2048, a.prompt_len * 8),
            max_model_len=_max_len(a),
            attention_backend=a.attention_backend,
        ),
    )
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    reqs = [
        PrefillRequest(f"{prefix}{i}", torch.randint(5, 200, (a.prompt_len,), generator=g).tolist(), sp)
        for i in range(a.streams)
    ]
    return [r.handoff for r in engine.prefill(reqs)]


def bare_engine(lm, a) -> dict:
    """The same decode on the engine alone: add every hand-off, step until done."""
    engine = DecodeEngine(lm, _engine_config(a))
    engine.capture_graphs()  # as the decode worker does when it starts
    _emulate_gpu(engine, a.emulate_gpu_ms)
    for h in _handoffs(lm, a, "bare-"):
        engine.add(h)
    tokens, steps, t0 = 0, 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 3),
        "steps": steps,
        "tokens": tokens,
        "tok_s": round(tokens / wall, 1),
        "step_ms": round(1e3 * wall / steps, 3),
    }


def _engine_config(a) -> EngineConfig:
    return EngineConfig(
        kv_cache_bytes=a.kv_cache_mb << 20,
        max_num_seqs=max(a.streams, 1),
        max_model_len=_max_len(a),
        max_num_batched_tokens=max(2048, a.prompt_len * 8),
        attention_backend=a.attention_backend,
    )


def _max_len(a) -> int:
    return a.prompt_len + a.tokens + 16


def through_ray(lm, a) -> dict:
    import ray

    from sunray.kv.transport import get_transport
    from sunray.serve.decode_worker import DecodeWorker
    from sunray.serve.streams import DecodeStreams

    @ray.remote
    class StandInRouter:
        def register(self, *args):
            return True

        def report(self, *args):
            return True

    base = DecodeWorker.__ray_metadata__.modified_class

    @ray.remote
    class Worker(base):
        def __init__(self, worker_id, args, router, emulate_gpu_ms):
            super().__init__(worker_id, args, router)
            _emulate_gpu(self.engine, emulate_gpu_ms)

    args = {
        "decode_module": a.model_dir or "default",
        "dummy_shape": a.shape,
        "device": a.device,
        "dtype": a.dtype,
        "torch_threads": a.torch_threads,
        "max_waiting_per_worker": max(256, a.streams),
        "engine": {
            "kv_cache_mb": a.kv_cache_mb,
            "max_num_seqs": max(a.streams, 1),
            "max_num_batched_tokens": max(2048, a.prompt_len * 8),
            "attention_backend": a.attention_backend,
            "max_model_len": _max_len(a),
        },
    }
    if a.shape:
        args["tokenizer"] = a.tokenizer
    opts = {"num_cpus": 0, "num_gpus": 1 if a.device == "cuda" else 0}
    worker = Worker.options(**opts).remote("bench", args, StandInRouter.remote(), a.emulate_gpu_ms)
    ray.get(worker.start.remote())
    transport = get_transport("object_store")
    payloads = [transport.send(h) for h in _handoffs(lm, a, "ray-")]

    async def consume(streams: DecodeStreams, i: int, payload) -> int:
        n, q = 0, await streams.submit("bench", worker, payload, f"ray-{i}")
        while True:
            out = await q.get()
            if isinstance(out, BaseException):
                raise out
            n += len(out.new_token_ids)
            if out.finished:
                return n

    async def run() -> tuple[float, int]:
        streams = DecodeStreams()  # what the ingress uses
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(consume(streams, i, p) for i, p in enumerate(payloads)))
        wall = time.perf_counter() - t0
        streams.close()
        return wall, sum(counts)

    wall, tokens = asyncio.run(run())
    stats = ray.get(worker.stats.remote())
    ray.kill(worker)
    return {
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tok_s": round(tokens / wall, 1),
        "step_times": stats["step_times"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent requests (the decode batch)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--shape", default=None, help="a presets shape with random weights (else a tiny test model)"
    )
    ap.add_argument("--tokenizer", default="default", help="with --shape: the tokenizer directory")
    ap.add_argument("--model-dir", default=None, help="a model directory instead of --shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--kv-cache-mb", type=int, default=512)
    ap.add_argument(
        "--emulate-gpu-ms", type=float, default=0.0, help="sleep per step, GIL released (CPU only)"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.streams < 1 or a.tokens < 2:
        ap.error("--streams must be >= 1 and --tokens >= 2")
    if a.emulate_gpu_ms and a.device != "cpu":
        ap.error("--emulate-gpu-ms is for CPU runs: a GPU step waits for its kernels already")
    torch.set_num_threads(a.torch_threads)
    if not a.shape and not a.model_dir:  # a tiny random Llama, saved as a model directory the worker loads
        import tempfile

        from sunray.models.tiny import make_tiny_model_dir

        a.model_dir = str(make_tiny_model_dir(tempfile.mkdtemp(prefix="bench-worker-"), "llama", seed=0))
    lm = _model(a)
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        res = {"args": vars(a), "bare_engine": bare_engine(lm, a), "through_ray": through_ray(lm, a)}
    finally:
        ray.shutdown()
    res["ray_over_bare_tok_s"] = round(res["through_ray"]["tok_s"] / res["bare_engine"]["tok_s"], 3)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
