"""SUN training on CUDA (bf16 autocast, fused AdamW) and quantized decode modules in the CUDA engine.

Tiny random models, seconds on the GPU machine. The CPU tests (tests/test_sun_*.py) cover the logic; these check
that the same code runs on CUDA: the loss falls, D stays bit-identical, the int4/int8 decode modules serve through
the engine's fast path."""

from __future__ import annotations

import pytest
import torch

from sunray.engine.local import LocalSUN
from sunray.engine.sequence import SamplingParams
from sunray.models.loader import load_model
from sunray.sun.data import collate, encode_examples, eos_token_id
from sunray.sun.objective import sun_loss
from sunray.sun.tasks import get_task
from sunray.sun.train import TrainConfig, Trainer, validate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("sungpu"), "llama", seed=7)


@pytest.mark.parametrize(
    "method, extra",
    [("sun", {}), ("qsun", {"quantize": "int4", "group_size": 32}), ("lora-sun", {"lr": 1e-2}), ("full", {})],
)
def test_training_on_cuda_with_bf16_autocast(tmp_path, tiny_dir, method, extra):
    args = dict(
        method=method,
        task="math",
        output=str(tmp_path / method),
        base_model=str(tiny_dir),
        steps=12,
        batch_size=8,
        lr=3e-3,
        warmup_steps=0,
        num_train=16,
        val_examples=8,
        device="cuda",
        log_every=4,
        max_prompt_len=192,
        max_response_len=56,
        calib_samples=4,
    )
    args.update(extra)
    cfg = TrainConfig(**args)
    trainer = Trainer(cfg, validate(cfg), log=lambda _: None)
    assert trainer.amp
    decode = trainer.decode.model if trainer.decode else None
    before = {k: v.clone() for k, v in decode.state_dict().items()} if decode is not None else {}
    enc, _ = encode_examples(
        get_task("math").examples("train", 8),
        trainer.base.tokenizer,
        eos_token_id(trainer.base.config, trainer.base.tokenizer),
        192,
        56,
    )
    batch = collate(enc, "cuda")
    with torch.no_grad():
        start = float(trainer.loss(batch).loss)
    res = trainer.run()
    with torch.no_grad():
        end = float(trainer.loss(batch).loss)
    assert end < start - 0.05
    if decode is not None:
        assert all(torch.equal(v, before[k]) for k, v in decode.state_dict().items())
    prefill = load_model(res.output, device="cuda")
    dec = prefill if method == "full" else load_model(trainer.decode_dir or tiny_dir, device="cuda")
    outs = LocalSUN(dec, {"t": prefill}).generate(
        [[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), model="t"
    )
    assert len(outs[0].token_ids) == 5


def test_sun_loss_bf16_close_to_fp32(tiny_dir):
    lm = load_model(tiny_dir, device="cuda", dtype=torch.float32)
    enc, _ = encode_examples(
        get_task("tool").examples("train", 4), lm.tokenizer, eos_token_id(lm.config, lm.tokenizer), 250, 60
    )
    if not enc:
        pytest.skip("no tool example fits the tiny model's context")
    batch = collate(enc, "cuda")
    with torch.no_grad():
        ref = float(sun_loss(lm.model, lm.model, batch).loss)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = float(sun_loss(lm.model, lm.model, batch).loss)
    assert abs(got - ref) < 2e-2 * abs(ref)
