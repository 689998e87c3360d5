"""The GPU benchmark suite of issue 6 in one process (the 8B model loads once): ceilings, decode and prefill of the
Llama-3.1-8B shape with dummy weights through every variant, and micro-benchmarks of the parts.

    PYTHONPATH=. python3 tests/gpu/bench_suite.py --out DIR

Variants: `reference` (torch attention, unfused weights and ops, eager: the CPU reference path run on the GPU),
`triton-eager` (fused weights and ops, Triton attention, no graphs) and `fast` (the same plus CUDA graphs: what
`sunray bench` and the engines use on CUDA by default). Writes DIR/suite.json after every section, so a run cut
short keeps what it measured, and DIR/gpu.json in the docs/results format.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from sunray.bench import bench_decode, bench_prefill, decode_weight_bytes
from sunray.engine import triton_attention
from sunray.models.presets import dummy_model


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def event_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, reps: int = 10) -> float:
    """GPU time of `fn` captured in a CUDA graph (no launch gaps, no Python): median over replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return event_ms(g.replay, reps=reps)


def ceilings() -> dict:
    n = 1 << 30  # 2 GiB of bf16 per buffer: far past the L2
    bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)]
    ms = event_ms(lambda: bufs[1].copy_(bufs[0]))
    bw = 2 * 2 * n / (ms / 1e3)
    mats = [torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ms_mm = event_ms(lambda: mats[0] @ mats[1])
    bufs.clear()
    mats.clear()
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "copy_TBps": round(bw / 1e12, 3), "matmul_TFLOPs": round(2 * 8192**3 / (ms_mm / 1e3) / 1e12, 1)}


def gemm_only(lm, batches=(1, 16, 64, 128, 256)) -> list[dict]:
    """All the decode step's matmuls (fused q/k/v, o, fused gate/up, down per layer; LM head), captured in one
    CUDA graph: how close cuBLAS alone comes to the weight-read floor."""
    model = lm.model
    mats = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        mats += [a._qkv.weight, a.o_proj.weight, m._gate_up.weight, m.down_proj.weight]
    mats.append(model.lm_head.weight)
    nbytes = sum(w.numel() * w.element_size() for w in mats)
    out = []
    for b in batches:
        xs = {k: torch.randn(b, k, device="cuda", dtype=lm.dtype) for k in {w.shape[1] for w in mats}}

        def run(xs=xs):
            for w in mats:
                F.linear(xs[w.shape[1]], w)

        ms = graph_ms(run)
        out.append({"batch": b, "ms": round(ms, 3), "weight_GB": round(nbytes / 1e9, 2), "TBps": round(nbytes / ms / 1e9, 3)})
        log(f"gemm-only batch {b}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s")
    return out


ATTN_CASES = ((1, 1024), (1, 8192), (16, 4096), (64, 1024), (256, 1024))
ATTN_CONFIGS = [dict(num_splits=s) for s in (None, 1, 2, 4, 8, 16)] + [
    dict(block_n=32), dict(num_stages=2), dict(block_n=128, num_warps=8), dict(num_stages=4), dict(num_warps=8),
]


def attention_kernel(lm, cases=ATTN_CASES, configs=ATTN_CONFIGS, layers: int = 16) -> list[dict]:
    """Decode attention alone, in a CUDA graph of `layers` calls over distinct caches (nothing served from L2)."""
    c = lm.config
    page = 16
    out = []
    for b, ctx in cases:
        nblk = b * ctx // page + 8
        shape = (layers, nblk, page, c.num_kv_heads, c.head_dim)
        kc = torch.randn(shape, device="cuda", dtype=lm.dtype)
        vc = torch.randn(shape, device="cuda", dtype=lm.dtype)
        tables = torch.randperm(nblk, device="cuda")[: b * ctx // page].view(b, ctx // page).to(torch.int32)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int64)
        q = torch.randn(b, c.num_heads, c.head_dim, device="cuda", dtype=lm.dtype)
        nbytes = 2 * b * ctx * c.num_kv_heads * c.head_dim * kc.element_size()
        for cfg in configs:

            def run(cfg=cfg, kc=kc, vc=vc, tables=tables, lens=lens, q=q):
                for i in range(layers):
                    triton_attention.paged_decode_attention(q, kc[i], vc[i], tables, lens, c.head_dim**-0.5, **cfg)

            try:
                us = graph_ms(run) * 1e3 / layers
            except Exception as e:
                log(f"attention b={b} ctx={ctx} {cfg}: {e!r}"[:300])
                continue
            splits = cfg.get("num_splits") or triton_attention.default_num_splits(b, c.num_kv_heads, q.device)
            out.append({"batch": b, "context": ctx, **cfg, "splits": splits, "us": round(us, 1),
                        "TBps": round(nbytes / us / 1e6, 3)})  # fmt: skip
            log(f"attention b={b} ctx={ctx} {cfg} splits={splits}: {us:.1f} us, {nbytes / us / 1e6:.2f} TB/s")
        del kc, vc
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the code paths (tiny cases, no ceilings)")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if cpu:
        args.skip += ["ceilings", "gemm only", "attention kernel"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    props = None if cpu else torch.cuda.get_device_properties(0)
    res: dict = {
        "device": "cpu" if cpu else torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": getattr(getattr(triton_attention, "triton", None), "__version__", None),
        "sms": props and props.multi_processor_count, "memory_GiB": props and round(props.total_memory / 2**30, 1),
        "command": "PYTHONPATH=. python3 tests/gpu/bench_suite.py --out $OUT",
    }  # fmt: skip

    def save():
        (out / "suite.json").write_text(json.dumps(res, indent=2))
        fast = [r for r in res.get("decode", []) if r.get("variant") == "fast"]
        keep = ("batch", "context", "dtype", "ms_per_step", "tok_per_s", "forward_ms", "forward_tok_per_s", "gpu_ms",
                "floor_ms", "floor_fraction")  # fmt: skip
        docs = {"device": res["device"], "date": res["date"], "command": res["command"],
                "decode": [{k: r.get(k) for k in keep} for r in fast],
                "prefill": [r for r in res.get("prefill", []) if r.get("variant") == "fast"]}  # fmt: skip
        (out / "gpu.json").write_text(json.dumps(docs, indent=2))

    def section(name, fn):
        if name in args.skip:
            return
        t = time.perf_counter()
        log(f"== {name}")
        try:
            fn()
        except Exception:
            traceback.print_exc()
            res.setdefault("errors", []).append(f"{name}: {traceback.format_exc(limit=3)}")
        log(f"== {name} took {time.perf_counter() - t:.1f} s")
        save()

    section("ceilings", lambda: res.update(ceilings=ceilings()))
    bw = res.get("ceilings", {}).get("copy_bytes_per_s", 3.0e12)
    t = time.perf_counter()
    lm = dummy_model(args.shape, device=args.device)
    log(f"model ready in {time.perf_counter() - t:.1f} s, {0 if cpu else torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    res["decode"], res["prefill"] = [], []

    def decode(variant, cases, steps, **kw):
        for b, ctx in cases:
            try:
                r = bench_decode(lm, b, ctx, steps, bandwidth=bw, **kw)
            except Exception as e:
                traceback.print_exc()
                r = {"batch": b, "context": ctx, "error": repr(e)[:300]}
            r["variant"] = variant
            res["decode"].append(r)
            log(f"decode {variant:>12} b={b:<4} ctx={ctx:<5} step {r.get('ms_per_step')} ms, fwd {r.get('forward_ms')} ms, "
                f"gpu {r.get('gpu_ms')} ms, floor {r.get('floor_ms')} ms, {r.get('tok_per_s')} tok/s")  # fmt: skip
            save()

    def prefill(variant, cases, **kw):
        for n, b in cases:
            try:
                r = bench_prefill(lm, n, b, 5, **kw)
            except Exception as e:
                traceback.print_exc()
                r = {"prompt_len": n, "batch": b, "error": repr(e)[:300]}
            r["variant"] = variant
            res["prefill"].append(r)
            log(f"prefill {variant:>12} n={n} b={b}: {r.get('ms')} ms, {r.get('tok_per_s')} tok/s, {r.get('tflops')} TFLOP/s")
            save()

    main_cases = [(b, 1024) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)] + [(1, 128), (1, 8192), (64, 128), (16, 4096)]
    ref_cases, eager_cases = [(1, 1024), (64, 1024)], [(1, 1024), (64, 1024), (256, 1024)]
    prefill_cases = [(1024, 1), (1024, 4), (1024, 8), (4096, 1)]
    if cpu:
        main_cases, ref_cases, eager_cases, prefill_cases = [(1, 40), (3, 20)], [(3, 20)], [(3, 20)], [(32, 2)]
        args.steps = 2
    section("decode reference", lambda: decode("reference", ref_cases, 4, warmup=2, backend="torch",
                                               cuda_graphs=False, fast_path=False))  # fmt: skip
    section("prefill reference", lambda: prefill("reference", prefill_cases[:1], backend="torch", fast_path=False))
    section("decode fast", lambda: decode("fast", main_cases, args.steps))
    section("decode triton-eager", lambda: decode("triton-eager", eager_cases, 8, cuda_graphs=False))

    def sweep():
        for splits in (1, 2, 4, 8):
            decode(f"splits={splits}", split_cases, 16, num_splits=splits)

    split_cases = [(1, 8192), (16, 4096), (64, 1024), (256, 1024)] if not cpu else [(3, 20)]
    section("decode split sweep", sweep)
    section("prefill fast", lambda: prefill("fast", prefill_cases))
    section("gemm only", lambda: res.update(gemm_only=gemm_only(lm)))
    section("attention kernel", lambda: res.update(attention_kernel=attention_kernel(lm)))

    print("\n# decode (ms per step; fwd = decode module alone; gpu = graph replay alone)")
    print(f"{'variant':>12} {'batch':>5} {'ctx':>5} {'step ms':>8} {'tok/s':>8} {'fwd ms':>7} {'gpu ms':>7} {'floor':>6} {'floor/step':>10}")
    for r in res["decode"]:
        if "error" in r:
            print(f"{r['variant']:>12} {r['batch']:>5} {r['context']:>5} ERROR {r['error'][:80]}")
            continue
        print(f"{r['variant']:>12} {r['batch']:>5} {r['context']:>5} {r['ms_per_step']:>8.2f} {r['tok_per_s']:>8.0f} "
              f"{r['forward_ms']:>7.2f} {r['gpu_ms'] or 0:>7.2f} {r['floor_ms']:>6.2f} {r['floor_fraction']:>10.2f}")  # fmt: skip
    print("\n# prefill")
    for r in res["prefill"]:
        print(f"{r['variant']:>12} n={r['prompt_len']} b={r['batch']}: {r.get('ms')} ms {r.get('tok_per_s')} tok/s "
              f"{r.get('tflops')} TFLOP/s ({r.get('peak_fraction')} of peak) {r.get('error', '')}")  # fmt: skip
    print("ceilings", res.get("ceilings"), "| weights read per step", round(decode_weight_bytes(lm) / 1e9, 2), "GB")
    print("errors:", len(res.get("errors", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
