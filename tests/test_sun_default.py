"""SUN on the embedded SmolLM2-135M-Instruct: the prefill/decode split loses nothing, and requests of different
task models batch together on the shared decode module without changing anyone's tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from sunray.engine.config import EngineConfig
from sunray.engine.local import LocalSUN, encode_prompt
from sunray.engine.sequence import SamplingParams
from sunray.kv.transport import BytesTransport
from sunray.models.loader import LoadedModel, load_model, resolve_model_dir, wrap_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence what a GPU is.",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def base() -> LoadedModel:
    return load_model("default")


def perturbed(base: LoadedModel, scale: float, seed: int) -> LoadedModel:
    """A stand-in task model: the base's weights plus noise, declaring the base as its decode module."""
    model = copy.deepcopy(base.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return wrap_model(model, base.tokenizer, manifest={"base_fingerprint": base.fingerprint.to_dict()})


def test_split_matches_transformers_generate(base):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("default")), dtype=torch.float32).eval()
    prompts = [encode_prompt(base.tokenizer, p, chat=True) for p in PROMPTS]
    engine = LocalSUN(base, {"base": base}, EngineConfig(), transport=BytesTransport())
    ours = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), model="base")
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)[
                0, len(prompt) :
            ]
        assert got.token_ids == ref.tolist(), (got.text, base.tokenizer.decode(ref))
    assert "Paris" in ours[0].text
    assert engine.decode.stats().kv_blocks_free == engine.decode.blocks.num_blocks


def test_models_batch_together_without_changing_tokens(base):
    task_models = {"base": base, "math": perturbed(base, 0.02, seed=1), "code": perturbed(base, 0.02, seed=2)}
    names = list(task_models)
    prompts = [encode_prompt(base.tokenizer, p, chat=True) for p in PROMPTS[:3]]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

    alone = {}
    for name, prompt in zip(names, prompts):
        engine = LocalSUN(base, {name: task_models[name]})
        alone[name] = engine.generate([prompt], greedy, model=name)[0].token_ids

    engine = LocalSUN(base, task_models)
    batch_sizes = []
    for name, prompt in zip(names, prompts):
        engine.add_request(prompt, greedy, model=name, request_id=name)
    together = {name: [] for name in names}
    while engine.has_unfinished():
        for out in engine.step():
            together[out.request_id] += out.new_token_ids
        batch_sizes.append(engine.decode.stats().num_running)
    assert max(batch_sizes) == 3, "the three models' requests must share decode steps"
    assert together == alone
    # The task models differ: their prefill modules give different first tokens or continuations.
    same_prompt = [encode_prompt(base.tokenizer, PROMPTS[1], chat=True)] * 3
    outs = LocalSUN(base, task_models).generate(same_prompt, greedy, model=names)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert engine.decode.stats().kv_blocks_free == engine.decode.blocks.num_blocks
