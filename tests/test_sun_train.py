"""SUN training on tiny random models: the SUN loss (equal to the causal-LM loss when D = P), gradients that reach
the prefill module only through the prompt KV, training that lowers the loss and leaves the decode module
bit-identical, the output module the engine loads (sun, full, lora-sun, qsun), resume, and config errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from sunray.engine.local import LocalSUN
from sunray.engine.sequence import SamplingParams
from sunray.models.loader import load_model
from sunray.sun.data import collate, encode_examples, eos_token_id
from sunray.sun.objective import causal_lm_loss, sun_loss
from sunray.sun.tasks import get_task
from sunray.sun.train import ConfigError, TrainConfig, Trainer, train, validate

LIMITS = dict(max_prompt_len=192, max_response_len=56)  # the tiny models' context is 256 tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("sun"), "llama", seed=5)


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def batch(base):
    enc, _ = encode_examples(
        get_task("math").examples("train", 4),
        base.tokenizer,
        eos_token_id(base.config, base.tokenizer),
        192,
        56,
    )
    return collate(enc)


def _cfg(tmp_path, tiny_dir, method="sun", **kw) -> TrainConfig:
    args = dict(
        method=method,
        task="math",
        output=str(tmp_path / f"out-{method}"),
        base_model=str(tiny_dir),
        steps=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        num_train=8,
        val_examples=4,
        log_every=2,
        device="cpu",
        **LIMITS,
    )
    args.update(kw)
    return TrainConfig(**args)


@pytest.mark.parametrize("family", ["qwen3", "hyperclovax"])
def test_sun_loss_with_decode_equal_to_prefill_is_the_causal_lm_loss(tmp_path, family, batch):
    from tiny_models import make_tiny_model_dir

    lm = load_model(make_tiny_model_dir(tmp_path, family))
    a, b = sun_loss(lm.model, lm.model, batch), causal_lm_loss(lm.model, batch)
    assert a.num_first + a.num_rest == b.num_first + b.num_rest == batch.num_target_tokens
    torch.testing.assert_close(a.first_sum, b.first_sum)
    torch.testing.assert_close(a.rest_sum, b.rest_sum, rtol=1e-5, atol=1e-4)


def test_training_view_matches_the_engine(base):
    """What SUN trains is what the engine serves: under teacher forcing with the engine's own greedy output, the
    training pass's argmax reproduces every token (the first from P's logits, the rest from D over P's KV)."""
    from sunray.models.loader import wrap_model
    from sunray.sun.data import Encoded

    prefill_model = copy.deepcopy(base.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prefill_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    prefill = wrap_model(
        prefill_model, base.tokenizer, manifest={"base_fingerprint": base.fingerprint.to_dict()}
    )
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    outs = LocalSUN(base, {"p": prefill}).generate(
        prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), model="p"
    )
    b = collate([Encoded(p, o.token_ids) for p, o in zip(prompts, outs)])
    captured = {}

    def spy(model, key):
        orig = model.compute_logits

        def f(h):
            captured[key] = orig(h)
            return captured[key]

        model.compute_logits = f

    spy(base.model, "d")
    spy(prefill_model, "p")
    try:
        with torch.no_grad():
            parts = sun_loss(prefill_model, base.model, b)
    finally:
        del base.model.compute_logits
    assert parts.num_rest == 3 * 5
    assert captured["p"].argmax(-1).tolist() == [o.token_ids[0] for o in outs]
    assert captured["d"].argmax(-1).view(3, 5).tolist() == [o.token_ids[1:] for o in outs]
    # The first tokens come from P: the decode module alone would often pick others.
    assert any(
        o.token_ids != c.token_ids
        for o, c in zip(
            outs,
            LocalSUN(base, {"b": base}).generate(
                prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), model="b"
            ),
        )
    )


def test_gradients_reach_the_prefill_module_only_through_the_kv(base, batch):
    prefill = copy.deepcopy(base.model).requires_grad_(True)
    parts = sun_loss(prefill, base.model, batch)
    parts.rest_sum.backward()  # the first-token loss masked out: only D's predictions count
    last = prefill.model.layers[-1]
    # The last layer's k/v projections write the prompt KV that D reads: they get gradient ...
    assert last.self_attn.k_proj.weight.grad.abs().sum() > 0
    assert last.self_attn.v_proj.weight.grad.abs().sum() > 0
    # ... while what only feeds P's own output after the last KV (last q/o/MLP, final norm, lm_head) gets none.
    for p in (
        last.self_attn.q_proj.weight,
        last.self_attn.o_proj.weight,
        last.mlp.down_proj.weight,
        prefill.lm_head.weight,
    ):
        assert p.grad is None or p.grad.abs().sum() == 0
    # Earlier layers feed the KV of later ones: gradient everywhere there.
    assert prefill.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    # D is frozen: no gradient is even computed for it.
    assert all(p.grad is None for p in base.model.parameters())
    # The first-token loss reaches P's head.
    prefill.zero_grad()
    sun_loss(prefill, base.model, batch).first_sum.backward()
    assert prefill.lm_head.weight.grad.abs().sum() > 0


def test_sun_training_lowers_the_loss_and_changes_only_the_prefill_module(tmp_path, tiny_dir, base, batch):
    cfg = _cfg(tmp_path, tiny_dir, steps=8)
    lines: list[str] = []
    trainer = Trainer(cfg, validate(cfg), log=lines.append)
    decode_before = {k: v.clone() for k, v in trainer.decode.model.state_dict().items()}
    prefill_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        loss_before = float(sun_loss(trainer.model, trainer.decode.model, batch).loss)
    result = trainer.run()
    with torch.no_grad():
        loss_after = float(sun_loss(trainer.model, trainer.decode.model, batch).loss)
    assert loss_after < loss_before - 0.05
    assert all(torch.equal(v, decode_before[k]) for k, v in trainer.decode.model.state_dict().items())
    assert any(not torch.equal(v, prefill_before[k]) for k, v in trainer.model.state_dict().items())
    assert any("step 8/8" in line for line in lines)  # progress lines
    # The output is a prefill module for the base: the engine pairs it with the base as decode module.
    manifest = json.loads((result.output / "sunray.json").read_text())
    assert manifest["method"] == "sun" and manifest["task"] == "math" and manifest["training"]["steps"] == 8
    assert "val_loss" in manifest["metrics"] and not (result.output / "checkpoint").exists()
    prefill = load_model(result.output)
    assert prefill.fingerprint == base.fingerprint
    assert torch.equal(prefill.model.lm_head.weight, trainer.model.lm_head.weight)
    engine = LocalSUN(base, {"math": prefill})
    outs = engine.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), model="math"
    )
    assert len(outs[0].token_ids) == 4


def test_resume_continues_exactly(tmp_path, tiny_dir):
    cfg = _cfg(tmp_path, tiny_dir, steps=4, save_every=2, keep_checkpoint=True)
    first = train(cfg, log=lambda _: None)
    weights = load_model(first.output).model.state_dict()
    ckpt = json.loads((first.output / "checkpoint" / "config.json").read_text())
    assert ckpt["steps"] == 4
    # Continue from the step-2 checkpoint: the result is bit-identical to the uninterrupted run.
    lines: list[str] = []
    again = train(cfg, resume=True, log=lines.append)
    assert any("resumed" in line and "step 2" in line for line in lines)
    for k, v in load_model(again.output).model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with pytest.raises(ConfigError, match="settings differ in lr"):
        validate(_cfg(tmp_path, tiny_dir, steps=4, save_every=2, lr=1e-3), resume=True)


def test_full_and_lora_sun_outputs_load_in_the_engine(tmp_path, tiny_dir, base):
    full = train(_cfg(tmp_path, tiny_dir, method="full", steps=2), log=lambda _: None)
    full_lm = load_model(full.output)
    assert json.loads((full.output / "sunray.json").read_text())["decode_module"] == "self"
    assert full_lm.fingerprint != base.fingerprint  # its own decode module: not compatible with the base's
    with pytest.raises(ValueError, match="another base"):
        LocalSUN(base, {"full": full_lm})
    LocalSUN(full_lm, {"full": full_lm}).generate([[5, 6]], SamplingParams(max_tokens=2, temperature=0.0))

    cfg = _cfg(
        tmp_path,
        tiny_dir,
        method="lora-sun",
        steps=3,
        lr=1e-2,
        lora_rank=4,
        lora_targets=("q_proj", "v_proj", "down_proj"),
    )
    trainer = Trainer(cfg, validate(cfg), log=lambda _: None)
    n_trainable = sum(p.numel() for p in trainer.params)
    res = trainer.run()
    adapter = res.output / "adapter.safetensors"
    assert adapter.is_file() and not (res.output / "model.safetensors").exists()
    assert adapter.stat().st_size < 4 * n_trainable + 4096
    lora_lm = load_model(res.output)  # the base plus the merged delta
    assert lora_lm.fingerprint == base.fingerprint
    ids = torch.tensor([5, 6, 7, 8])
    from sunray.models.dense_attention import TrainContext, positions

    with torch.no_grad():
        want = trainer.model(ids, positions(1, 4), TrainContext.causal(1, 4))
        got = lora_lm.model(ids, positions(1, 4), TrainContext.causal(1, 4))
        plain = base.model(ids, positions(1, 4), TrainContext.causal(1, 4))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain)
    LocalSUN(base, {"lora": lora_lm}).generate([[5, 6]], SamplingParams(max_tokens=2, temperature=0.0))


def test_qsun_trains_against_the_quantized_decode_module(tmp_path, tiny_dir, base):
    cfg = _cfg(tmp_path, tiny_dir, method="qsun", quantize="int4", group_size=32, steps=2, calib_samples=4)
    res = train(cfg, log=lambda _: None)
    decode = load_model(res.output / "decode_module")
    prefill = load_model(res.output)
    assert decode.fingerprint.quantization == "int4-g32" == prefill.fingerprint.quantization
    LocalSUN(decode, {"q": prefill}).generate([[5, 6]], SamplingParams(max_tokens=2, temperature=0.0))
    with pytest.raises(ValueError, match="quantization"):
        LocalSUN(base, {"q": prefill})
    # sun refuses a quantized decode module, qsun a plain one.
    with pytest.raises(ConfigError, match="use method qsun"):
        validate(
            _cfg(
                tmp_path,
                tiny_dir,
                decode_module=str(res.output / "decode_module"),
                output=str(tmp_path / "x"),
            )
        )
    with pytest.raises(ConfigError, match="not quantized"):
        validate(
            _cfg(tmp_path, tiny_dir, method="qsun", decode_module=str(tiny_dir), output=str(tmp_path / "y"))
        )


def test_bad_configs_fail_before_training(tmp_path, tiny_dir):
    def err(**kw) -> str:
        with pytest.raises(ConfigError) as e:
            validate(_cfg(tmp_path, tiny_dir, **kw))
        return str(e.value)

    assert "does not exist" in err(base_model=str(tmp_path / "nope"))
    assert "unknown task" in err(task="poetry")
    assert "does not exist" in err(task=str(tmp_path / "missing.jsonl"))
    assert "exceeds the model's context" in err(max_prompt_len=250)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in err(device="cuda")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert "not empty" in err(output=str(tmp_path / "busy"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\nnot json\n')
    assert f"{bad}:3: invalid JSON" in err(task=str(bad))
    for kw, word in [
        ({"method": "dpo"}, "method"),
        ({"steps": 0}, "steps"),
        ({"lr": 5.0}, "lr"),
        ({"method": "qsun"}, "quantized decode module"),
        ({"quantize": "int4"}, "qsun"),
        ({"method": "qsun", "quantize": "int5"}, "int5"),
        ({"amp": "fp8"}, "amp"),
    ]:
        with pytest.raises(ConfigError, match=word):
            _cfg(tmp_path, tiny_dir, **kw)
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"method": "sun", "task": "math", "output": "o", "stepz": 3})
    with pytest.raises(ConfigError, match="steps must be an integer"):
        TrainConfig.from_dict({"method": "sun", "task": "math", "output": "o", "steps": "many"})
    assert not (tmp_path / "out-sun").exists() or not any((tmp_path / "out-sun").iterdir())


def test_cli_train_and_eval(tmp_path, tiny_dir, capsys):
    from sunray.cli import main

    out = tmp_path / "cli-sun"
    common = [
        "--base-model",
        str(tiny_dir),
        "--max-prompt-len",
        "192",
        "--max-response-len",
        "56",
        "--device",
        "cpu",
    ]
    assert (
        main(
            [
                "train",
                "--method",
                "sun",
                "--task",
                "math",
                "--output",
                str(out),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--num-train",
                "4",
                "--val-examples",
                "2",
                *common,
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    rj, rm = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(["eval", "--prefill-module", str(out), "--limit", "3", "--json", str(rj), "--markdown", str(rm)])
        == 0
    )
    res = json.loads(rj.read_text())[0]
    assert res["task"] == "math" and res["n"] == 3 and 0 <= res["accuracy"] <= 1
    assert (
        Path(res["decode_module"]).resolve() == Path(tiny_dir).resolve()
        and "| math | test |" in rm.read_text()
    )
    # Bad settings: exit code 2 and a message naming the problem, nothing trained.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: sun\ntask: math\noutput: " + str(tmp_path / "o") + "\nbatch_size: -1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "batch_size must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--method", "sun", "--task", "math", "--output", str(out), *common]) == 2
    assert "already holds a trained module" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file" in capsys.readouterr().err


_REQUIRED = {"method": "sun", "task": "math", "output": "o"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", "many", "steps must be an integer, got 'many'"),
        ("steps", True, "steps must be an integer, got True"),
        ("steps", 2.5, "steps must be an integer, got 2.5"),
        ("num_train", "all", "num_train must be an integer, got 'all'"),
        ("lr", "fast", "lr must be a number, got 'fast'"),
        ("lr", True, "lr must be a number, got True"),
        ("lora_alpha", [32], r"lora_alpha must be a number, got \[32\]"),
        ("method", 3, "method must be a string, got 3"),
        ("decode_module", 1.5, "decode_module must be a string, got 1.5"),
        ("keep_checkpoint", "yes", "keep_checkpoint must be true or false, got 'yes'"),
        ("keep_checkpoint", 1, "keep_checkpoint must be true or false, got 1"),
        ("lora_targets", "q_proj", "lora_targets must be a list of names, got 'q_proj'"),
        ("lora_targets", ["q_proj", 3], r"lora_targets must be a list of names, got \['q_proj', 3\]"),
    ],
)
def test_config_from_dict_names_the_field_and_its_type(field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        TrainConfig.from_dict({**_REQUIRED, field: value})


def test_config_from_dict_converts_what_yaml_and_json_give():
    cfg = TrainConfig.from_dict(
        {
            **_REQUIRED,
            "lr": "1e-4",
            "weight_decay": 0,
            "lora_targets": ["q_proj", "v_proj"],
            "num_train": None,
        }
    )
    assert cfg.lr == 1e-4 and isinstance(cfg.weight_decay, float) and cfg.weight_decay == 0.0
    assert cfg.lora_targets == ("q_proj", "v_proj") and cfg.num_train is None
    assert TrainConfig.from_dict(
        {**_REQUIRED, "keep_checkpoint": True, "decode_module": None}
    ).keep_checkpoint
