"""The int4 fast path (QSUN's decode module on CUDA): the packed layout, both kernels (tinygemm, Triton), QuantLinear
and fused projections against the reference path (dequantize, then matmul), and a whole quantized model's prefill and
decode logits through the model runner with CUDA graphs against the reference path, on fresh random data.

Under the CPU interpreter (TRITON_INTERPRET=1) only the Triton kernel runs (bf16 inputs over the torch packer's
layout, its math in float32 and the unpacking through int16: the interpreter has no PTX and no usable bf16 math);
everything that needs tinygemm or CUDA graphs skips. On the GPU every configuration the tuner may pick for the 8B's
group 128 is checked, and the split-k reduction for determinism, counter re-arming and CUDA-graph replay."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from conftest import CUDA, DEVICE, DTYPE, rel_err
from torch import nn

from sunray.bench import bench_decode, quantize_for_bench
from sunray.engine.attention import TorchAttention, TritonPagedAttention
from sunray.engine.block_manager import BlockManager
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.model_runner import ModelRunner
from sunray.engine.sequence import SamplingParams, Sequence
from sunray.models import int4, int4_triton
from sunray.models.decoder import Decoder
from sunray.models.loader import init_dummy_weights
from sunray.models.presets import SHAPES
from sunray.models.quant.formats import QuantSpec, quantize_int4
from sunray.models.quant.linear import FusedInt4, QuantLinear, replace_linears

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="tinygemm, the QuantLinear fast path and CUDA graphs need CUDA"
)

MODEL_TOL = 5e-2 if DTYPE is torch.bfloat16 else 1e-4  # whole-model logits, as in test_decode_gpu
BLOCK = 16


def random_q(n: int, k: int, g: int, seed: int, scale: float = 0.02):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    return quantize_int4(w, g)  # qweight [n, k / 2], scales, zeros (CPU, float32 scales)


def quant_linear(n: int, k: int, g: int, seed: int, bias: bool = False) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return QuantLinear.from_linear(lin.to(DEVICE, DTYPE), QuantSpec(4, g, awq=False))


@needs_cuda
@pytest.mark.parametrize("inner", [2, 4, 8])
def test_reference_packer_matches_the_aten_op(inner):
    n, k = 48, inner * 16 * 3
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(inner), dtype=torch.uint8)
    ours = q[:, 0::2] | (q[:, 1::2] << 4)  # our byte format: low nibble first
    aten = torch.ops.aten._convert_weight_to_int4pack(int4.tinygemm_bytes(ours.cuda()), inner)
    ref = int4_triton.pack_reference(q, inner)
    assert aten.dtype == torch.int32 and aten.shape == ref.shape
    assert torch.equal(aten.cpu(), ref)
    assert torch.equal(int4_triton.unpack_reference(aten.cpu(), n, k), q)


# (n, k, group): Llama-8B's fused q/k/v and down, SmolLM2's widths, odd tile counts, every group size
KERNEL_SHAPES = [
    (6144, 4096, 128),
    (4096, 14336, 128),
    (1536, 576, 64),
    (576, 1536, 32),
    (1032, 512, 256),
    (136, 256, 64),
]
INTERP_SHAPES = [(136, 256, 64), (40, 128, 32), (64, 512, 128), (72, 512, 256)]


def packed_weight(n: int, k: int, g: int, seed: int) -> int4.Int4Weight:
    qw, s, z = random_q(n, k, g, seed)
    s = s.to(torch.bfloat16)  # bf16 scales, as the modules hold them
    return int4.pack(qw, s, z, g, k, DEVICE, sz_dtype=torch.bfloat16)


def tuner_configs(n: int, k: int, g: int) -> list[int4_triton.TritonConfig]:
    """Every Triton configuration the tuner may pick for this weight, at any M (and the fixed rule's picks)."""
    sms = int4._num_sms(torch.device(DEVICE))
    out = []
    for m in (1, 16, 32, 64, 128, 256, 512):
        out += [c for c in int4.triton_candidates(m, n, k, g, sms) if c not in out]
    return out


def kernel_configs(n: int, k: int, g: int) -> list[int4_triton.TritonConfig]:
    """On the GPU: all of them for group 128 (what the 8B benchmark tunes over; compiled once for both), the fixed
    rule's pick per row tile and a split-k one otherwise (each group size compiles its own kernels). Under the interpreter: one of each
    arithmetic (dequantize before / scale after the product), with and without split-k."""
    if not CUDA:
        return [
            int4_triton.TritonConfig(16, 64, 1, 4),
            int4_triton.TritonConfig(16, 64, 2, 4, scale_after=True),
            int4_triton.TritonConfig(32, 64, 3, 4),
            int4_triton.TritonConfig(16, 128, 1, 4, scale_after=True),
            int4_triton.TritonConfig(256, 128, 2, 8, 2),
        ]
    every = tuner_configs(n, k, g)
    if g == 128:
        return every
    firsts = {}
    for c in every:
        firsts.setdefault(c.bm, c)
    split = next((c for c in every if c.bm == 16 and c.split_k > 1), None)
    return list(firsts.values()) + ([split] if split and split not in firsts.values() else [])


@pytest.mark.parametrize("n, k, g", KERNEL_SHAPES if CUDA else INTERP_SHAPES)
def test_every_triton_config_matches_the_packed_weights(n, k, g):
    """Each configuration (tile shape, split-k, both arithmetics) on fresh random weights and inputs, M below, at and
    past its row tile, against x @ W^T in float64 with W the packed form's weights. Bound: the bf16 rounding of the
    output (and of the weights, for the dequantize-first arithmetic), far under 1e-2 relative; the interpreter
    truncates bf16 conversions instead of rounding them (twice the error, still far under)."""
    w = packed_weight(n, k, g, seed=n + k)
    ref_w = int4.dequantize_packed(w, torch.float64).cpu()
    for i, cfg in enumerate(kernel_configs(n, k, g)):
        for m in (1, cfg.bm, cfg.bm + 3 if CUDA else 5):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(7 * i + m))
            x = x.to(DEVICE, torch.bfloat16)
            y = int4_triton.w4a16_matmul(x, w.packed, w.scales_zeros, n, g, cfg)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert rel_err(y.cpu(), x.double().cpu() @ ref_w.T) < 1e-2, f"M={m} {cfg}"


@pytest.mark.parametrize("after", [False, True])
def test_split_k_is_deterministic_and_rearms_its_counters(after):
    """The last split of a tile to finish sums the partials in split order: the same bits every time, whichever
    finishes last; the counters it re-arms serve the next launch (and one with another split count)."""
    n, k, g = 256, 1024, 128
    w = packed_weight(n, k, g, seed=1)
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    ys = [
        int4_triton.w4a16_matmul(
            x, w.packed, w.scales_zeros, n, g, int4_triton.TritonConfig(16, 64, s, 4, 3, after)
        )
        for s in (8, 8, 8, 4, 8)
    ]
    assert all(torch.equal(y, ys[0]) for y in ys[:3] + ys[4:])
    assert rel_err(ys[3], ys[0]) < 1e-2
    _, cnt = int4_triton.workspace(x.device, 0, 0)
    assert not cnt.any(), "every counter back at zero"


@needs_cuda
def test_split_k_replays_in_a_cuda_graph():
    """Captured (workspace allocated before, as the warm-up run of ModelRunner does), replayed on new inputs."""
    n, k, g = 512, 2048, 128
    w = packed_weight(n, k, g, seed=3)
    cfg = int4_triton.TritonConfig(16, 64, 8, 4)
    x = torch.zeros(16, k, device=DEVICE, dtype=torch.bfloat16)
    int4_triton.w4a16_matmul(x, w.packed, w.scales_zeros, n, g, cfg)  # warm-up: compiles, sizes the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_triton.w4a16_matmul(x, w.packed, w.scales_zeros, n, g, cfg)
    for seed in range(3):
        x.copy_(torch.randn(16, k, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, int4_triton.w4a16_matmul(x, w.packed, w.scales_zeros, n, g, cfg))


@needs_cuda
def test_tuning_outside_inference_mode_after_tuning_inside_it():
    """The first tuning (inside torch.inference_mode, as a decode step runs) made the timer's L2-flush buffer; a
    later one outside inference mode (a benchmark, a test) must still zero it in place: every candidate gets timed."""
    w = packed_weight(512, 1024, 128, seed=4)
    int4._FLUSH.clear()
    int4._CHOICES.clear()
    try:
        with torch.inference_mode():
            int4.linear(torch.randn(16, 1024, device=DEVICE, dtype=torch.bfloat16), w)
        int4.linear(torch.randn(64, 1024, device=DEVICE, dtype=torch.bfloat16), w)
        runs = [t for t in int4.TUNING if (t["n"], t["k"]) == (512, 1024)][-2:]
        assert [t["m"] for t in runs] == [16, 64]
        sms = int4._num_sms(torch.device(DEVICE))
        assert len(runs[1]["ms"]) == len(int4.triton_candidates(64, 512, 1024, 128, sms)), runs[1]
    finally:
        int4._CHOICES.clear()


@needs_cuda
@pytest.mark.parametrize("n, k, g", [(512, 512, 128), (256, 256, 32), (384, 256, 64), (264, 512, 256)])
def test_fast_path_weights_equal_the_reference_dequantization(n, k, g):
    """Each kernel's weights, read out through an identity input, against `dequantize` (the module's bf16 scale s and
    integer zero z: ref = bf16((q - z) s)). The kernels compute w = bf16((q - 8) s + zero) with zero = bf16((8 - z) s)
    rounded once when packing (tinygemm: one bf16 fma; the Triton kernel the same, or the float32 equivalent when
    scaling after the product). With u = 2^-8 (bf16's unit roundoff), A = (q - z) s exact and e = zero - (8 - z) s,
    |e| <= u |8 - z| s:  |w - ref| <= u |A + e| + |e| + u |A| <= 2u |A| + (1 + u) |e| = 2u |A| + (1 + u) u |8 - z| s,
    and |A| <= |ref| / (1 - u). So the bound grows with |8 - z| (up to 8 u s = 2^-5 s, the zero's rounding) and is 2u
    relative in the weight (the two roundings) -- not u |ref| + 1.05 * 2^-6 s, which the kernels rightly exceed where
    |8 - z| > 4."""
    ql = quant_linear(n, k, g, seed=5)
    ref = ql.dequantize(torch.bfloat16).float()
    assert ql.prepare(DEVICE) and ql._cache is None
    u = 2.0**-8
    s = ql.scales.float().repeat_interleave(g, dim=1)[:, :k]
    z = ql.zeros.float().repeat_interleave(g, dim=1)[:, :k]
    bound = 2 * u * ref.abs() / (1 - u) + (1 + u) * u * (8 - z).abs() * s
    bound += 2**-16 * s  # slack for the float32 epilogue of scale-after
    eye = torch.eye(k, device=DEVICE, dtype=torch.bfloat16)
    w = ql._packed
    kernels = {"tinygemm": lambda: int4.linear(eye, w)}
    configs = [(16, 64, 1, 4, 3, False), (64, 128, 2, 4, 3, False), (16, 128, 1, 4, 3, True)]
    for c in map(lambda c: int4_triton.TritonConfig(*c), configs):
        kernels[str(c)] = lambda c=c: int4_triton.w4a16_matmul(eye, w.packed, w.scales_zeros, w.n, w.group, c)
    for name, run in kernels.items():
        with int4.force("tinygemm"):
            got = run().T.float()
        ratio = (got - ref).abs() / bound
        assert (ratio <= 1).all(), f"{name}: {int((ratio > 1).sum())} off, worst {float(ratio.max()):.2f}x"
    assert ((int4.dequantize_packed(w).cuda() - ref).abs() <= bound).all()


@needs_cuda
@pytest.mark.parametrize(
    "n, k, g, bias",
    [
        (6144, 4096, 128, False),
        (4096, 14336, 128, False),
        (1536, 576, 64, False),
        (576, 1536, 32, False),
        (640, 512, 128, True),
    ],
)
def test_quant_linear_fast_path_matches_the_reference_path(n, k, g, bias, monkeypatch):
    # other groups: the fixed rule (tuning would compile every candidate for them)
    monkeypatch.setattr(int4, "_TUNE", g == 128)
    ql = quant_linear(n, k, g, seed=k, bias=bias)
    ref_w = ql.dequantize(torch.bfloat16).double()
    for kind in (None, "tinygemm", "triton"):
        for m in (1, 16, 64, 200):
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            ref = x.double() @ ref_w.T + (0 if ql.bias is None else ql.bias.double())
            with int4.force(kind):
                y = ql(x)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert rel_err(y, ref) < 1e-2, f"{kind or 'tuned'} M={m}"
    assert ql._packed is not None and ql._cache is None  # no dequantized copy on the fast path
    assert ql._packed.packed.numel() * 4 == n * k // 2
    # 3-D input, and a gradient-free call under autograd take the fast path too; an input needing grad does not.
    x3 = torch.randn(2, 3, k, device=DEVICE, dtype=DTYPE)
    assert rel_err(ql(x3), x3.double() @ ref_w.T + (0 if ql.bias is None else ql.bias.double())) < 1e-2
    xg = torch.randn(4, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    ql(xg).float().sum().backward()
    assert xg.grad is not None and ql._cache is not None


@needs_cuda
def test_unsupported_shapes_fall_back_and_say_so_once(caplog):
    ql = quant_linear(96, 576, 128, seed=1)  # 576 is not a multiple of 128
    x = torch.randn(3, 576, device=DEVICE, dtype=DTYPE)
    with caplog.at_level(logging.WARNING, logger="sunray.models.int4"):
        y1, y2 = ql(x), ql(x)
    assert ql._packed is None and ql._cache is not None
    assert torch.equal(y1, y2)
    assert rel_err(y1, x.double() @ ql.dequantize(torch.bfloat16).double().T) < 1e-2
    msgs = [r.getMessage() for r in caplog.records if "int4 fast path off" in r.getMessage()]
    assert len(msgs) <= 1  # once per process (an earlier test may have logged it already)


def small_config(shape: str, layers: int | None = None, **kw):
    return dataclasses.replace(SHAPES[shape], num_layers=layers or SHAPES[shape].num_layers, **kw)


# A Llama-like shape whose widths are multiples of 128 (so every layer takes the g128 fast path), and SmolLM2's
G128_CONFIG = small_config(
    "smollm2-135m", 6, hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=2, head_dim=64
)


def quantized_model(config, scheme: str, seed: int = 3) -> Decoder:
    m = Decoder(config).to(device=DEVICE, dtype=DTYPE)
    init_dummy_weights(m, seed=seed)
    m.eval().requires_grad_(False)
    with torch.no_grad():
        replace_linears(m, QuantSpec.parse(scheme, awq=False))
    return m


@needs_cuda
def test_fuse_weights_packs_fused_groups_and_releases_the_integer_buffers():
    model = quantized_model(G128_CONFIG, "int4-g128")
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.allow_fast = False
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    source = sum(t.numel() * t.element_size() for m in qls for t in (m.qweight, m.scales, m.zeros))
    before = torch.cuda.memory_allocated()
    model.fuse_weights()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    w = attn._qkv.quant.weight
    assert w is not None and w.n == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert mlp._gate_up.quant.weight.n == 2 * mlp.gate_proj.out_features
    assert attn.o_proj._packed is not None and mlp.down_proj._packed is not None
    assert attn.q_proj._packed is None  # fused members are not packed twice
    for m in (attn.q_proj, attn.o_proj, mlp.up_proj, mlp.down_proj):
        assert m.qweight.device.type == "cpu" and m._cache is None
    # The packed copy replaced the integer buffers on the device (its bf16 scale + zero take 1 byte a group more).
    assert torch.cuda.memory_allocated() - before < 0.05 * source
    x = torch.randn(5, G128_CONFIG.hidden_size, device=DEVICE, dtype=DTYPE)
    with torch.inference_mode():
        qkv = attn._qkv(x, attn._projections())
        r = ref.model.layers[0].self_attn
        expect = torch.cat([r.q_proj(x), r.k_proj(x), r.v_proj(x)], dim=-1)
        assert rel_err(qkv, expect) < 1e-2
        assert rel_err(mlp.forward_fast(x), ref.model.layers[0].mlp(x)) < 2e-2
    model.fuse_weights()  # idempotent: nothing stale, nothing repacked
    assert attn._qkv.quant.weight is w


def packed_layers(model) -> int:
    """How many weights (single layers and fused groups) are packed for the fast path."""
    single = sum(m._packed is not None for m in model.modules() if isinstance(m, QuantLinear))
    fused = sum(
        isinstance(getattr(v, "quant", None), FusedInt4) and v.quant.weight is not None
        for mod in model.modules()
        for v in vars(mod).values()
    )
    return single + fused


def runner_pair(model, num_blocks: int):
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, QuantLinear):
            m.allow_fast = False
    ref = ModelRunner(
        ref_model,
        PagedKVCache(ref_model.config, num_blocks, BLOCK, DTYPE, DEVICE),
        TorchAttention(),
        cuda_graphs=False,
        fast_path=False,
    )
    fast_model = copy.deepcopy(model)
    fast = ModelRunner(
        fast_model,
        PagedKVCache(fast_model.config, num_blocks, BLOCK, DTYPE, DEVICE),
        TritonPagedAttention(),
        cuda_graphs=True,
        fast_path=True,
    )
    return ref, fast


@needs_cuda
@pytest.mark.parametrize(
    "config, scheme",
    [
        (G128_CONFIG, "int4-g128"),
        (SHAPES["smollm2-135m"], "int4-g64"),
        (small_config("smollm2-135m", 8), "int4-g128"),
    ],
    ids=["g128", "smollm2-g64", "smollm2-g128-mixed"],
)
def test_quantized_model_decode_with_graphs_matches_the_reference_path(config, scheme, monkeypatch):
    """Prefill then 20 greedy decode steps (teacher forcing from the reference), the batch shrinking mid-way (another
    graph bucket). SmolLM2 with g128: its 576-wide layers keep the reference path, the 1536-wide down_proj is fast.
    g128 tunes in the runner's warm-up before each capture (the path a decode engine takes); g64 takes the rule."""
    monkeypatch.setattr(int4, "_TUNE", scheme.endswith("g128"))
    model = quantized_model(config, scheme)
    ref, fast = runner_pair(model, num_blocks=96)
    assert packed_layers(fast.model) > 0
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (7, 40, 3, 21)]
    blocks_r, blocks_f = BlockManager(96, BLOCK), BlockManager(96, BLOCK)
    seqs_r = [Sequence(f"r{i}", list(p), SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    seqs_f = [Sequence(f"r{i}", list(p), SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    for sr, sf in zip(seqs_r, seqs_f):
        sr.block_table, sf.block_table = blocks_r.allocate(sr.num_tokens), blocks_f.allocate(sf.num_tokens)
    lr, lf = ref.prefill(seqs_r, [0] * 4), fast.prefill(seqs_f, [0] * 4)
    assert rel_err(lf, lr) < MODEL_TOL, "prefill"
    for step in range(20):
        for sr, sf, t in zip(seqs_r, seqs_f, lr.float().argmax(-1).tolist()):
            sr.output_token_ids.append(t)
            sf.output_token_ids.append(t)
            assert blocks_r.grow(sr.block_table, sr.num_tokens) and blocks_f.grow(
                sf.block_table, sf.num_tokens
            )
        if step == 10:
            seqs_r, seqs_f = seqs_r[1:], seqs_f[1:]
        lr, lf = ref.decode(seqs_r), fast.decode(seqs_f)
        assert rel_err(lf, lr) < MODEL_TOL, f"decode step {step}"
    assert fast._graphs, "decode ran as CUDA graphs"


@needs_cuda
def test_bench_quantizes_on_load_and_reports_int4():
    from sunray.models.presets import dummy_model

    lm = dummy_model("smollm2-135m", device=DEVICE)
    info = quantize_for_bench(lm, "int4-g64")
    assert info["scheme"] == "int4-g64" and info["num_quantized"] == 7 * lm.config.num_layers
    assert info["fused_groups"] == 2 * lm.config.num_layers and info["reference"] == 0
    r = bench_decode(lm, 3, 64, 2, warmup=1)
    assert r["dtype"] == "int4" and r["tok_per_s"] > 0
