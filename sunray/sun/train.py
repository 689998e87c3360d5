"""`sunray train`: SUN, QSUN, LoRA-SUN and full fine-tuning of a task model.

    cfg = TrainConfig(method="sun", task="math", output="runs/math-sun", steps=1000)
    result = train(cfg)          # validates everything first, then trains; writes the prefill-module directory

Methods (docs/sun-training.md, "What is trained"):
- `sun`: the prefill module P (a copy of the base) is trained against the frozen base as decode module D.
- `qsun`: the same against a quantized D: `decode_module` names a quantized module directory (`sunray quantize`),
  or `quantize` ("int8", "int4", "int4-g64") quantizes the base now and saves D in `<output>/decode_module`.
- `lora-sun`: P is the base plus a LoRA delta (only the delta trains, and only the delta is saved).
- `full`: conventional full fine-tuning (the model is its own decode module).

The output directory is a model directory the engine loads (`load_model`): the weights (or the LoRA adapter), the
base's config and tokenizer, and `sunray.json` (method, task, base fingerprint = the decode module's, training
config, final metrics). Training is seeded (data order, LoRA init), prints a progress line, writes a checkpoint
every `save_every` steps (`<output>/checkpoint`, atomically) and continues from it with `resume=True`. On CUDA it
runs under bf16 autocast with float32 master weights.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sunray.models.config import ModelConfig
from sunray.models.fingerprint import weights_hash
from sunray.models.loader import (
    DEFAULT_ALIASES,
    MANIFEST,
    LoadedModel,
    load_model,
    load_state_dict,
    read_manifest,
    resolve_model_dir,
)
from sunray.models.lora import ADAPTER_FILE, adapter_state_dict, add_lora, check_targets
from sunray.models.quant.awq import quantize_model
from sunray.models.quant.checkpoint import save_quantized
from sunray.models.quant.formats import QuantSpec
from sunray.sun.data import Encoded, collate, encode_examples, eos_token_id, prompt_token_ids
from sunray.sun.objective import LossParts, causal_lm_loss, sun_loss
from sunray.sun.tasks import Task, get_task

METHODS = ("sun", "qsun", "lora-sun", "full")
CHECKPOINT = "checkpoint"
DECODE_SUBDIR = "decode_module"
# Settings that may change when resuming (they do not change what is trained).
_RESUMABLE_FIELDS = ("output", "log_every", "save_every", "keep_checkpoint", "device", "eval_every")


class ConfigError(ValueError):
    """A training configuration that cannot work; the message names the field or path."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str
    task: str
    output: str
    base_model: str = "default"
    decode_module: str | None = None  # sun/lora-sun: the base (default); qsun: a quantized module directory
    quantize: str | None = None  # qsun without decode_module: quantize the base now (int8, int4, int4-g<G>)
    group_size: int = 128
    calib_samples: int = 128
    val_data: str | None = None  # JSONL tasks: separate validation / test files
    test_data: str | None = None
    steps: int = 1000
    batch_size: int = 16
    lr: float | None = None  # None: 1e-4 (full, sun, qsun) or 1e-3 (lora-sun)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_prompt_len: int = 512
    max_response_len: int = 128
    num_train: int | None = None  # use the first N training examples (None: all)
    val_examples: int = 64
    seed: int = 0
    device: str | None = None  # None: cuda when available
    amp: str = "auto"  # auto (bf16 on cuda, off on cpu), bf16, off
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    save_every: int = 200
    keep_checkpoint: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; methods: {', '.join(METHODS)}")
        positive = (
            "steps",
            "batch_size",
            "max_prompt_len",
            "max_response_len",
            "log_every",
            "save_every",
            "val_examples",
            "calib_samples",
            "lora_rank",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.num_train is not None and self.num_train <= 0:
            raise ConfigError(f"num_train must be positive, got {self.num_train}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if (
            self.weight_decay < 0
            or self.grad_clip < 0
            or not 0 <= self.lora_dropout < 1
            or self.lora_alpha <= 0
        ):
            raise ConfigError(
                "weight_decay and grad_clip must be >= 0, lora_dropout in [0, 1), lora_alpha > 0"
            )
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.method == "qsun" and not (self.decode_module or self.quantize):
            raise ConfigError(
                "method qsun needs a quantized decode module: --decode-module DIR or --quantize int4|int8"
            )
        if self.method != "qsun" and self.quantize:
            raise ConfigError(f"--quantize goes with method qsun, not {self.method}")
        if self.method == "qsun" and self.decode_module and self.quantize:
            raise ConfigError(
                "give either --decode-module (an already quantized module) or --quantize, not both"
            )
        if self.method == "full" and self.decode_module:
            raise ConfigError("method full trains its own decode module; drop --decode-module")
        if self.quantize:
            try:
                quant_spec(self.quantize, self.group_size)
            except ValueError as e:
                raise ConfigError(f"--quantize: {e}") from None
        if self.method == "lora-sun":
            try:
                check_targets(self.lora_targets)
            except ValueError as e:
                raise ConfigError(f"lora_targets: {e}") from None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora-sun" else 1e-4)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        missing = [n for n in ("method", "task", "output") if n not in d]
        if missing:
            raise ConfigError(f"missing training setting(s): {', '.join(missing)}")
        kinds = _field_kinds()
        out = {}
        for k, v in d.items():
            kind = kinds[k]
            if v is None:
                out[k] = v
            elif kind is float and isinstance(v, (int, float, str)) and not isinstance(v, bool):
                try:
                    out[k] = float(v)  # YAML reads 1e-4 as a string
                except ValueError:
                    raise ConfigError(f"{k} must be a number, got {v!r}") from None
            elif kind is tuple and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                out[k] = tuple(v)
            elif not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise ConfigError(f"{k} must be {_TYPE_NAMES[kind]}, got {v!r}")
            else:
                out[k] = v
        return cls(**out)


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    tuple: "a list of names",
}


@functools.cache
def _field_kinds() -> dict[str, type]:
    """Each TrainConfig field's type as `from_dict` checks it, read from the dataclass's annotations: `X | None` is
    X (None is always accepted), `tuple[str, ...]` is tuple. A field of any other type is a mistake, said here."""
    hints = typing.get_type_hints(TrainConfig)
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
        kind = (typing.get_origin(options[0]) or options[0]) if len(options) == 1 else None
        if kind not in _TYPE_NAMES:
            raise TypeError(f"TrainConfig.{f.name}: from_dict cannot check a {hint}")
        kinds[f.name] = kind
    return kinds


def _is_union(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


@dataclasses.dataclass
class TrainResult:
    output: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]


Logger = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- validation -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    """What validation found: resolved paths, the task, the device."""

    base_dir: Path
    decode_dir: Path | None
    task: Task
    device: torch.device
    resume_from: Path | None


def validate(cfg: TrainConfig, resume: bool = False) -> _Plan:
    """Check paths, the task data, the device and the output directory before anything heavy is loaded."""
    try:
        base_dir = resolve_model_dir(cfg.base_model)
    except FileNotFoundError as e:
        raise ConfigError(f"base_model: {e}") from None
    try:
        base_cfg = ModelConfig.from_pretrained(base_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"base_model {cfg.base_model}: {e}") from None
    base_manifest = read_manifest(base_dir)
    if base_manifest and (base_manifest.get("quantization") or base_manifest.get("lora")):
        raise ConfigError(
            f"base_model {cfg.base_model} is a quantized or LoRA module; train from a full-precision base"
        )
    decode_dir = None
    if cfg.decode_module:
        try:
            decode_dir = resolve_model_dir(cfg.decode_module)
        except FileNotFoundError as e:
            raise ConfigError(f"decode_module: {e}") from None
        if not (decode_dir / "config.json").is_file():
            raise ConfigError(
                f"decode_module {cfg.decode_module} has no config.json; is it a model directory?"
            )
        m = read_manifest(decode_dir) or {}
        quantized = bool(m.get("quantization"))
        if cfg.method == "qsun" and not quantized:
            raise ConfigError(
                f"method qsun needs a quantized decode module; {cfg.decode_module} is not quantized "
                "(make one with `sunray quantize`, or use method sun)"
            )
        if cfg.method in ("sun", "lora-sun") and quantized:
            raise ConfigError(
                f"decode_module {cfg.decode_module} is quantized ({m['quantization'].get('scheme')}); "
                "use method qsun for a quantized decode module"
            )
        if m.get("kind") == "prefill_module":
            raise ConfigError(
                f"decode_module {cfg.decode_module} is a trained prefill module, not a decode module"
            )
    if cfg.max_prompt_len + cfg.max_response_len > base_cfg.max_position_embeddings:
        raise ConfigError(
            f"max_prompt_len + max_response_len = {cfg.max_prompt_len + cfg.max_response_len} exceeds the "
            f"model's context of {base_cfg.max_position_embeddings} tokens"
        )
    try:
        task = get_task(cfg.task, cfg.val_data, cfg.test_data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"task: {e}") from None
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device} was asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {cfg.device!r}: use cpu, cuda or cuda:N")
    if cfg.amp == "bf16" and device.type != "cuda":
        raise ConfigError("amp bf16 needs a CUDA device")
    out = Path(cfg.output).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    ckpt = out / CHECKPOINT
    resume_from = None
    if resume and (ckpt / "state.pt").is_file():
        resume_from = ckpt
        saved = json.loads((ckpt / "config.json").read_text())
        diff = [k for k, v in cfg.to_dict().items() if k not in _RESUMABLE_FIELDS and saved.get(k) != v]
        if diff:
            raise ConfigError(f"cannot resume from {ckpt}: the settings differ in {', '.join(diff)}")
    elif (out / MANIFEST).is_file():
        raise ConfigError(f"output {out} already holds a trained module; choose another directory")
    elif out.is_dir() and any(p.name != DECODE_SUBDIR for p in out.iterdir()):
        raise ConfigError(
            f"output {out} is not empty (and has no checkpoint to resume from); choose another directory"
        )
    try:  # fail now, not after training, if the output cannot be written
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output {out} is not writable: {e}") from None
    return _Plan(base_dir, decode_dir, task, device, resume_from)


# -- models -----------------------------------------------------------------------------------------------------
def _calibration_prompts(tokenizer, tasks: list[Task], n: int, max_len: int) -> list[list[int]]:
    per = max(1, n // len(tasks))
    out = []
    for t in tasks:
        for ex in t.examples("train")[:per]:
            ids = prompt_token_ids(tokenizer, ex)
            if len(ids) <= max_len:
                out.append(ids)
    return out


def quant_spec(scheme: str, group_size: int | None = None, awq: bool | None = None):
    """The QuantSpec of a scheme name; `group_size` applies to a bare `int4`."""
    bare_int4 = scheme.strip().lower() == "int4"
    return QuantSpec.parse(scheme, group_size if bare_int4 else None, awq=awq)


def quantize_decode_module(
    base: LoadedModel,
    base_dir: Path,
    spec,
    out_dir: Path,
    calib_tasks: list[Task],
    calib_samples: int = 128,
    max_len: int = 512,
    base_spec: str = "default",
    awq=None,
) -> Path:
    """Quantize the base (`spec`: a QuantSpec or a scheme name; int4 uses AWQ calibrated on the tasks' training
    prompts unless the spec turns it off; `awq` an AWQConfig) and save it as a decode module directory."""
    if isinstance(spec, str):
        spec = quant_spec(spec)
    model = copy.deepcopy(base.model).float()
    calib = _calibration_prompts(base.tokenizer, calib_tasks, calib_samples, max_len) if spec.awq else None
    info = quantize_model(model, spec, calib, awq)
    info["calibration"] = {"tasks": [t.name for t in calib_tasks], "prompts": len(calib or [])}
    return save_quantized(
        model, info, base_dir, out_dir, base.fingerprint.to_dict(), {"base_model": base_spec}
    )


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -- the loop ---------------------------------------------------------------------------------------------------
def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of `step`: consecutive slices of a fresh seeded permutation per epoch (resumable)."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = min(batch_size - len(out), n - offset)
        out += perm[offset : offset + take]
        pos += take
    return out


def _portable(spec: str, path: Path) -> str:
    """How a manifest names a model: the alias of the embedded default as is, a directory as an absolute path."""
    return spec if spec in DEFAULT_ALIASES else str(path.resolve())


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Trainer:
    def __init__(self, cfg: TrainConfig, plan: _Plan, log: Logger = _stderr) -> None:
        self.cfg, self.plan, self.log = cfg, plan, log
        self.device = plan.device
        self.amp = plan.device.type == "cuda" and cfg.amp in ("auto", "bf16")
        self.out = Path(cfg.output).expanduser()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.base = load_model(plan.base_dir, device=self.device, dtype=torch.float32)
        self.decode: LoadedModel | None = None
        self.decode_dir = plan.decode_dir
        if cfg.method == "qsun" and cfg.quantize:
            self.decode_dir = self.out / DECODE_SUBDIR
            if not (self.decode_dir / MANIFEST).is_file():
                log(
                    f"[{cfg.method} {plan.task.name}] quantizing the base to {cfg.quantize} for the decode module"
                )
                spec = quant_spec(cfg.quantize, cfg.group_size)
                quantize_decode_module(
                    self.base,
                    plan.base_dir,
                    spec,
                    self.decode_dir,
                    [plan.task],
                    cfg.calib_samples,
                    cfg.max_prompt_len,
                    cfg.base_model,
                )
        if cfg.method != "full":
            if self.decode_dir is None:
                self.decode = self.base
            else:
                self.decode = load_model(self.decode_dir, device=self.device, dtype=torch.float32)
                self._check_decode_base()
            self.decode.model.requires_grad_(False).eval()
        # The prefill module (or the full model): a trainable copy of the base (D keeps the base's own storage).
        self.model = copy.deepcopy(self.base.model)
        self.model.requires_grad_(True)
        self.lora_info: dict[str, Any] | None = None
        if cfg.method == "lora-sun":
            torch.manual_seed(cfg.seed)
            add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
            self.lora_info = {
                "rank": cfg.lora_rank,
                "alpha": cfg.lora_alpha,
                "targets": list(cfg.lora_targets),
                "base_model": _portable(cfg.base_model, plan.base_dir),
                "base_weights": weights_hash(load_state_dict(plan.base_dir)),
            }
        self.model.train()
        self.params = [p for _, p in _trainable(self.model)]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        # Data.
        tok, mcfg = self.base.tokenizer, self.base.config
        self.eos = eos_token_id(mcfg, tok)
        task = plan.task
        train_examples = task.examples("train")
        if cfg.num_train is not None:
            train_examples = train_examples[: cfg.num_train]
        self.train_data, self.dropped = encode_examples(
            train_examples, tok, self.eos, cfg.max_prompt_len, cfg.max_response_len
        )
        if not self.train_data:
            raise ConfigError(
                f"no training example fits max_prompt_len {cfg.max_prompt_len} / max_response_len "
                f"{cfg.max_response_len} ({self.dropped} dropped)"
            )
        val = task.examples("val")[: cfg.val_examples]
        self.val_data, _ = encode_examples(val, tok, self.eos, cfg.max_prompt_len, cfg.max_response_len)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.tokens_seen = 0
        self.train_seconds = 0.0

    def _check_decode_base(self) -> None:
        d, b = self.decode.fingerprint, self.base.fingerprint
        for f in ("architecture", "tokenizer", "weights"):
            if getattr(d, f) != getattr(b, f):
                raise ConfigError(
                    f"decode_module {self.decode_dir} was made from another base than {self.cfg.base_model} "
                    f"({f}: {getattr(d, f)} != {getattr(b, f)})"
                )

    def loss(self, batch) -> LossParts:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            if self.cfg.method == "full":
                return causal_lm_loss(self.model, batch)
            return sun_loss(self.model, self.decode.model, batch)

    @torch.no_grad()
    def validate_loss(self) -> dict[str, float]:
        if not self.val_data:
            return {}
        self.model.eval()
        first = rest = 0.0
        nf = nr = 0
        bs = self.cfg.batch_size
        for i in range(0, len(self.val_data), bs):
            parts = self.loss(collate(self.val_data[i : i + bs], self.device))
            first += float(parts.first_sum)
            rest += float(parts.rest_sum)
            nf += parts.num_first
            nr += parts.num_rest
        self.model.train()
        return {
            "val_loss": (first + rest) / max(1, nf + nr),
            "val_first_token_loss": first / max(1, nf),
            "val_rest_loss": rest / max(1, nr),
        }

    def train_step(self, items: list[Encoded]) -> dict[str, float]:
        batch = collate(items, self.device)
        parts = self.loss(batch)
        parts.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf")))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += batch.num_tokens
        return {**parts.metrics(), "grad_norm": grad_norm}

    def run(self) -> TrainResult:
        cfg = self.cfg
        name = f"[{cfg.method} {self.plan.task.name}]"
        if self.plan.resume_from is not None:
            self.load_checkpoint(self.plan.resume_from)
            self.log(f"{name} resumed from {self.plan.resume_from} at step {self.step}")
        n_train = sum(p.numel() for p in self.params)
        self.log(
            f"{name} {len(self.train_data)} training examples ({self.dropped} too long, dropped), "
            f"{n_train / 1e6:.2f} M trainable parameters, device {self.device}"
            f"{' (bf16 autocast)' if self.amp else ''}, seed {cfg.seed}"
        )
        window: list[dict[str, float]] = []
        t_window = time.perf_counter()
        tok_window = self.tokens_seen
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            m = self.train_step(
                [
                    self.train_data[i]
                    for i in _batch_indices(self.step, cfg.batch_size, len(self.train_data), cfg.seed)
                ]
            )
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(
                    f"{name} the loss became {m['loss']} at step {self.step}; lower the learning rate"
                )
            window.append(m)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.perf_counter() - t_window
                rec = {
                    "step": self.step,
                    "loss": sum(w["loss"] for w in window) / len(window),
                    "first_token_loss": sum(w["first_token_loss"] for w in window) / len(window),
                    "lr": self.scheduler.get_last_lr()[0],
                }
                sps = len(window) / dt if dt > 0 else 0.0
                tps = (self.tokens_seen - tok_window) / dt if dt > 0 else 0.0
                eta = (cfg.steps - self.step) / sps if sps else 0.0
                self.log(
                    f"{name} step {self.step}/{cfg.steps} loss {rec['loss']:.4f} (first token {rec['first_token_loss']:.3f}) "
                    f"lr {rec['lr']:.2e} | {sps:.2f} step/s {tps:,.0f} tok/s | eta {_fmt_time(eta)}"
                )
                self.history.append(rec)
                window, t_window, tok_window = [], time.perf_counter(), self.tokens_seen
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                v = self.validate_loss()
                if v:
                    self.log(f"{name} step {self.step} val loss {v['val_loss']:.4f}")
                    self.history.append({"step": self.step, **v})
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        metrics = {
            "steps": self.step,
            "train_loss": self.history[-1]["loss"] if self.history else None,
            **self.validate_loss(),
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 1),
            "train_examples": len(self.train_data),
            "dropped_examples": self.dropped,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
        }
        if "val_loss" in metrics:
            self.log(
                f"{name} done: val loss {metrics['val_loss']:.4f} (first token {metrics['val_first_token_loss']:.3f})"
            )
        out = self.write_output(metrics)
        if not cfg.keep_checkpoint:
            shutil.rmtree(self.out / CHECKPOINT, ignore_errors=True)
        return TrainResult(out, metrics, self.history)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in _trainable(self.model)}

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        final = self.out / CHECKPOINT
        tmp = self.out / f".{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = self._trainable_state()
        if self.cfg.method != "lora-sun" and self.model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "history": self.history,
                "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            },
            tmp / "state.pt",
        )
        (tmp / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        old = self.out / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self.log(f"[{self.cfg.method} {self.plan.task.name}] checkpoint at step {self.step}: {final}")
        return final

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path / "trainable.safetensors"))
        params = dict(_trainable(self.model))
        with torch.no_grad():
            for n, p in params.items():
                if n in state:
                    p.copy_(state[n].to(p.device, p.dtype))
                elif not (n == "lm_head.weight" and self.model.config.tie_word_embeddings):
                    raise ConfigError(f"checkpoint {path} lacks {n}")
        s = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.step, self.history = s["step"], s["history"]
        self.tokens_seen, self.train_seconds = s["tokens_seen"], s["train_seconds"]
        torch.set_rng_state(s["torch_rng"])
        random.setstate(s["python_rng"])
        if s.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(s["cuda_rng"])

    # -- output -----------------------------------------------------------------------------------------------
    def write_output(self, metrics: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        out = self.out
        for f in self.plan.base_dir.iterdir():  # config + tokenizer of the base
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")) and f.name != MANIFEST:
                shutil.copy2(f, out / f.name)
        manifest: dict[str, Any] = {
            "kind": "prefill_module",
            "method": self.cfg.method,
            "task": self.plan.task.name,
            "base_model": _portable(self.cfg.base_model, self.plan.base_dir),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "training": self.cfg.to_dict(),
            "metrics": metrics,
        }
        if self.cfg.method == "full":
            manifest["decode_module"] = "self"  # conventional: the model decodes for itself
            manifest["trained_from_fingerprint"] = self.base.fingerprint.to_dict()
        else:
            manifest["decode_module"] = (
                str(self.decode_dir.resolve())
                if self.decode_dir
                else _portable(self.cfg.base_model, self.plan.base_dir)
            )
            manifest["base_fingerprint"] = self.decode.fingerprint.to_dict()
        if self.cfg.method == "lora-sun":
            save_file(adapter_state_dict(self.model), str(out / ADAPTER_FILE), metadata={"format": "pt"})
            manifest["lora"] = self.lora_info
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            if self.model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        tmp = out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, out / MANIFEST)  # the manifest last: its presence means the module is complete
        return out


def train(cfg: TrainConfig, resume: bool = False, log: Logger = _stderr) -> TrainResult:
    """Validate `cfg`, then train and write the module. Raises ConfigError (before any training) on a bad config."""
    plan = validate(cfg, resume)
    return Trainer(cfg, plan, log).run()
