"""The int4 fast path's CPU-checkable parts: tinygemm's packed layout built in torch (round trip, the k order the
Triton kernel reads it in), the scale / zero-point conversion, fusion of quantized projections falling back cleanly
off CUDA, and the benchmark's `--quant` plumbing. The kernels themselves run in tests/gpu/test_int4_gpu.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fused_decoder import _logits

from sunray.bench import decode_weight_bytes, quantize_for_bench, weights_dtype
from sunray.cli import build_parser
from sunray.models import int4, int4_triton
from sunray.models.loader import wrap_model
from sunray.models.quant.formats import QuantSpec, dequantize, quantize_int4, unpack_int4
from sunray.models.quant.linear import FusedInt4, QuantLinear, replace_linears

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("inner", [2, 4, 8])
def test_layout_round_trips_and_matches_the_kernels_k_order(inner):
    n, k = 24, inner * 16 * 3
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(inner), dtype=torch.uint8)
    packed = int4_triton.pack_reference(q, inner)
    assert packed.shape == (n // 8, k // (inner * 16), 32, inner // 2) and packed.dtype == torch.int32
    assert torch.equal(int4_triton.unpack_reference(packed, n, k), q)
    # The kernel reads row n's 2 * inner words of k-super-tile ks contiguously and unpacks word w, pair p into the
    # nibbles p (low half) and p + 4 (high half): value [w, p, h] must be q[n, ks * inner * 16 + unpacked_k[w, p, h]],
    # and its reshape / permute (t4, j, tsel, half, lohi) -> (j, tsel, half, t4, lohi) must put them in k order.
    kk = int4_triton.unpacked_k(inner)
    assert sorted(kk.flatten().tolist()) == list(range(inner * 16))
    words = packed.view(n // 8, k // (inner * 16), 8, 2 * inner).permute(0, 2, 1, 3).reshape(n, -1, 2 * inner)
    nibbles = (words.long()[..., None] >> torch.arange(0, 32, 4)) & 0xF  # [n, ks, w, 8]
    pairs = torch.stack((nibbles[..., :4], nibbles[..., 4:]), dim=-1)  # [n, ks, w, p, h]
    want = q.long().view(n, k // (inner * 16), inner * 16)
    assert torch.equal(pairs, want[:, :, kk])
    half = inner // 2
    in_order = pairs.reshape(n, -1, 4, half, 2, 2, 2).permute(0, 1, 3, 4, 5, 2, 6).reshape(n, -1, inner * 16)
    assert torch.equal(in_order, want)


def test_tinygemm_byte_order_and_zero_point_conversion():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    ours = q[:, 0::2] | (q[:, 1::2] << 4)  # low nibble first
    assert torch.equal(unpack_int4(ours), q)
    assert int4.tinygemm_bytes(ours).tolist() == [[0x12, 0xF0]]  # even k in the high nibble
    s = torch.tensor([[0.5, 0.25]])
    z = torch.tensor([[3, 12]], dtype=torch.uint8)
    sz = int4.scales_and_zeros(s, z, torch.float32)
    assert sz.shape == (2, 1, 2)
    qs = torch.arange(16.0)
    for gi in range(2):
        tinygemm = (qs - 8) * sz[gi, 0, 0] + sz[gi, 0, 1]
        assert torch.equal(tinygemm, (qs - float(z[0, gi])) * s[0, gi])


@pytest.mark.parametrize("n, k, g", [(64, 256, 64), (40, 128, 32), (16, 512, 128), (8, 256, 256)])
def test_packed_weights_dequantize_like_the_reference(n, k, g):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.05
    qw, s, z = quantize_int4(w, g)
    packed = int4.pack(qw, s, z, g, k, "cpu")
    assert packed.packed.shape[-1] * 2 == int4.inner_k_tiles(g)
    ref = dequantize(qw, s, z, 4, k, g)
    torch.testing.assert_close(int4.dequantize_packed(packed), ref, rtol=0, atol=1e-6)
    # bf16 scales and zeros (what tinygemm takes): equal within bf16 rounding of the weight and of the zero
    sb = s.to(torch.bfloat16)
    p16 = int4.pack(qw, sb, z, g, k, "cpu", sz_dtype=torch.bfloat16)
    ref16 = dequantize(qw, sb, z, 4, k, g)
    step = sb.float().repeat_interleave(g, dim=1)
    err = (int4.dequantize_packed(p16) - ref16).abs()
    assert (err <= 2**-8 * ref16.abs() + 1.05 * 2**-6 * step).all()


def test_unsupported_shapes_are_named():
    cuda = torch.device("cuda", 0)
    assert "CUDA" in int4.unsupported_reason(64, 256, 64, torch.bfloat16, torch.device("cpu"))
    assert "bfloat16" in int4.unsupported_reason(64, 256, 64, torch.float16, cuda)
    assert "group size 48" in int4.unsupported_reason(64, 480, 48, torch.bfloat16, cuda)
    assert "multiple of the group" in int4.unsupported_reason(64, 576, 128, torch.bfloat16, cuda)
    assert "multiple of 8" in int4.unsupported_reason(60, 512, 128, torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="unsupported"):
        int4.pack(
            torch.zeros(64, 288, dtype=torch.uint8), torch.ones(64, 5), torch.zeros(64, 5), 128, 576, "cpu"
        )


def _quantized(tiny_lm, scheme="int4-g32"):
    model = copy.deepcopy(tiny_lm.model)
    replace_linears(model, QuantSpec.parse(scheme, awq=False))
    return model


def test_fusing_quantized_projections_off_cuda_falls_back_to_the_modules(tiny_lm):
    model = _quantized(tiny_lm)
    ref = copy.deepcopy(model)
    model.fuse_weights()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # Nothing packed on the CPU.
    assert isinstance(attn._qkv.quant, FusedInt4) and attn._qkv.quant.weight is None
    assert isinstance(mlp._gate_up.quant, FusedInt4) and attn._qkv.valid(attn._projections())
    with torch.no_grad():
        assert attn._qkv(torch.randn(3, tiny_lm.config.hidden_size), attn._projections()) is None
    assert all(
        m._packed is None and m.qweight.device.type == "cpu"
        for m in model.modules()
        if isinstance(m, QuantLinear)
    )
    # The whole model computes the same on the fast path (its quantized projections run one by one) and off it.
    for a, b in zip(_logits(model, [[5, 9, 30, 2, 7]], True), _logits(ref, [[5, 9, 30, 2, 7]], False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.to(torch.float64)  # the members' buffers changed: the fused group is stale and gets rebuilt
    assert not attn._qkv.valid(attn._projections())
    attn.fuse()
    assert attn._qkv.valid(attn._projections())


def test_bench_quantizes_on_load_and_labels_rows(tiny_lm):
    lm = wrap_model(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer)
    bf = decode_weight_bytes(lm)
    info = quantize_for_bench(lm, "int4-g32")
    assert info["scheme"] == "int4-g32" and info["num_quantized"] == 7 * lm.config.num_layers
    assert weights_dtype(lm) == "int4" and weights_dtype(tiny_lm) == "fp32"
    assert decode_weight_bytes(lm) == bf  # on the CPU the reference path reads a dequantized float32 copy
    args = build_parser().parse_args(["bench", "decode", "--quant", "int4"])
    assert args.quant == "int4-g128"
    assert build_parser().parse_args(["bench", "decode"]).quant == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "decode", "--quant", "int3"])


def test_triton_candidates_respect_the_kernels_constraints():
    """What the kernel needs of a configuration (checked here, without a GPU): the weight tile bn is a multiple of
    64 (the tensor cores' A side), the (scale, zero) tile [bn, 2] has an element per thread (Triton keeps the load
    coalesced), bm is 16..128 (256 only where timed), the splits divide the k-super-tiles; the split-k workspace stays small; prefill-sized
    M (the fixed rule) never splits."""
    assert int4_triton.split_plan(32, 8) == (4, 8) and int4_triton.split_plan(112, 32) == (4, 28)
    assert int4_triton.split_plan(9, 4) == (3, 3) and int4_triton.split_plan(3, 16) == (1, 3)
    shapes = [(6144, 4096, 128), (4096, 14336, 128), (28672, 4096, 128), (1536, 576, 64), (264, 512, 256)]
    for n, k, g in shapes:
        ks = k // (int4.inner_k_tiles(g) * 16)
        for m in (1, 3, 16, 17, 32, 64, 100, 256, 1024):
            cands = int4.triton_candidates(m, n, k, g, 132)
            assert len(cands) == len(set(cands)) >= 2
            for c in cands:
                assert c.bn % 64 == 0 and 2 * c.bn >= 32 * c.num_warps and c.bm in (16, 32, 64, 128, 256), c
                assert c.bm < 256 or 128 < m <= int4.TUNE_MAX_M, c  # timed only, never the fixed rule's pick
                assert ks % c.split_k == 0 and ks // c.split_k >= 1, c
                tiles = -(-m // c.bm) * -(-n // c.bn)
                assert c.split_k == 1 or tiles * c.split_k * c.bm * c.bn * 4 <= 64 << 20, c
            if m > int4.TUNE_MAX_M:
                assert cands[0].split_k == 1 and cands[0].bm == 128


def test_tuning_keeps_the_fastest_kernel_that_agrees_with_tinygemm(monkeypatch):
    """The dispatch logic with the kernels and timer replaced: a wrong (if fast) Triton tile shape is never chosen."""
    n, k, g = 256, 256, 64
    qw, s, z = quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05, g)
    w = int4.pack(qw, s, z, g, k, "cpu")
    ref_w = int4.dequantize_packed(w)
    cands = int4.triton_candidates(64, n, k, g, 4)
    bad, good = cands[0], cands[1]
    times = {int4.TINYGEMM: 3.0, bad: 0.5, good: 1.0}

    def run(c, x, w_):
        y = (x.float() @ ref_w.T).to(x.dtype)
        return y * 2 if c == bad else y

    for name, value in (
        ("HAS_TRITON", True),
        ("_TUNE", True),
        ("use_triton", lambda t: True),
        ("_run", run),
        ("tinygemm_available", lambda d: True),
        ("_can_time", lambda d: True),
        ("_time_ms", lambda fn, dev, reps=10: times.get(fn.__defaults__[0], 2.0)),
    ):
        monkeypatch.setattr(int4, name, value)
    int4._CHOICES.clear()
    try:
        assert int4.choice_for(64, w) == good
        assert int4.TUNING[-1]["choice"] == str(good) and str(bad) not in int4.TUNING[-1]["ms"]
        times[int4.TINYGEMM] = 0.1
        # Bucket 4: tinygemm is a candidate, and now the fastest.
        assert int4.choice_for(3, w) == int4.TINYGEMM
        assert int4.choice_for(64, w) == good  # cached per bucket
        assert int4.choice_for(32, w) != int4.TINYGEMM  # past M = 16 tinygemm is not timed (however fast)
        with int4.force("tinygemm"):
            assert int4.choice_for(64, w) == int4.TINYGEMM
    finally:
        int4._CHOICES.clear()
