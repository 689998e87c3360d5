"""The GPU benchmark suite of issue 6 in one process (the 8B model loads once): ceilings, decode and prefill of the
Llama-3.1-8B shape with dummy weights through every variant, and micro-benchmarks of the parts.

    PYTHONPATH=. python3 tests/gpu/bench_suite.py --out DIR

Variants: `reference` (torch attention, unfused weights and ops, eager: the CPU reference path run on the GPU),
`triton-eager` (fused weights and ops, Triton attention, no graphs) and `fast` (the same plus CUDA graphs: what
`sunray bench` and the engines use on CUDA by default). Writes DIR/suite.json after every section, so a run cut
short keeps what it measured, and DIR/gpu.json in the docs/results format.

    PYTHONPATH=. python3 tests/gpu/bench_suite.py --out DIR --int4 [--int4-scheme int4-g128]

runs the int4 comparison instead (issue 6, QSUN's decode module): bf16 decode at batch 1, 4, 16, 64, 256 (context
1024), all the step's matmuls alone in bf16, then the same model quantized in place (round to nearest, packed for the
int4 fast path), int4 decode at the same batches, the int4 / bf16 ratio per batch against the targets (>= 1.45x at
batch 1-16, >= 1x at 64), and last the int4 matmuls alone per kernel (tinygemm, Triton, the tuned choice).
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
    bufs = [
        torch.randn(n, device="cuda", dtype=torch.bfloat16),
        torch.empty(n, device="cuda", dtype=torch.bfloat16),
    ]
    ms = event_ms(lambda: bufs[1].copy_(bufs[0]))
    bw = 2 * 2 * n / (ms / 1e3)
    mats = [torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ms_mm = event_ms(lambda: mats[0] @ mats[1])
    bufs.clear()
    mats.clear()
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": bw,
        "copy_TBps": round(bw / 1e12, 3),
        "matmul_TFLOPs": round(2 * 8192**3 / (ms_mm / 1e3) / 1e12, 1),
    }


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
        out.append(
            {
                "batch": b,
                "ms": round(ms, 3),
                "weight_GB": round(nbytes / 1e9, 2),
                "TBps": round(nbytes / ms / 1e9, 3),
            }
        )
        log(f"gemm-only batch {b}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s")
    return out


def int4_gemm(lm, batches=(1, 4, 16, 32, 64, 128, 256)) -> list[dict]:
    """The int4 model's decode-step matmuls (per layer: fused q/k/v, o, fused gate/up, down, packed int4; the LM head
    in bf16, as in `gemm_only`) in one CUDA graph, per kernel: the tuned choice, tinygemm alone (up to M = 64), the
    Triton kernel alone (its best tile shape)."""
    from sunray.models import int4

    model = lm.model
    ws = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        ws += [a._qkv.quant.weight, a.o_proj._packed, m._gate_up.quant.weight, m.down_proj._packed]
    if any(w is None for w in ws):
        raise RuntimeError("the int4 model is not packed for the fast path")
    head = model.lm_head.weight
    nbytes = sum(w.nbytes for w in ws) + head.numel() * head.element_size()
    out = []
    for b in batches:
        widths = {w.k for w in ws} | {head.shape[1]}
        xs = {k: torch.randn(b, k, device="cuda", dtype=lm.dtype) for k in widths}
        for kind in (None, "tinygemm", "triton"):
            if kind == "tinygemm" and b > 64:
                continue

            def run(xs=xs):
                for w in ws:
                    int4.linear(xs[w.k], w)
                F.linear(xs[head.shape[1]], head)

            try:
                with int4.force(kind):
                    ms = graph_ms(run)  # its first, uncaptured call tunes each new shape
                    chosen = sorted({str(int4.choice_for(b, w)) for w in ws[:4]})
            except Exception as e:
                log(f"int4 gemm batch {b} {kind}: {e!r}"[:300])
                continue
            name = kind or "tuned"
            out.append(
                {
                    "batch": b,
                    "kernel": name,
                    "ms": round(ms, 3),
                    "weight_GB": round(nbytes / 1e9, 2),
                    "TBps": round(nbytes / ms / 1e9, 3),
                    "choices": chosen,
                }
            )
            log(
                f"int4 gemm batch {b} {name}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s ({'; '.join(chosen)})"
            )
    return out


ATTN_CASES = ((1, 1024), (1, 8192), (16, 4096), (64, 1024), (256, 1024))
ATTN_CONFIGS = [dict(num_splits=s) for s in (None, 1, 2, 4, 8, 16)] + [
    dict(block_n=32),
    dict(num_stages=2),
    dict(block_n=128, num_warps=8),
    dict(num_stages=4),
    dict(num_warps=8),
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
                    triton_attention.paged_decode_attention(
                        q, kc[i], vc[i], tables, lens, c.head_dim**-0.5, **cfg
                    )

            try:
                us = graph_ms(run) * 1e3 / layers
            except Exception as e:
                log(f"attention b={b} ctx={ctx} {cfg}: {e!r}"[:300])
                continue
            splits = cfg.get("num_splits") or triton_attention.default_num_splits(b, c.num_kv_heads, q.device)
            out.append(
                {
                    "batch": b,
                    "context": ctx,
                    **cfg,
                    "splits": splits,
                    "us": round(us, 1),
                    "TBps": round(nbytes / us / 1e6, 3),
                }
            )
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
    ap.add_argument(
        "--device", default="cuda", help="cpu: a dry run of the code paths (tiny cases, no ceilings)"
    )
    ap.add_argument("--int4", action="store_true", help="the int4 vs bf16 decode comparison, not the suite")
    ap.add_argument("--int4-scheme", default="int4-g128", help="quantization for --int4 (default int4-g128)")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if cpu:
        args.skip += ["ceilings", "gemm only", "attention kernel", "int4 gemm"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    props = None if cpu else torch.cuda.get_device_properties(0)
    res: dict = {
        "device": "cpu" if cpu else torch.cuda.get_device_name(0),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": getattr(getattr(triton_attention, "triton", None), "__version__", None),
        "sms": props and props.multi_processor_count,
        "memory_GiB": props and round(props.total_memory / 2**30, 1),
        "command": "PYTHONPATH=. python3 tests/gpu/bench_suite.py --out $OUT"
        + (f" --int4 --int4-scheme {args.int4_scheme}" if args.int4 else ""),
    }

    def save():
        (out / "suite.json").write_text(json.dumps(res, indent=2))
        fast = [r for r in res.get("decode", []) if r.get("variant") in ("fast", args.int4_scheme)]
        keep = (
            "batch",
            "context",
            "dtype",
            "ms_per_step",
            "tok_per_s",
            "forward_ms",
            "forward_tok_per_s",
            "gpu_ms",
            "floor_ms",
            "floor_fraction",
        )
        docs = {
            "device": res["device"],
            "date": res["date"],
            "command": res["command"],
            "decode": [{k: r.get(k) for k in keep} for r in fast],
            "prefill": [r for r in res.get("prefill", []) if r.get("variant") == "fast"],
        }
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
    log(
        f"model ready in {time.perf_counter() - t:.1f} s, {0 if cpu else torch.cuda.memory_allocated() / 2**30:.1f} GiB"
    )
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
            log(
                f"decode {variant:>12} b={b:<4} ctx={ctx:<5} step {r.get('ms_per_step')} ms, fwd {r.get('forward_ms')} ms, "
                f"gpu {r.get('gpu_ms')} ms, floor {r.get('floor_ms')} ms, {r.get('tok_per_s')} tok/s"
            )
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
            log(
                f"prefill {variant:>12} n={n} b={b}: {r.get('ms')} ms, {r.get('tok_per_s')} tok/s, {r.get('tflops')} TFLOP/s"
            )
            save()

    if args.int4:
        return int4_suite(args, lm, res, section, decode, bw, cpu)
    main_cases = [(b, 1024) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)] + [
        (1, 128),
        (1, 8192),
        (64, 128),
        (16, 4096),
    ]
    ref_cases, eager_cases = [(1, 1024), (64, 1024)], [(1, 1024), (64, 1024), (256, 1024)]
    prefill_cases = [(1024, 1), (1024, 4), (1024, 8), (4096, 1)]
    if cpu:
        main_cases, ref_cases, eager_cases, prefill_cases = (
            [(1, 40), (3, 20)],
            [(3, 20)],
            [(3, 20)],
            [(32, 2)],
        )
        args.steps = 2
    section(
        "decode reference",
        lambda: decode(
            "reference", ref_cases, 4, warmup=2, backend="torch", cuda_graphs=False, fast_path=False
        ),
    )
    section(
        "prefill reference", lambda: prefill("reference", prefill_cases[:1], backend="torch", fast_path=False)
    )
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
    print(
        f"{'variant':>12} {'batch':>5} {'ctx':>5} {'step ms':>8} {'tok/s':>8} {'fwd ms':>7} {'gpu ms':>7} {'floor':>6} {'floor/step':>10}"
    )
    for r in res["decode"]:
        if "error" in r:
            print(f"{r['variant']:>12} {r['batch']:>5} {r['context']:>5} ERROR {r['error'][:80]}")
            continue
        print(
            f"{r['variant']:>12} {r['batch']:>5} {r['context']:>5} {r['ms_per_step']:>8.2f} {r['tok_per_s']:>8.0f} "
            f"{r['forward_ms']:>7.2f} {r['gpu_ms'] or 0:>7.2f} {r['floor_ms']:>6.2f} {r['floor_fraction']:>10.2f}"
        )
    print("\n# prefill")
    for r in res["prefill"]:
        print(
            f"{r['variant']:>12} n={r['prompt_len']} b={r['batch']}: {r.get('ms')} ms {r.get('tok_per_s')} tok/s "
            f"{r.get('tflops')} TFLOP/s ({r.get('peak_fraction')} of peak) {r.get('error', '')}"
        )
    print(
        "ceilings",
        res.get("ceilings"),
        "| weights read per step",
        round(decode_weight_bytes(lm) / 1e9, 2),
        "GB",
    )
    print("errors:", len(res.get("errors", [])))
    return 0


INT4_TARGETS = {1: 1.45, 2: 1.45, 4: 1.45, 8: 1.45, 16: 1.45, 64: 1.0}  # int4 / bf16 tok/s the issue asks for


def int4_suite(args, lm, res, section, decode, bw, cpu) -> int:
    """bf16 decode, quantize in place, int4 decode: same process, same batches, then the ratios."""
    from sunray.bench import quantize_for_bench

    cases = [(b, 1024) for b in (1, 4, 16, 64, 256)] if not cpu else [(1, 40), (3, 20)]
    steps = args.steps if not cpu else 2
    section("decode fast", lambda: decode("fast", cases, steps))
    section("gemm only", lambda: res.update(gemm_only=gemm_only(lm, batches=(1, 4, 16, 32, 64, 128, 256))))

    def quantize():
        res["quantization"] = quantize_for_bench(lm, args.int4_scheme)  # in place, on the device
        log(f"quantized to {args.int4_scheme}: {res['quantization']}")

    section("quantize", quantize)
    # int4 decode before the matmul micro-benchmark: the numbers that matter first, should the run be cut short
    section(f"decode {args.int4_scheme}", lambda: decode(args.int4_scheme, cases, steps))
    if not cpu:
        from sunray.models import int4

        res["int4_tuning"] = int4.TUNING  # the same list: what the micro-benchmark tunes is added to it
    section("ratios", lambda: int4_ratios(args, res, cases))
    section("int4 gemm", lambda: res.update(int4_gemm=int4_gemm(lm)))
    if res.get("gemm_only") and res.get("int4_gemm"):
        print("\n# all matmuls of a step alone (CUDA graph), ms: bf16 cuBLAS vs int4 kernels")
        bf = {r["batch"]: r["ms"] for r in res["gemm_only"]}
        for r in res["int4_gemm"]:
            print(
                f"batch {r['batch']:>4} {r['kernel']:>8}: {r['ms']:>7.3f} ms (bf16 {bf.get(r['batch'], 0):.3f}), "
                f"{r['TBps']:.2f} TB/s of {r['weight_GB']} GB; {'; '.join(r['choices'])}"
            )
    if not cpu:
        int4_tuning_table(res)
    int4_ratios(args, res, cases)  # the table again, last in the log
    print("errors:", len(res.get("errors", [])))
    return 0


def int4_tuning_table(res) -> None:
    """What the int4 tuner timed per (M bucket, weight): the choice, its time and bandwidth, tinygemm's time, the
    runner-up (L2 flushed before each call: the weights come from memory, as in a decode step)."""
    print("\n# int4 tuning per weight and M bucket (force=triton: the micro-benchmark's Triton-only tuning)")
    for t in res.get("int4_tuning", []):
        ms = sorted(t["ms"].items(), key=lambda kv: kv[1])
        nbytes = t["n"] * t["k"] // 2 + t["k"] // t["group"] * t["n"] * 4
        best, best_ms = ms[0]
        second = f"; next {ms[1][0]} {ms[1][1]:.4f}" if len(ms) > 1 else ""
        tiny = f"; tinygemm {t['ms']['tinygemm']:.4f}" if "tinygemm" in t["ms"] and best != "tinygemm" else ""
        print(
            f"M={t['m']:>3} [{t['n']:>5} x {t['k']:>5}] {t['force'] or 'tuned':>6}: {best} {best_ms:.4f} ms "
            f"({nbytes / best_ms / 1e9:.2f} TB/s){tiny}{second}"
        )


def int4_ratios(args, res, cases) -> None:
    """Print (and keep in res) the int4 / bf16 ratio per batch against the issue's targets."""
    rows = {(r["variant"], r["batch"], r["context"]): r for r in res["decode"] if "error" not in r}
    res["int4_vs_bf16"] = []
    print(
        f"\n# {args.int4_scheme} vs bf16 decode (tok/s ratios; step = DecodeEngine.step, fwd = the decode module alone, "
        "gpu = graph replay)"
    )
    print(
        f"{'batch':>5} {'ctx':>5} {'bf16 ms':>8} {'int4 ms':>8} {'bf16 tok/s':>10} {'int4 tok/s':>10} "
        f"{'step x':>7} {'fwd x':>6} {'gpu x':>6} {'int4 floor':>10}  target"
    )
    for b, ctx in cases:
        f, q = rows.get(("fast", b, ctx)), rows.get((args.int4_scheme, b, ctx))
        if not f or not q:
            print(f"{b:>5} {ctx:>5} missing")
            continue
        r = {
            "batch": b,
            "context": ctx,
            "bf16_ms": f["ms_per_step"],
            "int4_ms": q["ms_per_step"],
            "step_ratio": round(f["ms_per_step"] / q["ms_per_step"], 3),
            "forward_ratio": round(f["forward_ms"] / q["forward_ms"], 3),
            "gpu_ratio": round(f["gpu_ms"] / q["gpu_ms"], 3) if f.get("gpu_ms") and q.get("gpu_ms") else None,
            "int4_floor_ms": q["floor_ms"],
            "target": INT4_TARGETS.get(b),
        }
        res["int4_vs_bf16"].append(r)
        tgt = r["target"]
        verdict = "" if tgt is None else f">= {tgt}: {'met' if r['step_ratio'] >= tgt else 'MISSED'}"
        print(
            f"{b:>5} {ctx:>5} {r['bf16_ms']:>8.2f} {r['int4_ms']:>8.2f} {f['tok_per_s']:>10.0f} {q['tok_per_s']:>10.0f} "
            f"{r['step_ratio']:>7.2f} {r['forward_ratio']:>6.2f} {r['gpu_ratio'] or 0:>6.2f} {r['int4_floor_ms']:>10.2f}  "
            f"{verdict}"
        )


if __name__ == "__main__":
    sys.exit(main())
