"""The training-side commands of `sunray`:

sunray train --method sun --task math --output runs/math-sun [--steps 1000 --batch-size 16 --seed 0 ...]
sunray train --config train.yaml [--resume]
sunray quantize --scheme int4 --group-size 128 --calib-tasks math code tool --output runs/decode-int4
sunray eval --prefill-module runs/math-sun [--decode-module DIR] [--task math] [--limit 300] --json r.json --markdown r.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from sunray.models.devices import add_device_flags, device_and_dtype
from sunray.models.loader import DEFAULT_MODEL, read_manifest

_BOOL_FIELDS = ("keep_checkpoint",)


def _train_fields():
    from sunray.sun.train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _read_config_file(path: str) -> dict[str, Any]:
    from sunray.sun.train import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json and yaml raise their own types
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def cmd_train(args) -> int:
    from sunray.sun.train import TrainConfig, train

    settings: dict[str, Any] = _read_config_file(args.config) if args.config else {}
    for name in _train_fields():
        value = getattr(args, name, None)
        if value is not None and not (name in _BOOL_FIELDS and value is False):
            settings[name] = value
    cfg = TrainConfig.from_dict(settings)
    result = train(cfg, resume=args.resume)
    m = result.metrics
    val = f", val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
    print(f"wrote {result.output} ({cfg.method}, {m['steps']} steps{val})")
    return 0


def cmd_quantize(args) -> int:
    import torch

    from sunray.models.loader import load_model, resolve_model_dir
    from sunray.sun.tasks import get_task
    from sunray.sun.train import quant_spec, quantize_decode_module

    spec = quant_spec(args.scheme, args.group_size, awq=False if args.no_awq else None)
    if args.calib_samples <= 0:
        raise ValueError(f"--calib-samples must be positive, got {args.calib_samples}")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} exists and is not an empty directory; choose another")
    tasks = [get_task(t) for t in args.calib_tasks]
    base_dir = resolve_model_dir(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(base_dir, device=device, dtype=torch.float32)
    path = quantize_decode_module(base, base_dir, spec, out, tasks, args.calib_samples, base_spec=args.model)
    print(f"wrote {path} ({spec.name}, {'AWQ' if spec.awq else 'round-to-nearest'})")
    return 0


def cmd_eval(args) -> int:
    import torch

    from sunray.models.loader import load_model, resolve_model_dir
    from sunray.sun.evaluate import evaluate, markdown_table, write_results
    from sunray.sun.tasks import get_task

    prefill_dir = resolve_model_dir(args.prefill_module)
    manifest = read_manifest(prefill_dir) or {}
    decode_spec = args.decode_module or manifest.get("decode_module") or DEFAULT_MODEL
    task_spec = args.task or manifest.get("task")
    if not task_spec:
        raise ValueError(f"{args.prefill_module} names no task in its manifest; pass --task")
    training = manifest.get("training") or {}
    task = get_task(
        task_spec, args.val_data or training.get("val_data"), args.test_data or training.get("test_data")
    )
    device, dtype = device_and_dtype(args)
    torch.manual_seed(0)
    prefill = load_model(prefill_dir, device=device, dtype=dtype)
    if decode_spec == "self":
        decode = prefill
    else:
        decode_dir = resolve_model_dir(decode_spec)
        decode = (
            prefill
            if decode_dir.resolve() == prefill_dir.resolve()
            else load_model(decode_dir, device=device, dtype=dtype)
        )
    result = evaluate(
        prefill,
        decode,
        task,
        args.split,
        args.limit,
        naive_mix=args.naive_mix,
        keep_samples=max(8, args.show),
    )
    for s in result.samples[: args.show]:
        print(
            f"--- {'OK ' if s['correct'] else 'BAD'} {s['prompt'][-120:]!r}\n    -> {s['completion']!r}",
            file=sys.stderr,
        )
    write_results([result], args.json, args.markdown)
    sys.stdout.write(markdown_table([result]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from sunray.sun.train import METHODS

    t = sub.add_parser(
        "train",
        help="train a task model: SUN / QSUN / LoRA-SUN prefill module, or full fine-tuning",
        description="Settings come from --config (JSON or YAML, keys as the flags with underscores) "
        "and the flags below, flags winning.",
    )
    t.add_argument("--config", help="a JSON or YAML file of training settings")
    t.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint if there is one")
    t.add_argument(
        "--method", choices=METHODS, help="sun, qsun (against a quantized decode module), lora-sun, full"
    )
    t.add_argument(
        "--task", help="math, code, tool, or a JSONL file of {prompt, response} / {messages} lines"
    )
    t.add_argument("--output", help="the directory to write the trained module to (must be new or empty)")
    t.add_argument(
        "--base-model", dest="base_model", help=f"the base model directory (default: {DEFAULT_MODEL})"
    )
    t.add_argument(
        "--decode-module",
        dest="decode_module",
        help="the frozen decode module (default: the base; qsun: a directory from `sunray quantize`)",
    )
    t.add_argument(
        "--quantize", help="qsun: quantize the base now (int8, int4, int4-g<G>) into <output>/decode_module"
    )
    t.add_argument("--group-size", dest="group_size", type=int, help="int4 group size (default 128)")
    t.add_argument(
        "--calib-samples", dest="calib_samples", type=int, help="AWQ calibration prompts (default 128)"
    )
    t.add_argument("--val-data", dest="val_data", help="JSONL task: a validation file")
    t.add_argument("--test-data", dest="test_data", help="JSONL task: a test file")
    t.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    t.add_argument("--batch-size", dest="batch_size", type=int, help="examples per step (default 16)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-4; lora-sun 1e-3)")
    t.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warm-up steps (default 50)")
    t.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0)")
    t.add_argument("--grad-clip", dest="grad_clip", type=float, help="gradient norm clip (default 1; 0: off)")
    t.add_argument(
        "--max-prompt-len", dest="max_prompt_len", type=int, help="drop longer prompts (tokens, default 512)"
    )
    t.add_argument(
        "--max-response-len", dest="max_response_len", type=int, help="drop longer responses (default 128)"
    )
    t.add_argument("--num-train", dest="num_train", type=int, help="use only the first N training examples")
    t.add_argument(
        "--val-examples", dest="val_examples", type=int, help="validation examples for the loss (default 64)"
    )
    t.add_argument("--seed", type=int, help="seed of data order and initialization (default 0)")
    t.add_argument("--amp", choices=["auto", "bf16", "off"], help="bf16 autocast (auto: on CUDA)")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument(
        "--log-every", dest="log_every", type=int, help="steps between progress lines (default 10)"
    )
    t.add_argument(
        "--eval-every", dest="eval_every", type=int, help="steps between validation losses (default 0: end)"
    )
    t.add_argument(
        "--save-every", dest="save_every", type=int, help="steps between checkpoints (default 200)"
    )
    t.add_argument(
        "--keep-checkpoint",
        dest="keep_checkpoint",
        action="store_true",
        default=None,
        help="keep <output>/checkpoint after training",
    )
    t.add_argument("--lora-rank", dest="lora_rank", type=int, help="lora-sun: rank (default 16)")
    t.add_argument("--lora-alpha", dest="lora_alpha", type=float, help="lora-sun: alpha (default 32)")
    t.add_argument(
        "--lora-targets", dest="lora_targets", nargs="+", help="lora-sun: linear layers (default: all 7)"
    )
    t.add_argument("--lora-dropout", dest="lora_dropout", type=float, help="lora-sun: dropout (default 0)")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser(
        "quantize", help="quantize a base model into a QSUN decode module (int8, or int4 with AWQ)"
    )
    q.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"the base model directory (default: {DEFAULT_MODEL})"
    )
    q.add_argument("--scheme", default="int4", help="int8, int4 or int4-g<G> (default int4)")
    q.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128)")
    q.add_argument(
        "--calib-tasks",
        nargs="+",
        default=["math", "code", "tool"],
        help="tasks whose training prompts calibrate AWQ",
    )
    q.add_argument("--calib-samples", type=int, default=128, help="calibration prompts in all (default 128)")
    q.add_argument("--no-awq", action="store_true", help="int4 by plain rounding, without AWQ")
    q.add_argument("--output", required=True, help="the directory to write the decode module to")
    q.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="task accuracy of a prefill module + decode module through the engine")
    e.add_argument(
        "--prefill-module", default=DEFAULT_MODEL, help="a trained module directory (default: the base)"
    )
    e.add_argument(
        "--decode-module",
        default=None,
        help="the decode module (default: the one the prefill module names; full FT: itself)",
    )
    e.add_argument(
        "--task", default=None, help="math, code, tool or a JSONL file (default: the module's task)"
    )
    e.add_argument("--val-data", default=None, help="JSONL task: a validation file")
    e.add_argument("--test-data", default=None, help="JSONL task: a test file")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of the split")
    e.add_argument(
        "--naive-mix",
        action="store_true",
        help="pair a prefill module with a decode module it was not trained for (the naive-mix baseline)",
    )
    e.add_argument(
        "--json", default=None, help="write the result (with sample completions) to this JSON file"
    )
    e.add_argument("--markdown", default=None, help="write the result table to this markdown file")
    e.add_argument("--show", type=int, default=0, help="print the first N completions to stderr")
    add_device_flags(e)
    e.set_defaults(func=cmd_eval)
