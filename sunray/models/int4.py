"""The fast CUDA path of 4-bit group-wise weights (W4A16, bf16 activations) behind `quant.linear.QuantLinear`.

One packed copy of each weight, in PyTorch's tinygemm layout (`torch.ops.aten._convert_weight_to_int4pack`), serves
two kernels:
- tinygemm (`torch.ops.aten._weight_int4pack_mm`), near the memory bandwidth at M = 1..4, slow from M = 16 on;
- a Triton GEMM (`int4_triton.py`: weights unpacked in registers straight into the tensor cores' A operand, split-k
  reduced in the kernel), for larger M.
Which one runs for a given (M bucket, n, k) is decided once, by timing tinygemm (up to M = 16) and a short list of
Triton configurations (`triton_candidates`) with CUDA events on the device, the first time that shape is seen outside
a CUDA graph capture (`SUNRAY_INT4_TUNE=0`: a fixed rule instead, tinygemm up to M = 4, the first candidate above);
a Triton candidate whose output disagrees with tinygemm's is logged and never used. A decode step's CUDA graph then
replays whatever was chosen. Tuning cost: per new (M bucket, weight shape) 4-10 candidates, each compiled once per
process (Triton's cache) and timed over 10 calls with the L2 flushed, a few ms each once compiled.

Conventions. Our `quantize_int4` stores, per group of `group` input channels of an output row, a scale s and an
integer zero point z: w = (q - z) * s, q in 0..15, two values a byte, low nibble first. tinygemm computes
w = (q - 8) * scale + zero, and takes the bytes with the even k in the high nibble. So packing swaps the nibbles
and passes scale = s, zero = (8 - z) * s (exact in float32, then rounded to bf16 once); the dequantized weights of the
fast path equal the reference `dequantize` within two bf16 roundings of the weight and the zero's rounding, up to
2^-8 * |8 - z| * s (tests/gpu/test_int4_gpu.py derives the bound). Shapes: group 32, 64, 128 or 256; in_features a
multiple of the group; out_features a multiple of 8. inner_k_tiles = min(8, group / 16), so that one k-super-tile of
the layout (inner_k_tiles * 16 values) never straddles two groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics

import torch

from sunray.models import int4_triton
from sunray.models.fused_ops import HAS_TRITON, use_triton
from sunray.models.quant.formats import unpack_int4

log = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_MAX_M = 4  # the fixed rule's switch to Triton (tuning decides otherwise)
TINYGEMM_TUNE_MAX_M = 16  # tinygemm is timed against Triton up to this bucket (far slower above)
TUNE_MAX_M = 256  # buckets above this are not timed (prefill sizes): the fixed rule picks
_TUNE = os.environ.get("SUNRAY_INT4_TUNE", "1") != "0"


def inner_k_tiles(group: int) -> int:
    return min(8, group // 16)


@dataclasses.dataclass
class Int4Weight:
    """A packed int4 weight [n, k] (several concatenated along n when fused) on one device."""

    packed: torch.Tensor  # int32, tinygemm layout [n / 8, k / (inner * 16), 32, inner / 2]
    scales_zeros: torch.Tensor  # [k / group, n, 2]: scale, zero (bf16 on CUDA)
    bias: torch.Tensor | None
    n: int
    k: int
    group: int

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        b = self.packed.numel() * 4 + self.scales_zeros.numel() * self.scales_zeros.element_size()
        return b + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def fast_device(device: torch.device) -> bool:
    """Whether layers on `device` can take the fast path at all (CUDA; tests may widen it)."""
    return device.type == "cuda"


def tinygemm_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch.ops.aten, "_weight_int4pack_mm")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def unsupported_reason(
    n: int, k: int, group: int | None, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why the fast path cannot take this weight (None: it can)."""
    if device.type != "cuda":
        return "not on a CUDA device"
    if dtype != torch.bfloat16:
        return f"dtype {str(dtype).removeprefix('torch.')} (the fast path takes bfloat16)"
    if group not in GROUP_SIZES:
        return f"group size {group} (tinygemm takes {', '.join(map(str, GROUP_SIZES))})"
    if k % group:
        return f"in_features {k} is not a multiple of the group size {group}"
    if n % 8:
        return f"out_features {n} is not a multiple of 8"
    if not tinygemm_available(device):
        return "no tinygemm on this device (needs torch >= 2.5 and compute capability >= 8.0)"
    return None


_LOGGED: set[str] = set()


def log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


# -- packing ------------------------------------------------------------------------------------------------------
def tinygemm_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """Our [n, k / 2] bytes (low nibble = even k) -> tinygemm's (high nibble = even k)."""
    return ((qweight << 4) | (qweight >> 4)).contiguous()


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, groups] scale s and integer zero point z (w = (q - z) s) -> tinygemm's [groups, n, 2] (scale, (8 - z) s)."""
    s = scales.float()
    sz = torch.stack((s, (8.0 - zeros.float()) * s), dim=-1)  # [n, groups, 2]
    return sz.transpose(0, 1).contiguous().to(dtype)


def pack(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    k: int,
    device: torch.device | str,
    bias: torch.Tensor | None = None,
    sz_dtype: torch.dtype | None = None,
) -> Int4Weight:
    """Pack our int4 format (`quant.formats.quantize_int4`'s qweight, scales, zeros) for the fast path on `device`.

    On CUDA with the aten op (what tinygemm reads); elsewhere with `int4_triton.pack_reference`, the same layout in
    plain torch (for the Triton kernel under the interpreter)."""
    device = torch.device(device)
    n = qweight.shape[0]
    if group not in GROUP_SIZES or k % group or n % 8 or qweight.shape[1] * 2 != k:
        raise ValueError(
            f"int4 fast path: unsupported weight [{n} x {k}] group {group} (qweight {tuple(qweight.shape)})"
        )
    inner = inner_k_tiles(group)
    q = qweight.to(device)
    sz = scales_and_zeros(
        scales.to(device),
        zeros.to(device),
        sz_dtype or (torch.bfloat16 if device.type == "cuda" else scales.dtype),
    )
    if device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(q), inner)
    else:
        packed = int4_triton.pack_reference(unpack_int4(q), inner)
    return Int4Weight(packed, sz, None if bias is None else bias.to(device), n, k, group)


def dequantize_packed(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [n, k] the packed form stands for, as the kernels compute it ((q - 8) * scale + zero, float32
    arithmetic, rounded once to `dtype`). For tests."""
    q = int4_triton.unpack_reference(w.packed, w.n, w.k).float().view(w.n, w.k // w.group, w.group)
    sz = w.scales_zeros.float().transpose(0, 1)  # [n, groups, 2]
    return ((q - 8.0) * sz[..., :1] + sz[..., 1:]).view(w.n, w.k).to(dtype)


# -- dispatch -----------------------------------------------------------------------------------------------------
TINYGEMM = "tinygemm"
_FORCE: str | None = None  # "tinygemm" or "triton": tests and micro-benchmarks
_CHOICES: dict[tuple, object] = {}
TUNING: list[dict] = []  # what tuning measured and chose, for benchmarks to report


@contextlib.contextmanager
def force(kind: str | None):
    """Run one kernel only ("tinygemm" or "triton"; None: the tuned choice) inside the block."""
    global _FORCE
    if kind not in (None, TINYGEMM, "triton"):
        raise ValueError(f"unknown int4 kernel {kind!r}")
    old, _FORCE = _FORCE, kind
    try:
        yield
    finally:
        _FORCE = old


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


# (bn, num_warps, scale_after, num_stages) per row-tile size bm, the fixed rule's pick first. The weight tile [bn,
# k-super-tile] is the tensor cores' A side (bn >= 64); bm rows of x the N side. scale_after saves the per-weight bf16
# math and pays a float32 epilogue per step of bm * bn: worth it at small bm only. Registers, shared memory and SASS
# of the 3-stage shapes checked offline (Triton 3.6, sm_90a): no spills, 2.4 to 4.4 instructions a weight in the main
# loop. The deeper pipelines at bm 16 keep more weight bytes in flight per SM: at M <= 16 the product is memory-bound
# and ran at 58% of the copy rate on an H100 (docs/results/gpu-notes.md).
_SHAPES = {
    16: [
        (128, 4, True, 3),
        (128, 4, False, 3),
        (64, 4, False, 3),
        (256, 8, True, 3),
        (256, 8, False, 3),
        (256, 8, True, 4),
        (128, 4, True, 5),
    ],
    32: [(128, 4, False, 3), (128, 4, True, 3), (64, 4, False, 3), (256, 8, False, 3)],
    64: [(128, 4, False, 3), (128, 8, False, 3), (256, 8, False, 3), (64, 4, False, 3)],
    128: [(128, 8, False, 3), (256, 8, False, 3)],
}
# Timed beside the bm 128 shapes at the 256-row bucket (a decode batch of 129..256): one row tile holds the whole
# batch, so each weight tile is unpacked once instead of twice, and the tensor cores' N side is 256. Never the fixed
# rule's pick (x's [256, k-super-tile] tile is 64 KB a stage: 2 or 3 stages, and a GPU with less shared memory refuses
# them; the tuner skips what does not compile). bn 128 with 8 warps keeps the accumulator at 128 registers a thread.
_SHAPES_256 = [(128, 8, False, 2), (128, 8, False, 3)]


def _split_for(tiles: int, ks: int, sms: int) -> int:
    """Splits of k for a grid of `tiles` output tiles: up to about two programs per SM, each split keeping at least
    two k-super-tiles, at most 16 (the kernel takes the largest divisor of ks up to this)."""
    split = 1
    while tiles * split * 2 <= 2 * sms and ks // (split * 2) >= 2 and split < 16:
        split *= 2
    return split


def triton_candidates(m: int, n: int, k: int, group: int, sms: int) -> list[int4_triton.TritonConfig]:
    """Triton configurations worth timing for an M-row product (the first is the fixed rule's pick): a few tile
    shapes per M bucket, each with the split-k that fills the GPU, the first two also with twice that split."""
    ks = k // (inner_k_tiles(group) * 16)
    mb = _bucket(m)
    bm = 16 if mb <= 16 else min(mb, 128)
    out = []
    for i, (bn, warps, after, stages) in enumerate(_SHAPES[bm]):
        tiles = -(-m // bm) * -(-n // bn)
        # prefill-sized M (the fixed rule, untimed): enough tiles already, and no split-k workspace per thread
        split = _split_for(tiles, ks, sms) if mb <= TUNE_MAX_M else 1
        splits = [split] + ([split * 2] if i < 2 and ks // (split * 2) >= 2 and mb <= TUNE_MAX_M else [])
        for sp in splits:
            c = int4_triton.TritonConfig(bm, bn, int4_triton.split_plan(ks, sp)[1], warps, stages, after)
            if c not in out:
                out.append(c)
    if 64 < mb <= TUNE_MAX_M:  # also the smaller row tile
        split = int4_triton.split_plan(ks, _split_for(-(-m // 64) * -(-n // 128), ks, sms))[1]
        out.append(int4_triton.TritonConfig(64, 128, split, 4))
    if 128 < mb <= TUNE_MAX_M:  # and the row tile that holds the whole bucket
        for bn, warps, after, stages in _SHAPES_256:
            split = int4_triton.split_plan(ks, _split_for(-(-m // 256) * -(-n // bn), ks, sms))[1]
            out.append(int4_triton.TritonConfig(256, bn, split, warps, stages, after))
    return out


def _run(choice, x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    if choice == TINYGEMM:
        return torch.ops.aten._weight_int4pack_mm(x, w.packed, w.group, w.scales_zeros)
    return int4_triton.w4a16_matmul(x, w.packed, w.scales_zeros, w.n, w.group, choice)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _can_time(device: torch.device) -> bool:
    return device.type == "cuda"


_FLUSH: dict[torch.device, torch.Tensor] = {}


def _time_ms(fn, device: torch.device, reps: int = 10) -> float:
    """Median GPU time of fn, the L2 flushed before each call (a decode step reads every weight from memory)."""
    if device not in _FLUSH:
        # A plain tensor even when the first tuning runs under torch.inference_mode: an inference tensor could not
        # be zeroed in place by a later tuning outside it (the bug that made every Triton candidate "fail").
        with torch.inference_mode(False):
            _FLUSH[device] = torch.empty(64 << 20, dtype=torch.int32, device=device)  # 256 MB, past any L2
    flush = _FLUSH[device]
    fn()
    fn()
    events = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in events)


def _decide(mb: int, w: Int4Weight, dtype: torch.dtype):
    dev = w.device
    tiny_ok = tinygemm_available(dev) and dtype == torch.bfloat16
    triton_ok = HAS_TRITON and (dev.type == "cuda" or use_triton(w.packed))
    tri = triton_candidates(mb, w.n, w.k, w.group, _num_sms(dev)) if triton_ok and _FORCE != TINYGEMM else []
    tiny = [TINYGEMM] if tiny_ok and _FORCE != "triton" else []
    if not tri and not tiny:
        raise RuntimeError(f"no int4 kernel for {_FORCE or 'any'} on {dev} ({dtype})")
    if _FORCE == TINYGEMM or not tri:
        return TINYGEMM
    rule = TINYGEMM if tiny and mb <= TINYGEMM_MAX_M else tri[0]
    if not _TUNE or not _can_time(dev) or mb > TUNE_MAX_M or _capturing():
        return rule
    cands = (tiny if mb <= TINYGEMM_TUNE_MAX_M else []) + tri
    x = torch.randn((mb, w.k), device=dev, dtype=dtype)
    ref = _run(TINYGEMM, x, w).float() if tiny_ok else None  # each Triton candidate must agree with tinygemm
    times = {}
    for c in cands:
        try:
            if ref is not None and c != TINYGEMM:
                err = float((_run(c, x, w).float() - ref).norm() / ref.norm().clamp_min(1e-30))
                if not err < 2e-2:  # also NaN
                    log_once(
                        f"int4 {c} disagrees with tinygemm for [{w.n} x {w.k}] at M={mb} (relative error "
                        f"{err:.2e}): not used"
                    )
                    continue
            times[c] = _time_ms(lambda c=c: _run(c, x, w), dev)
        except Exception as e:  # a tile shape that does not compile here: skip it
            log_once(f"int4 {c} failed for [{w.n} x {w.k}] at M={mb}: {e!r}"[:500])
    if not times:
        return TINYGEMM if tiny else rule
    best = min(times, key=times.get)
    TUNING.append(
        {
            "m": mb,
            "n": w.n,
            "k": w.k,
            "group": w.group,
            "force": _FORCE,
            "choice": str(best),
            "ms": {str(c): round(t, 4) for c, t in times.items()},
        }
    )
    log.info("int4 M=%d [%d x %d] g%d: %s (%.4f ms)", mb, w.n, w.k, w.group, best, times[best])
    return best


def choice_for(m: int, w: Int4Weight, dtype: torch.dtype = torch.bfloat16):
    """The kernel (TINYGEMM or a TritonConfig) that runs an M-row product with `w`."""
    key = (_bucket(m), w.n, w.k, w.group, w.device, dtype, _FORCE)
    c = _CHOICES.get(key)
    if c is None:
        c = _decide(key[0], w, dtype)
        if not _capturing():
            _CHOICES[key] = c
    return c


def linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., k] @ w^T (+ bias) -> [..., n], on the fast path (no host sync, no allocation but the output: CUDA-graph
    safe once `choice_for` has seen this M bucket)."""
    shape = x.shape
    x2 = x.reshape(-1, w.k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        y = x2.new_empty((0, w.n))
    else:
        y = _run(choice_for(x2.shape[0], w, x2.dtype), x2, w)
    if w.bias is not None:
        y = y + w.bias
    return y.view(*shape[:-1], w.n)
