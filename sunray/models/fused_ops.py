"""Fused elementwise ops of the decoder's fast path: RMSNorm (with the residual add folded in), RoPE on q and k,
SiLU-and-multiply.

On CUDA each op is one Triton kernel instead of the 5-12 small torch kernels of the reference modules; that matters
for decode, where a step is memory-bound and hundreds of tiny launches would otherwise add milliseconds. Every op
has a plain torch fallback with the reference modules' arithmetic, used on the CPU (and wherever Triton is missing),
so the fused path can be tested anywhere. `TRITON_INTERPRET=1` routes CPU tensors through the kernels too.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # triton is optional: the CPU machine has none
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for a tensor on this device (CUDA, or any device under the interpreter)."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        x_stride,
        r_stride,
        out_stride,
        res_stride,
        N,
        eps,
        mult,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            # residual + branch * mult, rounded to the activation dtype as the reference's `x + h` is
            r = tl.load(r_ptr + row * r_stride + offs, mask=mask, other=0.0).to(tl.float32)
            s = (r + x * mult).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * res_stride + offs, s, mask=mask)
            x = s.to(tl.float32)
        var = tl.sum(x * x, axis=0) / N
        y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        out = y.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * out_stride + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        qo_ptr,
        ko_ptr,
        q_stride,
        k_stride,
        cos_stride,
        H: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs = tl.arange(0, HALF)
        c = tl.load(cos_ptr + pos * cos_stride + offs).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * cos_stride + offs).to(tl.float32)[None, :]

        h = tl.arange(0, BLOCK_H)
        mh = (h < H)[:, None]
        src = q_ptr + t * q_stride + h[:, None] * D + offs[None, :]
        x1 = tl.load(src, mask=mh, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mh, other=0.0).to(tl.float32)
        dst = qo_ptr + t * (H * D) + h[:, None] * D + offs[None, :]
        tl.store(dst, (x1 * c - x2 * s).to(qo_ptr.dtype.element_ty), mask=mh)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(qo_ptr.dtype.element_ty), mask=mh)

        hk = tl.arange(0, BLOCK_HK)
        mk = (hk < HK)[:, None]
        src = k_ptr + t * k_stride + hk[:, None] * D + offs[None, :]
        x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mk, other=0.0).to(tl.float32)
        dst = ko_ptr + t * (HK * D) + hk[:, None] * D + offs[None, :]
        tl.store(dst, (x1 * c - x2 * s).to(ko_ptr.dtype.element_ty), mask=mk)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(ko_ptr.dtype.element_ty), mask=mk)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * x_stride + N + offs, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * out_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D tensor whose last dimension is contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, exactly as `decoder.RMSNorm` computes it (float32 statistics)."""
    if not use_triton(x):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    x2 = _rows(x)
    n = x2.shape[-1]
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = _next_pow2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        x2,
        weight,
        out,
        out,
        x2.stride(0),
        x2.stride(0),
        out.stride(0),
        out.stride(0),
        n,
        eps,
        1.0,
        HAS_RES=False,
        BLOCK=block,
        num_warps=_norm_warps(block),
    )
    return out.view(x.shape)


def add_rms_norm(
    branch: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, mult: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + branch * mult), residual + branch * mult): a decoder layer's residual add and the next
    norm in one pass over the activations."""
    if not use_triton(branch):
        s = residual + branch * mult if mult != 1.0 else residual + branch
        return rms_norm(s, weight, eps), s
    b2, r2 = _rows(branch), _rows(residual)
    n = b2.shape[-1]
    out = torch.empty(b2.shape, dtype=torch.promote_types(residual.dtype, weight.dtype), device=b2.device)
    res_out = torch.empty(r2.shape, dtype=residual.dtype, device=b2.device)
    block = _next_pow2(n)
    _rms_norm_kernel[(b2.shape[0],)](
        b2,
        r2,
        weight,
        out,
        res_out,
        b2.stride(0),
        r2.stride(0),
        out.stride(0),
        res_out.stride(0),
        n,
        eps,
        float(mult),
        HAS_RES=True,
        BLOCK=block,
        num_warps=_norm_warps(block),
    )
    return out.view(residual.shape), res_out.view(residual.shape)


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [tokens, heads, dim] and k [tokens, kv_heads, dim] (any row stride, heads contiguous);
    returns new contiguous q and k. cos/sin: [max_positions, dim] tables of `RotaryEmbedding`."""
    n, h, d = q.shape
    hk = k.shape[1]
    fits = q.stride(2) == 1 and q.stride(1) == d and k.stride(2) == 1 and k.stride(1) == d and d % 2 == 0
    if not (use_triton(q) and fits and d & (d - 1) == 0):
        c = cos[positions].unsqueeze(1).to(q.dtype)
        s = sin[positions].unsqueeze(1).to(q.dtype)
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    qo = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((n, hk, d), dtype=k.dtype, device=k.device)
    if n == 0:
        return qo, ko
    _rope_kernel[(n,)](
        q,
        k,
        positions,
        cos,
        sin,
        qo,
        ko,
        q.stride(0),
        k.stride(0),
        cos.stride(0),
        H=h,
        HK=hk,
        D=d,
        HALF=d // 2,
        BLOCK_H=_next_pow2(h),
        BLOCK_HK=_next_pow2(hk),
        num_warps=4,
    )
    return qo, ko


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up where gate_up = [gate | up] along the last dimension (the fused gate/up projection)."""
    n = gate_up.shape[-1] // 2
    if not use_triton(gate_up):
        return F.silu(gate_up[..., :n]) * gate_up[..., n:]
    x2 = _rows(gate_up)
    out = torch.empty((x2.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], n)
