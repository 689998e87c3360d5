"""Parity of our decoder with transformers' own implementations, and the loader's refusals.

Every family (and the llama3-rope / biases variant) is a tiny random float32 model saved as an HF checkpoint; ours
and transformers' load the same files. Prompts run in ONE ragged batch through the paged KV cache; the reference
runs each prompt alone, so cross-talk between sequences or a wrong slot would show.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import VARIANTS, load_hf_model, make_tiny_model_dir, perturbed_copy, tiny_config

from sunray.engine.attention import StepContext, TorchAttention
from sunray.engine.block_manager import BlockManager
from sunray.engine.kv_cache import PagedKVCache
from sunray.engine.model_runner import ModelRunner
from sunray.engine.sequence import SamplingParams, Sequence
from sunray.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from sunray.models.loader import load_model, load_state_dict

# float32 on CPU: the largest differences measured are ~5e-7 on logits of magnitude ~1 (hyperclovax; ~1e-7 for
# llama). 5e-6 leaves room for other CPUs' kernels; the smallest real deviation tried (llama3 rope computed as
# default rope) differs by 7e-4, no rope at all by 7e-3.
ATOL, RTOL = 5e-6, 1e-5
PROMPT_LENS = (5, 11, 17)
DECODE_STEPS = 6
BLOCK_SIZE = 4  # small, so that every sequence spans several blocks and decode growth interleaves them
NUM_BLOCKS = 64


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL,
        rtol=RTOL,
        msg=lambda m: f"{what}: {m} (max abs diff {(actual - expected).abs().max():.3g})",
    )


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    """(our LoadedModel, the transformers model) over one tiny checkpoint."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    return load_model(path), load_hf_model(path)


def make_prompts(vocab_size: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lens]


@torch.inference_mode()
def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] logits of transformers' model on one sequence alone."""
    return hf(torch.tensor([token_ids])).logits[0]


def make_runner(lm) -> tuple[ModelRunner, BlockManager]:
    cache = PagedKVCache(lm.config, NUM_BLOCKS, BLOCK_SIZE, lm.dtype, lm.device)
    blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    blocks.allocate(3 * BLOCK_SIZE)  # keep block 0.. busy: real block tables rarely start at block 0
    return ModelRunner(lm.model, cache, TorchAttention()), blocks


def make_seqs(prompts: list[list[int]], blocks: BlockManager) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", list(p), SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    for s in seqs:
        s.block_table = blocks.allocate(s.num_tokens)
    return seqs


@torch.inference_mode()
def prefill_all_logits(runner: ModelRunner, seqs: list[Sequence], starts: list[int]) -> list[torch.Tensor]:
    """Like ModelRunner.prefill, but the logits of every new position: one [end - start, vocab] per sequence."""
    ids, positions, slots, query_lens = [], [], [], []
    for seq, start in zip(seqs, starts):
        end = seq.num_tokens
        ids += seq.all_token_ids()[start:end]
        positions += range(start, end)
        slots += runner.kv_cache.slots(seq.block_table, start, end)
        query_lens.append(end - start)
    width = max(len(s.block_table) for s in seqs)
    ctx = StepContext(
        backend=runner.backend,
        kv_cache=runner.kv_cache,
        is_prefill=True,
        slot_mapping=torch.tensor(slots),
        context_lens=torch.tensor([s.num_tokens for s in seqs]),
        block_tables=torch.tensor(
            [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32
        ),
        query_lens=query_lens,
    )
    hidden = runner.model(torch.tensor(ids), torch.tensor(positions), ctx)
    return list(runner.model.compute_logits(hidden).split(query_lens))


def test_config_carries_family_features(pair):
    lm, hf = pair
    c, h = lm.config, hf.config
    assert (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        h.model_type,
        h.num_hidden_layers,
        h.num_attention_heads,
        h.num_key_value_heads,
        h.head_dim,
    )
    assert c.tie_word_embeddings == h.tie_word_embeddings
    if c.tie_word_embeddings:
        assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert c.qk_norm == (c.model_type == "qwen3")
    assert c.post_norm == (c.model_type == "hyperclovax")
    if c.model_type == "hyperclovax":
        ours = (c.embedding_multiplier, c.softmax_scale, c.residual_multiplier, c.logits_scaling)
        assert ours == pytest.approx(
            (h.embedding_multiplier, h.attention_multiplier, h.residual_multiplier, h.logits_scaling)
        )
    assert c.rope_parameters["rope_type"] == h.rope_parameters["rope_type"]


def test_prefill_parity(pair):
    """One ragged prefill batch: last-position logits (the runner), all positions (the decoder) and the KV written."""
    lm, hf = pair
    runner, blocks = make_runner(lm)
    prompts = make_prompts(lm.config.vocab_size)
    seqs = make_seqs(prompts, blocks)
    last = runner.prefill(seqs, [0] * len(seqs))
    assert last.shape == (len(seqs), lm.config.vocab_size)

    refs, ref_kv = [], []
    with torch.inference_mode():
        for p in prompts:
            out = hf(torch.tensor([p]), use_cache=True)
            refs.append(out.logits[0])
            cache = out.get("cache")  # named past_key_values before transformers 5.2x
            if cache is None:
                cache = out.past_key_values
            # Per layer: keys and values as [kv_heads, len, head_dim].
            ref_kv.append([(layer.keys[0], layer.values[0]) for layer in cache.layers])

    for i, (seq, ref) in enumerate(zip(seqs, refs)):
        assert_close(last[i], ref[-1], f"seq {i} last-position logits")
        # The KV the prefill wrote (what a hand-off carries): keys after RoPE (and q/k norm), values.
        kv = runner.kv_cache.read(torch.tensor(runner.kv_cache.slots(seq.block_table, 0, seq.num_tokens)))
        for layer, (k_ref, v_ref) in enumerate(ref_kv[i]):
            assert_close(kv[layer, 0].transpose(0, 1), k_ref, f"seq {i} layer {layer} keys")
            assert_close(kv[layer, 1].transpose(0, 1), v_ref, f"seq {i} layer {layer} values")

    # Every position, through Decoder.forward + compute_logits with a fresh cache and the runner's step context.
    runner2, blocks2 = make_runner(lm)
    all_logits = prefill_all_logits(runner2, make_seqs(prompts, blocks2), [0] * len(prompts))
    for i, (got, ref) in enumerate(zip(all_logits, refs)):
        assert got.shape == ref.shape
        assert_close(got, ref, f"seq {i} all-position logits")


def test_chunked_prefill_parity(pair):
    """Prefill of a suffix over a prefix already in the cache (the masked path), mixed with a fresh prompt."""
    lm, hf = pair
    runner, blocks = make_runner(lm)
    prompts = make_prompts(lm.config.vocab_size, seed=1)
    cuts = [2, 7, 0]  # the last sequence gets its whole prompt in the second pass
    seqs = make_seqs([p[:c] for p, c in zip(prompts, cuts) if c], blocks)
    runner.prefill(seqs, [0] * len(seqs))
    seqs.append(Sequence("r2", [], SamplingParams(temperature=0.0)))
    for seq, p in zip(seqs, prompts):
        seq.prompt_token_ids = list(p)
        assert blocks.grow(seq.block_table, seq.num_tokens)
    got = prefill_all_logits(runner, seqs, cuts)
    for i, (g, p, c) in enumerate(zip(got, prompts, cuts)):
        assert_close(g, hf_logits(hf, p)[c:], f"seq {i} logits of positions {c}..{len(p) - 1}")


def test_decode_parity(pair):
    """Prefill the batch, then decode step by step (greedy), comparing each step with HF on the whole sequence."""
    lm, hf = pair
    runner, blocks = make_runner(lm)
    seqs = make_seqs(make_prompts(lm.config.vocab_size, seed=2), blocks)
    logits = runner.prefill(seqs, [0] * len(seqs))
    for step in range(DECODE_STEPS):
        for seq, row in zip(seqs, logits):
            seq.output_token_ids.append(int(row.argmax()))
            assert blocks.grow(seq.block_table, seq.num_tokens)
        logits = runner.decode(seqs)
        assert logits.shape == (len(seqs), lm.config.vocab_size)
        for i, seq in enumerate(seqs):
            assert_close(logits[i], hf_logits(hf, seq.all_token_ids())[-1], f"decode step {step} seq {i}")
    # The tables really interleave (block_size 4, growth in turns), so slots were not contiguous per sequence.
    assert any(b - a != 1 for s in seqs for a, b in zip(s.block_table, s.block_table[1:]))


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "arch"),
    [("gpt2", "GPT2LMHeadModel"), ("mistral", "MistralForCausalLM"), ("gemma", None)],
)
def test_unsupported_architecture(tmp_path, model_type, arch):
    raw = {"model_type": model_type, "vocab_size": 320, "hidden_size": 64}
    if arch:
        raw["architectures"] = [arch]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    name = arch or model_type
    for load in (ModelConfig.from_pretrained, load_model):
        with pytest.raises(UnsupportedModelError) as e:
            load(tmp_path)
        msg = str(e.value)
        assert name in msg and model_type in msg, msg
        assert all(a in msg for a in SUPPORTED_ARCHITECTURES), msg


def test_unsupported_from_hf_config():
    from transformers import AutoConfig

    with pytest.raises(
        UnsupportedModelError, match="MistralForCausalLM.*supported architectures: LlamaForCausalLM"
    ):
        ModelConfig.from_hf(AutoConfig.for_model("mistral", architectures=["MistralForCausalLM"]))
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        ModelConfig.from_hf(tiny_config("llama", hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        ModelConfig.from_hf(tiny_config("qwen2", use_sliding_window=True, sliding_window=8))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


def _rewrite_weights(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    state = load_state_dict(dst)
    edit(state)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )


@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.norm.weight"]
)
def test_missing_tensor_is_named(llama_dir, tmp_path, name):
    _rewrite_weights(llama_dir, tmp_path / "m", lambda s: s.pop(name))
    with pytest.raises(ValueError, match="lacks 1 tensors") as e:
        load_model(tmp_path / "m")
    assert name in str(e.value)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(state):
        state[name] = state[name][:16]

    _rewrite_weights(llama_dir, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=rf"{name}: checkpoint shape \(16, 64\) != model shape \(32, 64\)"):
        load_model(tmp_path / "m")


def test_no_weights_file(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path / "m")


# -- the helpers other tests build on ------------------------------------------------------------------------------


def test_perturbed_copy_declares_base(llama_dir, tmp_path):
    base = load_model(llama_dir)
    task = load_model(perturbed_copy(llama_dir, tmp_path / "task", scale=1e-3, seed=3))
    assert task.fingerprint == base.fingerprint
    assert task.manifest == {"base_fingerprint": base.fingerprint.to_dict()}
    a, b = base.model.state_dict(), task.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert 0 < (a[k] - b[k]).abs().max() < 1e-2, k
    assert base.tokenizer.get_vocab() == task.tokenizer.get_vocab()
