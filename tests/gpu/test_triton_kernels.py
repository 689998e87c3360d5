"""Each Triton kernel against a float64 reference on fresh random inputs (bf16 on the GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, DTYPE, TOL, rel_err

from sunray.engine import triton_attention as ta
from sunray.models import fused_ops

pytestmark = pytest.mark.gpu


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(device=DEVICE, dtype=DTYPE)


# -- elementwise ops ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,hidden", [(1, 4096), (7, 576), (33, 64)])
def test_rms_norm_and_add(n, hidden):
    x, r = randn(n, hidden, seed=1), randn(n, hidden, seed=2)
    w = randn(hidden, seed=3) + 1
    eps = 1e-5
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w.double()
    assert rel_err(fused_ops.rms_norm(x, w, eps), ref) < TOL
    for mult in (1.0, 0.5):
        s_ref = r.double() + x.double() * mult
        normed_ref = s_ref * torch.rsqrt(s_ref.pow(2).mean(-1, keepdim=True) + eps) * w.double()
        normed, s = fused_ops.add_rms_norm(x, r, w, eps, mult)
        assert rel_err(s, s_ref) < TOL and rel_err(normed, normed_ref) < TOL


@pytest.mark.parametrize("n,h,hk,d", [(1, 32, 8, 128), (5, 9, 3, 64), (17, 4, 4, 32)])
def test_rope_on_strided_qkv(n, h, hk, d):
    qkv = randn(n, (h + 2 * hk) * d, seed=4)
    q = qkv[:, : h * d].view(n, h, d)
    k = qkv[:, h * d : (h + hk) * d].view(n, hk, d)
    max_pos = 4096
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    freqs = torch.outer(torch.arange(max_pos).double(), inv)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)
    pos = torch.randint(0, max_pos, (n,), generator=_gen(5)).to(DEVICE)

    def ref(x):
        c, s = emb.cos()[pos.cpu()].unsqueeze(1), emb.sin()[pos.cpu()].unsqueeze(1)
        x = x.double().cpu()
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat((-x2, x1), -1) * s

    qo, ko = fused_ops.rope_qk(q, k, pos, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    assert rel_err(qo.cpu(), ref(q)) < TOL and rel_err(ko.cpu(), ref(k)) < TOL


@pytest.mark.parametrize("n,inter", [(1, 14336), (6, 1536), (3, 100)])
def test_silu_mul(n, inter):
    gu = randn(n, 2 * inter, seed=6, scale=2.0)
    g, u = gu.double()[:, :inter], gu.double()[:, inter:]
    assert rel_err(fused_ops.silu_mul(gu), g * torch.sigmoid(g) * u) < TOL


# -- paged KV ----------------------------------------------------------------------------------------------------


def make_cache(num_blocks: int, page: int, hkv: int, d: int, seed: int):
    k = randn(num_blocks, page, hkv, d, seed=seed)
    v = randn(num_blocks, page, hkv, d, seed=seed + 1)
    return k, v


def test_store_kv_writes_only_its_slots():
    page, hkv, d, n = 16, 8, 128, 37
    k_cache, v_cache = make_cache(8, page, hkv, d, seed=10)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    qkv = randn(n, (32 + 2 * hkv) * d, seed=12)  # v as the strided view the decoder hands over
    k = randn(n, hkv, d, seed=13)
    v = qkv[:, (32 + hkv) * d :].view(n, hkv, d)
    perm = torch.randperm(8 * page, generator=_gen(14))[:n]
    slots = perm.clone()
    slots[::5] = -1  # padded rows: skipped
    ta.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE))
    kf, vf = k_cache.view(-1, hkv, d).cpu(), v_cache.view(-1, hkv, d).cpu()
    kb, vb = k_before.view(-1, hkv, d).cpu(), v_before.view(-1, hkv, d).cpu()
    written = slots >= 0
    assert torch.equal(kf[slots[written]], k.cpu()[written]) and torch.equal(
        vf[slots[written]], v.cpu()[written]
    )
    untouched = torch.ones(8 * page, dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.equal(kf[untouched], kb[untouched]) and torch.equal(vf[untouched], vb[untouched])


def test_expand_block_tables():
    sizes = [3, 0, 7, 1]
    flat = torch.randint(0, 1000, (sum(sizes),), generator=_gen(15), dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    table = torch.full((4, 9), -5, dtype=torch.int32)
    table_dev = table.to(DEVICE)
    ta.expand_block_tables(flat.to(DEVICE), starts.to(DEVICE), table_dev)
    for r, n in enumerate(sizes):
        table[r, :n] = flat[starts[r] : starts[r] + n]
    assert torch.equal(table_dev.cpu(), table)  # the rest of each row untouched


def reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """float64, one sequence at a time, through the block table."""
    b, h, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        slots = torch.tensor([int(tables[i, p // page]) * page + p % page for p in range(n)])
        k = (
            k_cache.reshape(-1, hkv, d)[slots.to(k_cache.device)]
            .double()
            .cpu()
            .repeat_interleave(h // hkv, 1)
        )
        v = (
            v_cache.reshape(-1, hkv, d)[slots.to(v_cache.device)]
            .double()
            .cpu()
            .repeat_interleave(h // hkv, 1)
        )
        s = torch.einsum("hd,nhd->hn", q[i].double().cpu(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


CASES = [
    # batch, context lengths, heads, kv heads, head_dim, page, splits
    (1, [1], 32, 8, 128, 16, None),
    (1, [1000], 32, 8, 128, 16, None),
    (3, [17, 64, 300], 8, 2, 64, 16, 1),
    (3, [17, 64, 300], 8, 2, 64, 16, 3),
    (4, [15, 16, 129, 0], 8, 8, 64, 16, None),  # no GQA, and a padded row
    (2, [200, 33], 8, 1, 128, 8, 4),  # one kv head for all queries, small pages
]


@pytest.mark.parametrize("batch,lens,h,hkv,d,page,splits", CASES)
def test_paged_decode_matches_reference(batch, lens, h, hkv, d, page, splits):
    num_blocks = sum(-(-n // page) for n in lens) + 5
    k_cache, v_cache = make_cache(num_blocks, page, hkv, d, seed=20 + batch)
    perm = torch.randperm(num_blocks, generator=_gen(21)).tolist()
    width = max(1, max(-(-n // page) for n in lens))
    tables = torch.zeros(batch, width + 2, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(-(-n // page)):
            tables[i, j] = perm.pop()
    q = randn(batch, h, d, seed=22)
    scale = 1 / math.sqrt(d)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    out = ta.paged_decode_attention(q, k_cache, v_cache, tables.to(DEVICE), lens_t.to(DEVICE), scale, splits)
    ref = reference_decode(q, k_cache, v_cache, tables, lens_t, scale)
    assert out.shape == (batch, h, d) and out.dtype == DTYPE
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < TOL
    for i, n in enumerate(lens):
        if n == 0:
            assert (out[i] == 0).all()
