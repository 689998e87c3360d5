"""Every int4 kernel the tuner may pick, timed on the Llama-3.1-8B linears: how close each comes to the copy rate.

The tuner keeps the fastest and prints only it (`int4_tuning`). On 2026-12-08 its picks read the packed weights at
58% of the copy rate and none of the deeper pipelines added the day before was picked (docs/results/gpu-notes.md).
This table says whether any tile shape of the family gets near the copy rate (then the tuner or its candidates are
the problem) or none does (then the kernel's design is). CUDA only. From the repository root:

    python3 tests/gpu/int4_candidates.py [--m 1 16 256] [--reps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = {  # the decode module's linears: fused q/k/v, o, fused gate/up, down
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
GROUP = 128


def copy_rate_gbs(device: torch.device) -> float:
    """Device-to-device copy, read + write, GB/s (as `sunray bench decode` measures its floor)."""
    src = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        dst.copy_(src)
    b.record()
    torch.cuda.synchronize(device)
    return 2 * 10 * src.numel() / (a.elapsed_time(b) * 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 256], help="rows of x (decode batch sizes)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "int4_candidates: needs a CUDA GPU (the candidates are Triton and tinygemm kernels)",
            file=sys.stderr,
        )
        return 2
    from sunray.models import int4
    from sunray.models.quant.formats import quantize_int4

    device = torch.device("cuda")
    rate = copy_rate_gbs(device)
    sms = int4._num_sms(device)
    print(
        f"# {torch.cuda.get_device_name(device)}; copy rate {rate:.0f} GB/s; group {GROUP}; L2 flushed per call"
    )
    print(f"{'linear':>8} {'M':>4} {'kernel':<48} {'ms':>8} {'GB/s':>7} {'of copy':>7}  chosen")
    rows = []
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=gen) * 0.02, GROUP)
        w = int4.pack(qweight, scales.to(torch.bfloat16), zeros, GROUP, k, device, sz_dtype=torch.bfloat16)
        for m in a.m:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            chosen = int4.choice_for(m, w, x.dtype)
            kernels = [int4.TINYGEMM] if int4.tinygemm_available(device) else []
            kernels += int4.triton_candidates(m, n, k, GROUP, sms)
            for kern in kernels:
                try:
                    ms = int4._time_ms(lambda kern=kern, x=x, w=w: int4._run(kern, x, w), device, a.reps)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile here
                    print(f"{name:>8} {m:>4} {str(kern):<48} failed: {type(e).__name__}")
                    continue
                gbs = (w.nbytes + x.nbytes + m * n * 2) / (ms * 1e6)
                mark = "*" if kern == chosen else ""
                print(f"{name:>8} {m:>4} {str(kern)[:48]:<48} {ms:8.4f} {gbs:7.0f} {gbs / rate:6.0%}  {mark}")
                rows.append(
                    {"linear": name, "n": n, "k": k, "m": m, "kernel": str(kern), "ms": ms, "gbs": gbs}
                )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(device), "copy_gbs": rate, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
