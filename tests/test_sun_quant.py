"""QSUN's quantization: quantize/dequantize error bounds, int4 packing, AWQ (scales keep the fp function and never
do worse than plain rounding), QuantLinear (matmul and gradients), and quantized decode modules that save, load,
carry their scheme in the fingerprint and generate through the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sunray.engine.handoff import KVHandoffError
from sunray.engine.local import LocalSUN
from sunray.engine.sequence import SamplingParams
from sunray.models.dense_attention import TrainContext, positions
from sunray.models.loader import load_model, wrap_model
from sunray.models.quant.awq import AWQConfig, _search_scale, awq_transform, quantize_model
from sunray.models.quant.checkpoint import save_quantized
from sunray.models.quant.formats import (
    QuantSpec,
    dequantize,
    fake_quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from sunray.models.quant.linear import QuantLinear
from sunray.sun.data import prompt_token_ids
from sunray.sun.tasks import get_task


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("quant"), "llama", seed=3)


@pytest.fixture(scope="module")
def calib(tiny_dir):
    base = load_model(tiny_dir)
    return [prompt_token_ids(base.tokenizer, e)[:96] for e in get_task("math").examples("train", 6)]


def test_int8_error_within_half_a_step():
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64, 1)
    err = (dequantize(q, s, None, 8, 200) - w).abs()
    assert (err <= s / 2 + 1e-7).all()
    assert err.max() / w.abs().max() < 1 / 200  # about 0.4% of the range


@pytest.mark.parametrize("k, g", [(256, 64), (200, 64), (576, 128), (64, 128)])
def test_int4_error_within_half_a_step_per_group(k, g):
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(1)) * 0.05
    q, s, z = quantize_int4(w, g)
    ng = -(-k // g)
    assert q.dtype == torch.uint8 and q.shape == (32, ng * g // 2) and s.shape == z.shape == (32, ng)
    assert int(z.max()) <= 15 and int(unpack_int4(q).max()) <= 15
    deq = dequantize(q, s, z, 4, k, g)
    assert deq.shape == w.shape
    step = s.repeat_interleave(g, dim=1)[:, :k]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (deq - w).abs().max() / w.abs().max() < 0.1  # 4 bits: a few percent of the range
    # Zero stays exactly zero (asymmetric with the zero point on the grid).
    w0 = w.clone()
    w0[:, :5] = 0
    assert (fake_quantize(w0, QuantSpec(4, g))[:, :5] == 0).all()


def test_int4_packing_round_trips():
    vals = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    packed = vals[:, 0::2] | (vals[:, 1::2] << 4)
    assert torch.equal(unpack_int4(packed), vals)


def test_spec_parsing():
    assert QuantSpec.parse("int8").name == "int8"
    assert QuantSpec.parse("int4").name == "int4-g128"
    assert QuantSpec.parse("int4", group_size=64).name == "int4-g64"
    assert QuantSpec.parse("INT4-G32").group_size == 32
    for bad in ("int3", "fp8", "int4-gx"):
        with pytest.raises(ValueError, match="unknown quantization scheme"):
            QuantSpec.parse(bad)
    with pytest.raises(ValueError, match="group size"):
        QuantSpec.parse("int8", group_size=64)
    with pytest.raises(ValueError, match="even group size"):
        QuantSpec(4, 7)


def test_quant_linear_matches_dequantized_matmul_and_passes_gradients():
    lin = torch.nn.Linear(96, 40, bias=True)
    for spec in (QuantSpec(8), QuantSpec(4, 32)):
        ql = QuantLinear.from_linear(lin, spec)
        assert not list(ql.parameters())  # nothing to train
        x = torch.randn(5, 96, requires_grad=True)
        y = ql(x)
        torch.testing.assert_close(y, F.linear(x, ql.dequantize(), lin.bias))
        torch.testing.assert_close(ql.dequantize(), fake_quantize(lin.weight, spec), rtol=0, atol=1e-6)
        y.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_awq_search_never_worse_than_rounding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 30  # a few salient input channels, as in real activations
    w = torch.randn(64, 128, generator=g) * 0.05
    spec = QuantSpec(4, 32)
    s, alpha = _search_scale(x, [w], spec, grid=20)
    ref = x @ w.t()
    err_rtn = (x @ fake_quantize(w, spec).t() - ref).pow(2).mean()
    err_awq = (x @ (fake_quantize(w * s, spec) / s).t() - ref).pow(2).mean()
    assert err_awq <= err_rtn and alpha > 0


def _logits(model, ids: list[list[int]]):
    b, n = len(ids), max(map(len, ids))
    t = torch.tensor([i + [0] * (n - len(i)) for i in ids])
    with torch.no_grad():
        h = model(t.reshape(-1), positions(b, n), TrainContext.causal(b, n))
    return model.compute_logits(h)


def test_awq_scales_keep_the_fp_function(tiny_dir, calib):
    base = load_model(tiny_dir)
    model = copy.deepcopy(base.model)
    report = awq_transform(model, calib, QuantSpec(4, 32), AWQConfig(grid=10, clip=False))
    assert len(report["alphas"]) == 3 * base.config.num_layers  # qkv, gate_up, down (GQA: no v -> o)
    assert not torch.equal(
        model.model.layers[0].input_layernorm.weight, base.model.model.layers[0].input_layernorm.weight
    )
    torch.testing.assert_close(
        _logits(model, calib[:3]), _logits(base.model, calib[:3]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_quantized_decode_module_saves_loads_and_generates(tmp_path, tiny_dir, calib, scheme):
    base = load_model(tiny_dir)
    model = copy.deepcopy(base.model)
    spec = QuantSpec.parse(scheme)
    info = quantize_model(model, spec, calib, AWQConfig(grid=5, clip_grid=4))
    assert info["scheme"] == scheme and info["num_quantized"] == 7 * base.config.num_layers
    out = save_quantized(model, info, tiny_dir, tmp_path / scheme, base.fingerprint.to_dict())
    decode = load_model(out)
    assert decode.fingerprint.quantization == scheme
    assert decode.fingerprint.weights == base.fingerprint.weights and decode.fingerprint != base.fingerprint
    assert isinstance(decode.model.model.layers[0].mlp.down_proj, QuantLinear)
    torch.testing.assert_close(_logits(decode.model, calib[:2]), _logits(model, calib[:2]))
    # Quantization changes the model, but not by much.
    fp, q = _logits(base.model, calib[:2]), _logits(decode.model, calib[:2])
    assert 0 < (fp - q).abs().max() < 0.5 * fp.abs().max()
    # A prefill module built for this quantized decode module generates through the engine...
    prefill = wrap_model(
        base.model, base.tokenizer, manifest={"base_fingerprint": decode.fingerprint.to_dict()}
    )
    engine = LocalSUN(decode, {"task": prefill})
    outs = engine.generate(
        calib[:3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), model="task"
    )
    assert all(len(o.token_ids) == 6 for o in outs)
    # ... while one built for the fp base is refused, by the engine and by the decode worker's KV check.
    with pytest.raises(ValueError, match="quantization"):
        LocalSUN(decode, {"fp": base})
    fp_engine = LocalSUN(base, {"fp": base})
    rid = fp_engine.add_request(calib[0], SamplingParams(max_tokens=4, temperature=0.0), model="fp")
    handoff = fp_engine.prefill["fp"].prefill([fp_engine._pending["fp"][0]])[0].handoff
    assert handoff is not None and rid
    with pytest.raises(KVHandoffError, match="quantization"):
        engine.decode.add(handoff)
