"""`Decoder.fuse_weights()`: the inference transform keeps parameter names, state dict and loading as they were,
computes the same function (float32, CPU: the torch fallbacks of `fused_ops`), and steps aside when the weights move
or are replaced."""

from __future__ import annotations

import copy

import torch

from sunray.engine.attention import TorchAttention
from sunray.engine.block_manager import BlockManager
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.model_runner import ModelRunner
from sunray.engine.sequence import SamplingParams, Sequence
from sunray.models import fused_ops
from sunray.models.loader import load_weights


def _logits(lm_model, prompts, fast: bool) -> list[torch.Tensor]:
    """Prefill then three greedy decode steps through a fresh paged cache; logits of every step."""
    cache = PagedKVCache(lm_model.config, 32, 4, torch.float32, "cpu")
    runner = ModelRunner(lm_model, cache, TorchAttention(), fast_path=fast)
    blocks = BlockManager(32, 4)
    seqs = [Sequence(f"r{i}", p, SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    for s in seqs:
        s.block_table = blocks.allocate(s.num_tokens)
    out = [runner.prefill(seqs, [0] * len(seqs))]
    for _ in range(3):
        for s, t in zip(seqs, out[-1].argmax(-1).tolist()):
            s.output_token_ids.append(t)
            assert blocks.grow(s.block_table, s.num_tokens)
        out.append(runner.decode(seqs))
    return out


def test_fused_weights_keep_names_and_values_and_compute_the_same(tiny_lm):
    ref = copy.deepcopy(tiny_lm.model)
    fused = copy.deepcopy(tiny_lm.model).fuse_weights()
    assert fused.fast_path
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
    sd_ref, sd = ref.state_dict(), fused.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn._qkv.weight.data_ptr()  # a view, no copy
    prompts = [[5, 9, 30, 2, 7], [40, 41, 42]]
    for a, b in zip(_logits(fused, prompts, True), _logits(ref, prompts, False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loading_writes_through_and_moving_falls_back(tiny_lm):
    fused = copy.deepcopy(tiny_lm.model).fuse_weights()
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) for k, v in fused.state_dict().items()}
    load_weights(fused, state)  # copies into the views, hence into the fused tensors
    attn, mlp = fused.model.layers[1].self_attn, fused.model.layers[1].mlp
    w, _ = attn._qkv.get(attn._projections())
    assert torch.equal(w[: attn.q_proj.weight.shape[0]], state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(
        mlp._gate_up.get([mlp.gate_proj, mlp.up_proj])[0][-1], state["model.layers.1.mlp.up_proj.weight"][-1]
    )
    fused.to(torch.float64)  # new storage: the fused tensors are stale and must not be used
    assert attn._qkv.get(attn._projections()) is None
    ref = copy.deepcopy(tiny_lm.model)
    load_weights(ref, state)
    prompts = [[3, 4, 5, 6]]
    for a, b in zip(_logits(fused.to(torch.float32), prompts, True), _logits(ref, prompts, False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_trainable_weights_are_left_unfused(tiny_lm):
    m = copy.deepcopy(tiny_lm.model).requires_grad_(True).fuse_weights()
    attn = m.model.layers[0].self_attn
    assert attn._qkv.get(attn._projections()) is None
    assert attn.q_proj.weight.requires_grad


def test_fused_ops_torch_fallbacks_match_the_modules(tiny_lm):
    layer = tiny_lm.model.model.layers[0]
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    norm = layer.input_layernorm
    torch.testing.assert_close(fused_ops.rms_norm(x, norm.weight, norm.eps), norm(x))
    h, s = fused_ops.add_rms_norm(x, r, norm.weight, norm.eps)
    torch.testing.assert_close(s, r + x)
    torch.testing.assert_close(h, norm(r + x))
    gu = torch.randn(3, 256)
    torch.testing.assert_close(fused_ops.silu_mul(gu), torch.nn.functional.silu(gu[:, :128]) * gu[:, 128:])
