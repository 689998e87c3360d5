"""Triton kernels of the `triton` attention backend: storing new k/v into the paged cache, and paged decode
attention.

Decode attention is flash-decoding: the grid is (sequence, kv head, split). One program serves all the query heads
of one KV head (grouped-query attention reads each K/V tile once for the whole group, padded to 16 rows for the
tensor cores), walks its split of the context in tiles of BLOCK_N tokens through the block table, and keeps an
online softmax. With more than one split a second small kernel merges the splits' partial results. The number of
splits depends only on the batch size, so a decode step can be captured in a CUDA graph; the split boundaries are
computed in the kernel from each sequence's context length. Padded rows (context length 0, slot -1) produce zeros
and write nothing.

The cache layout is `PagedKVCache`'s: one layer is [num_blocks, block_size, kv_heads, head_dim], contiguous.
"""

from __future__ import annotations

import functools

import torch

from sunray.models.fused_ops import HAS_TRITON, INTERPRET, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_N = 64  # tokens per inner step of decode attention


def supported(q: torch.Tensor) -> bool:
    """Whether these kernels handle attention for q [tokens, heads, head_dim] (else use the torch reference)."""
    d = q.shape[-1]
    return (
        use_triton(q)
        and d >= 16
        and d & (d - 1) == 0
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Split the context only while (sequence, kv head) programs are too few to keep every multiprocessor busy:
    4 programs per SM in all, at most 64 splits. Measured on an H100 (docs/results/gpu-notes.md): at batch 64 x
    8 kv heads one split is best (94.8 us a layer vs 104 us with 3); at batch 1, context 8192, 64 splits (19 us vs
    221 us with one); at batch 16, context 4096, 4 (97 us vs 132 us)."""
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 4
    )
    return max(1, min(64, 4 * sms // max(1, batch * kv_heads)))


if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_stride, v_stride, ROW: tl.constexpr, BLOCK: tl.constexpr
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = (offs < ROW) & (slot >= 0)
        k = tl.load(k_ptr + t * k_stride + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + t * v_stride + offs, mask=mask, other=0.0)
        tl.store(kc_ptr + slot * ROW + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * ROW + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _expand_tables_kernel(flat_ptr, starts_ptr, table_ptr, table_stride, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        start = tl.load(starts_ptr + r)
        n = tl.load(starts_ptr + r + 1) - start
        offs = tl.arange(0, BLOCK)
        for j0 in range(0, n, BLOCK):
            j = j0 + offs
            m = j < n
            blocks = tl.load(flat_ptr + start + j, mask=m, other=0)
            tl.store(
                table_ptr + r.to(tl.int64) * table_stride + j, blocks.to(table_ptr.dtype.element_ty), mask=m
            )

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        lens_ptr,
        out_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        q_stride_t,
        q_stride_h,
        bt_stride,
        out_stride_t,
        out_stride_h,
        scale_log2,
        NUM_SPLITS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx_len = tl.load(lens_ptr + b).to(tl.int32)
        per_split = tl.cdiv(tl.cdiv(ctx_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, ctx_len)

        offs_g = tl.arange(0, GROUP_PAD)
        mask_g = offs_g < GROUP
        heads = kvh * GROUP + offs_g
        offs_d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b.to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h + offs_d[None, :],
            mask=mask_g[:, None],
            other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        bt_row = bt_ptr + b.to(tl.int64) * bt_stride
        for n0 in range(start, end, BLOCK_N):
            tok = n0 + offs_n
            mask_n = tok < end
            blk = tl.load(bt_row + tok // PAGE, mask=mask_n, other=0).to(tl.int64)
            kv_off = (blk * PAGE + tok % PAGE) * (HKV * D) + kvh * D
            k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # [GROUP_PAD, BLOCK_N], log2 units
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            dst = out_ptr + b.to(tl.int64) * out_stride_t + heads[:, None] * out_stride_h + offs_d[None, :]
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
        else:
            idx = (b.to(tl.int64) * (HKV * GROUP) + heads) * NUM_SPLITS + split
            tl.store(m_ptr + idx, m_i, mask=mask_g)
            tl.store(l_ptr + idx, l_i, mask=mask_g)
            tl.store(acc_ptr + idx[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])

    @triton.jit
    def _merge_splits_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        out_stride_t,
        out_stride_h,
        H: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        mask_s = offs_s < NUM_SPLITS
        base = (b * H + h) * NUM_SPLITS
        m = tl.load(m_ptr + base + offs_s, mask=mask_s, other=float("-inf"))
        l_s = tl.load(l_ptr + base + offs_s, mask=mask_s, other=0.0)
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # a padded row: every split empty
        w = tl.exp2(m - m_max)
        total = tl.sum(l_s * w, 0)
        offs_d = tl.arange(0, D)
        acc = tl.load(
            acc_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=mask_s[:, None], other=0.0
        )
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(out_ptr + b * out_stride_t + h * out_stride_h + offs_d, out.to(out_ptr.dtype.element_ty))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, dim] with heads and dim packed (any token stride)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()


def expand_block_tables(flat: torch.Tensor, starts: torch.Tensor, table: torch.Tensor) -> None:
    """Row r of `table` [rows, width] gets flat[starts[r]:starts[r + 1]] (the rest of the row is left as it was):
    the host sends all block tables as one flat list, which costs far less Python than a padded 2-D table."""
    rows = table.shape[0]
    if rows:
        _expand_tables_kernel[(rows,)](flat, starts, table, table.stride(0), BLOCK=256, num_warps=2)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [tokens, kv_heads, dim]; k_cache, v_cache: one layer [num_blocks, block_size, kv_heads, dim]; token t
    goes to slot slots[t] (negative: skipped, for padded rows)."""
    n = k.shape[0]
    if n == 0:
        return
    k, v = _inner_contiguous(k), _inner_contiguous(v)
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), ROW=row, BLOCK=_next_pow2(row), num_warps=4
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int = BLOCK_N,
    num_stages: int = 3,
    num_warps: int = 4,
) -> torch.Tensor:
    """One query token per sequence: q [seqs, heads, dim] attends to the first context_lens[i] tokens of sequence
    i, found through block_tables [seqs, max_blocks]. Returns [seqs, heads, dim] in q's dtype."""
    b, h, d = q.shape
    _, page, hkv, dc = k_cache.shape
    assert dc == d and h % hkv == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    group = h // hkv
    splits = num_splits or default_num_splits(b, hkv, q.device)
    if splits > 1:
        m_part = torch.empty((b * h * splits,), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((b * h * splits, d), dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = out  # unused
    _paged_decode_kernel[(b, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m_part,
        l_part,
        acc_part,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale * LOG2E,
        NUM_SPLITS=splits,
        GROUP=group,
        GROUP_PAD=max(16, _next_pow2(group)),
        HKV=hkv,
        D=d,
        PAGE=page,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(b, h)](
            m_part,
            l_part,
            acc_part,
            out,
            out.stride(0),
            out.stride(1),
            H=h,
            NUM_SPLITS=splits,
            SPLITS_PAD=max(2, _next_pow2(splits)),
            D=d,
            num_warps=4,
        )
    return out


__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "default_num_splits",
    "expand_block_tables",
    "paged_decode_attention",
    "store_kv",
    "supported",
]
