"""A Triton W4A16 GEMM over tinygemm's packed int4 layout, for the batch sizes where tinygemm is slow (M > 4..8).

PyTorch's tinygemm (`torch.ops.aten._weight_int4pack_mm`) streams the weights near the memory bandwidth at M = 1
(1.9 TB/s on an H100) but dequantizes every weight tile once per 16 rows of M, so it falls to 0.6 TB/s at M = 16
and 0.15 TB/s at M = 64. This kernel reads the *same* packed tensor (one copy of the weights serves both) and is
built to stay memory-bound up to M = 64 and beyond:

- Swapped operands. It computes C^T = W @ X^T: the dequantized weight tile [BN, BK] is the tensor cores' A operand,
  taken straight from registers (Hopper wgmma takes A from registers; BN >= 64 is its M side), and the small
  activation tile X [BM, BK] is the B operand (BM >= 16 is its N side), loaded by cp.async into shared memory.
  The weights never go through shared memory after the load, and x = 16 rows pads nothing.
- The layout does the shuffling. In tinygemm's layout each lane's words already hold the (k, k + 1) pairs of the
  tensor-core fragments, so the [BN, 2 * inner] word tile (a warp reads whole 512-byte n-tiles, 16-byte vectors) is
  unpacked, pair by pair, straight into registers of the operand layout; the reshape/permute to k order below is a
  relabelling of registers (Triton's linear layouts), no data movement.
- Cheap unpacking. One shift and one lop3 per pair of weights: (w >> 4p) & 0x000F000F | 0x43004300 are two bf16
  numbers 128 + q (the magic-number trick of FasterTransformer / Marlin / tinygemm); no int-to-float conversion
  (I2F runs at a quarter of the ALU rate), no 16-bit repacking (the lop3 is inline PTX; under the interpreter the
  same bits go through int16). Then either `(128 + q - 136) * scale + zero` in packed bf16 (tinygemm's arithmetic:
  one HADD2 + one HFMA2 per two weights) before the product, or (`scale_after`) the raw 128 + q into the product
  and scale * acc + (zero - 136 * scale) * sum_k(x) per group after it, in float32 (no per-weight float math).
- Split-k without extra launches: each of a tile's splits writes its float32 partial to a workspace, and the last
  to finish (a per-tile counter, acquire/release) sums them in split order, writes C and re-arms the counter; one
  kernel per product, CUDA-graph safe (the workspace is allocated before capture and never freed).
- Pipelining by Triton (num_stages): weights, activations and scales are all cp.async loads.

The layout (`torch.ops.aten._convert_weight_to_int4pack(w_uint8 [n, k / 2], inner_k_tiles)`, CUDA, torch >= 2.5):
int32 [n / 8, k / (inner * 16), 32, inner / 2]. For weight element (n, k), with inner = inner_k_tiles:
- n-tile n // 8 and row n % 8 within it; k-super-tile k // (inner * 16) and kk = k % (inner * 16) within it;
- lane t = (n % 8) * 4 + t4, word j of the lane, nibble p of the word, where
  kk = (2 * j + tsel) * 16 + half * 8 + t4 * 2 + lohi and p = lohi * 4 + tsel * 2 + half;
- the value stored is q in 0..15 and the weight is (q - 8) * scale + zero, scale and zero from
  scales_and_zeros [k / group, n, 2].
So the 16 * inner words of one (n-tile, k-super-tile) are contiguous, and so are the 2 * inner words of row n % 8
(word w = t4 * inner / 2 + j); nibbles p and p + 4 of a word are neighbours in k. Each k-super-tile lies in one
quantization group (the packer picks inner = min(8, group / 16)), so one scale and zero per row per step.

`pack_reference` / `unpack_reference` build and read the layout with plain torch ops (CPU tests, and the GPU test that
checks them against the aten op); `w4a16_matmul` launches the kernel (CUDA, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from sunray.models.fused_ops import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl


# -- the layout, in torch -----------------------------------------------------------------------------------------
def _layout_view(n: int, k: int, inner: int) -> tuple[int, ...]:
    # (n-tile, n8, k-super, j, tsel, half, t4, lohi): k = ks * inner * 16 + (2 j + tsel) * 16 + half * 8 + t4 * 2 + lohi
    return (n // 8, 8, k // (inner * 16), inner // 2, 2, 2, 4, 2)


# From the view above to (n-tile, k-super, n8, t4, j, lohi, tsel, half): lane t = n8 * 4 + t4, nibble p = (lohi, tsel, half)
_TO_PACKED = (0, 2, 1, 6, 3, 7, 4, 5)


def check_layout_shape(n: int, k: int, inner: int) -> None:
    if inner not in (2, 4, 8):
        raise ValueError(f"inner_k_tiles must be 2, 4 or 8, got {inner}")
    if n % 8 or k % (inner * 16):
        raise ValueError(f"int4 layout needs n % 8 == 0 and k % {inner * 16} == 0, got n={n}, k={k}")


def pack_reference(q: torch.Tensor, inner: int) -> torch.Tensor:
    """q: [n, k] values 0..15 (any integer dtype) -> the int32 tinygemm layout [n / 8, k / (inner * 16), 32, inner / 2]."""
    n, k = q.shape
    check_layout_shape(n, k, inner)
    nib = q.to(torch.int64).view(_layout_view(n, k, inner)).permute(_TO_PACKED)
    nib = nib.reshape(n // 8, k // (inner * 16), 32, inner // 2, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (nib << shifts).sum(-1)  # distinct bits: the sum is an or; 0 .. 2**32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_reference(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack_reference`: [n, k] uint8 values 0..15."""
    inner = packed.shape[-1] * 2
    check_layout_shape(n, k, inner)
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nib = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # [nt, ks, 32, inner / 2, 8]
    v = _layout_view(n, k, inner)
    # (nt, ks, n8, t4, j, lohi, tsel, half)
    nib = nib.reshape(n // 8, k // (inner * 16), 8, 4, inner // 2, 2, 2, 2)
    inverse = [_TO_PACKED.index(i) for i in range(len(_TO_PACKED))]
    return nib.permute(inverse).reshape(v).reshape(n, k).to(torch.uint8)


def unpacked_k(inner: int) -> torch.Tensor:
    """k (within a k-super-tile) of the kernel's unpacked values [word w, pair p, half h] of one weight row (before
    its reshape): word w = t4 * inner / 2 + j, pair p = tsel * 2 + half (nibbles p and p + 4 of the word), h = lohi."""
    w = torch.arange(2 * inner)[:, None, None]
    p = torch.arange(4)[None, :, None]
    h = torch.arange(2)[None, None, :]
    t4, j = w // (inner // 2), w % (inner // 2)
    tsel, half = p // 2, p % 2
    return 32 * j + 16 * tsel + 8 * half + 2 * t4 + h


# -- the kernel -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TritonConfig:
    bm: int  # rows of x per program (16..128): the N side of the tensor-core product
    bn: int  # output columns (weight rows) per program: the M side of the product, a multiple of 64
    split_k: int  # programs along k (partial sums reduced in the kernel by the last one to finish)
    num_warps: int
    num_stages: int = 3
    # scale after the product (dot with the raw 128 + q, then s * acc + (zero - 136 s) * sum(x) per group, in
    # float32) instead of dequantizing the weights to bf16 before it
    scale_after: bool = False

    def __str__(self) -> str:
        a = " after" if self.scale_after else ""
        return f"triton bm={self.bm} bn={self.bn} split={self.split_k} warps={self.num_warps} stages={self.num_stages}{a}"


if HAS_TRITON:

    @triton.jit
    def _unpack_pairs(words, NATIVE: tl.constexpr):
        """words [R, W] int32 -> [R, W, 4, 2] bf16 of value 128 + q: pair p of a word holds its nibbles p (low half of
        the pair) and p + 4 (high half), the two neighbouring k of tinygemm's layout (the bf16 bits 0x4300 | q)."""
        shifts = tl.arange(0, 4) * 4
        v = words[:, :, None] >> shifts[None, None, :]
        if NATIVE:
            # one lop3 a pair ((v & 0x000F000F) | 0x43004300), the result already two packed bf16 (what the tensor
            # cores take): no 16-bit unpacking and repacking
            b = tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;",
                "=r,r,r",
                [tl.join(v, v)],
                dtype=tl.bfloat16,
                is_pure=True,
                pack=2,
            )
        else:  # the interpreter runs no PTX: the same bits through int16, then float32 (its bf16 math is unusable)
            v = (v & 0x000F000F) | 0x43004300
            b = tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)).to(tl.bfloat16, bitcast=True).to(tl.float32)
        return b

    @triton.jit(do_not_specialize=["M", "ks_per_split", "num_splits"])
    def _w4a16_kernel(
        a_ptr,
        b_ptr,
        sz_ptr,
        c_ptr,
        ws_ptr,
        cnt_ptr,
        M,
        N,
        stride_am,
        stride_cm,
        KS,
        ks_per_split,
        num_splits,
        INNER: tl.constexpr,
        GROUP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        SPLIT: tl.constexpr,
        AFTER: tl.constexpr,
        NATIVE: tl.constexpr,
    ):
        """C^T[BN, BM] tile = W[BN, K-range] @ X[BM, K-range]^T (weights as the tensor cores' A operand, from registers;
        x as B, through shared memory), one k-super-tile (INNER * 16 values, inside one quantization group) a step."""
        BK: tl.constexpr = INNER * 16
        W: tl.constexpr = INNER * 2  # int32 words of one weight row per super-tile
        HALF: tl.constexpr = INNER // 2
        pid_m = tl.program_id(0)  # fastest: programs sharing a weight tile run together
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # Row n's words of super-tile ks: (n // 8 * KS + ks) * 16 * INNER + (n % 8) * W + w (64 contiguous bytes for
        # INNER 8: four 16-byte vectors a row, a warp reading whole 512-byte n-tiles)
        rows = (offs_n // 8).to(tl.int64) * KS * (16 * INNER) + (offs_n % 8) * W
        b_ptrs = b_ptr + rows[:, None] + tl.arange(0, W)[None, :]
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + tl.arange(0, BK)[None, :]
        # (scale, zero) of group g: [BN, 2] bf16, 2 * BN elements (at least one per thread: Triton then keeps this
        # load coalesced instead of re-doing it in the consumer's layout)
        sz_ptrs = sz_ptr + offs_n[:, None] * 2 + tl.arange(0, 2)[None, :]

        ks0 = pid_k * ks_per_split  # the splits divide the super-tiles evenly
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for ks in range(ks0, ks0 + ks_per_split):
            words = tl.load(b_ptrs + ks * (16 * INNER), mask=mask_n[:, None], other=0)
            b = _unpack_pairs(words, NATIVE)  # [BN, W = (t4, j), 4 = (tsel, half), 2 = lohi]
            # k = 32 j + 16 tsel + 8 half + 2 t4 + lohi: to k order, a relabelling of registers
            b = tl.reshape(b, (BN, 4, HALF, 2, 2, 2))
            b = tl.permute(b, (0, 2, 3, 4, 1, 5))
            b = tl.reshape(b, (BN, BK))
            a = tl.load(a_ptrs + ks * BK, mask=mask_m[:, None], other=0.0)
            if not NATIVE:
                a = a.to(tl.float32)
            g = (ks * BK) // GROUP
            s, z = tl.split(tl.load(sz_ptrs + g * N * 2, mask=mask_n[:, None], other=0.0))
            if AFTER:
                sf = s.to(tl.float32)
                zf = z.to(tl.float32) - 136.0 * sf
                xs = tl.sum(a.to(tl.float32), axis=1)
                p = tl.dot(b, tl.trans(a))  # sum_k (128 + q) x: exact products, float32 sums
                acc += p * sf[:, None] + zf[:, None] * xs[None, :]
            elif NATIVE:
                # tinygemm's arithmetic: (128 + q) - 136 exact, then one rounding of (q - 8) * scale + zero
                w = tl.fma(b - 136.0, s[:, None], z[:, None])
                acc = tl.dot(w, tl.trans(a), acc)
            else:
                w = (b - 136.0) * s.to(tl.float32)[:, None] + z.to(tl.float32)[:, None]
                acc = tl.dot(w, tl.trans(a), acc)

        c_ptrs = c_ptr + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None]
        c_mask = mask_n[:, None] & mask_m[None, :]
        if SPLIT:
            # Each split writes its float32 partial tile; the last of a tile's splits to arrive (a counter per tile)
            # adds them up in split order (deterministic), writes C and re-arms the counter for the next launch.
            tile = pid_m * tl.num_programs(1) + pid_n
            offs_t = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
            base = ws_ptr + tile.to(tl.int64) * num_splits * (BN * BM)
            tl.store(base + pid_k * (BN * BM) + offs_t, acc)
            tl.debug_barrier()  # every thread's partial is written before the counter says so
            count = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if count == num_splits - 1:
                total = tl.zeros((BN, BM), dtype=tl.float32)
                for j in range(num_splits):
                    total += tl.load(base + j * (BN * BM) + offs_t, cache_modifier=".cg")
                tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=c_mask)
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# -- split-k workspace ------------------------------------------------------------------------------------------------
# Per (device, thread): float32 partial tiles and int32 tile counters (zero between launches: the last program of a
# tile re-arms its counter). A CUDA graph keeps the pointers it was captured with, so a workspace, once handed out,
# is never freed (growing allocates a new one and keeps the old). Kernels on one thread run in stream order; another
# thread (a prefill engine beside the decode loop) gets its own, so concurrent launches never share one.
_WORKSPACES: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A workspace at least this large for the calling thread on `device`; None if that would need an allocation
    during a CUDA graph capture (the caller then runs without split-k)."""
    key = (device, threading.get_ident())
    held = _WORKSPACES.setdefault(key, [])
    if held and held[-1][0].numel() >= floats and held[-1][1].numel() >= counters:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if held:
        floats, counters = max(floats, 2 * held[-1][0].numel()), max(counters, 2 * held[-1][1].numel())
    with torch.inference_mode(False):  # plain tensors, whatever mode the first call runs in
        ws = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(counters, 1024), dtype=torch.int32, device=device)
    held.append((ws, cnt))
    return held[-1]


def split_plan(ks: int, split: int) -> tuple[int, int]:
    """(super-tiles per split, splits): the largest number of splits up to `split` that divides the ks super-tiles."""
    split = max(1, min(split, ks))
    while ks % split:
        split -= 1
    return ks // split, split


def w4a16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    n: int,
    group: int,
    config: TritonConfig,
) -> torch.Tensor:
    """x [M, K] bf16 @ the packed int4 weight [n, K]^T -> [M, n] bf16 (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        raise RuntimeError("the int4 Triton kernel needs triton")
    m, k = x.shape
    inner = packed.shape[-1] * 2
    ks = k // (inner * 16)
    if packed.shape[1] != ks or packed.shape[0] * 8 != n or ks * inner * 16 != k:
        raise ValueError(f"packed weight {tuple(packed.shape)} does not match x {tuple(x.shape)} and n={n}")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the int4 Triton kernel takes bfloat16 activations, got {x.dtype}")
    if x.stride(1) != 1 or x.stride(0) % 8:
        x = x.contiguous()  # 16-byte rows for the vector loads
    sz = scales_zeros if scales_zeros.dtype == torch.bfloat16 else scales_zeros.to(torch.bfloat16)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid_m, grid_n = triton.cdiv(m, config.bm), triton.cdiv(n, config.bn)
    per, split = split_plan(ks, config.split_k)
    ws = cnt = None
    if split > 1:
        got = workspace(x.device, grid_m * grid_n * split * config.bm * config.bn, grid_m * grid_n)
        if got is None:
            per, split = ks, 1
        else:
            ws, cnt = got
    _w4a16_kernel[(grid_m, grid_n, split)](
        x,
        packed,
        sz,
        out,
        out if ws is None else ws,
        packed if cnt is None else cnt,
        m,
        n,
        x.stride(0),
        out.stride(0),
        ks,
        per,
        split,
        INNER=inner,
        GROUP=group,
        BM=config.bm,
        BN=config.bn,
        SPLIT=split > 1,
        AFTER=config.scale_after,
        NATIVE=not INTERPRET,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
