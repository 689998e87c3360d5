"""Task models trained on demand and cached: a serving config names a prefill module by its training settings.

    # deployments/default.yaml, one task model:
    #   prefill_module: {train: {method: lora-sun, task: math, steps: 40, batch_size: 8}}
    settings = check_settings({"method": "lora-sun", "task": "math", "steps": 40})  # ConfigError naming the field
    path = ensure_trained(settings)     # the cached module, or trained now with `sunray train`'s code, then cached

The settings are `sunray train`'s (`TrainConfig` fields) without `output`: the cache chooses the directory,
`<cache_dir()>/task-models/<task>-<method>-<key>`, where the key hashes what determines the module: the identity
of the base (and of the decode module, if one is named: architecture, tokenizer and weights hashes, as in a
fingerprint), the content of JSONL data files, and every training setting except the ones that only change how it
runs (device, logging, checkpoint frequency). Changing a setting trains a new module; nothing is overwritten.

Once only, and never half: a module trains under an exclusive `fcntl` lock of its entry (two replicas, or two
processes, resolving the same module train it once; the second waits and loads it), and under a machine-wide
training lock (several modules train one after another, not all at once on the same cores). Training writes into
`.<name>.partial`, with `sunray train`'s checkpoints; the directory is renamed to its final name only when the
module is complete, so a killed first start leaves no module that looks finished, and the next resolution resumes
from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sunray.models.loader import MANIFEST, cache_dir, read_manifest, resolve_model_dir
from sunray.sun.train import _RESUMABLE_FIELDS, CHECKPOINT, METHODS, ConfigError, TrainConfig, train

SUBDIR = "task-models"
KEY_VERSION = 1
# Settings a config may not give: the cache chooses the directory; `full` and on-the-fly quantization do not make
# a prefill module for the shared decode module the config serves.
_REFUSED = {
    "output": "the cache chooses the directory; drop `output`",
    "quantize": "name an already quantized decode module (`sunray quantize`) as decode_module instead",
    "keep_checkpoint": "a cached module keeps no checkpoint; drop `keep_checkpoint`",
}
SERVABLE_METHODS = tuple(m for m in METHODS if m != "full")
_PLACEHOLDER = "<task-model cache>"

Logger = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate training settings for a cached task model without loading anything heavy; return them normalized
    (keys with underscores, numbers as TrainConfig takes them). Raises ConfigError naming the setting."""
    from sunray.sun.tasks import get_task

    if not isinstance(settings, dict):
        raise ConfigError(
            f"training settings must be a mapping of `sunray train` settings, not {type(settings).__name__}"
        )
    s = {str(k).replace("-", "_"): v for k, v in settings.items()}
    for name, why in _REFUSED.items():
        if name in s:
            raise ConfigError(f"{name}: {why}")
    if "method" not in s or "task" not in s:
        raise ConfigError(
            f"missing training setting(s): {', '.join(n for n in ('method', 'task') if n not in s)}"
        )
    if s["method"] == "full":
        raise ConfigError(
            "method full trains a model that is its own decode module; a task model of a shared decode "
            f"module needs one of {', '.join(SERVABLE_METHODS)}"
        )
    cfg = TrainConfig.from_dict({**s, "output": _PLACEHOLDER})  # types, ranges, method, LoRA targets
    try:
        get_task(cfg.task, cfg.val_data, cfg.test_data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"task: {e}") from None
    return {k: v for k, v in cfg.to_dict().items() if k in s}


def train_config(settings: dict[str, Any], output: str | Path) -> TrainConfig:
    return TrainConfig.from_dict({**settings, "output": str(output)})


def describe(settings: dict[str, Any]) -> str:
    """A short line: `lora-sun math, 40 steps x 8`."""
    cfg = train_config(settings, _PLACEHOLDER)
    return f"{cfg.method} {cfg.task}, {cfg.steps} steps x {cfg.batch_size}"


# -- identity ---------------------------------------------------------------------------------------------------
def module_identity(spec: str) -> dict[str, str]:
    """What identifies a base or decode module for the cache key: its architecture, tokenizer and weights hashes
    (for a quantized decode module, the fingerprint its manifest declares). Reads the files; builds no model."""
    from sunray.models.config import ModelConfig
    from sunray.models.fingerprint import architecture_hash, tokenizer_hash, weights_hash
    from sunray.models.loader import load_state_dict, load_tokenizer

    path = resolve_model_dir(spec)
    manifest = read_manifest(path) or {}
    if manifest.get("quantization") and manifest.get("base_fingerprint"):
        return dict(manifest["base_fingerprint"])
    return {
        "architecture": architecture_hash(ModelConfig.from_pretrained(path)),
        "tokenizer": tokenizer_hash(load_tokenizer(path)),
        "weights": weights_hash(load_state_dict(path)),
    }


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_key(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes) of a module trained with `settings`."""
    from sunray.sun.tasks import TASKS, get_task

    cfg = train_config(settings, _PLACEHOLDER)
    training = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in _RESUMABLE_FIELDS and k not in ("base_model", "decode_module")
    }
    data = {}
    for name in ("task", "val_data", "test_data"):
        value = getattr(cfg, name)
        if value and not (name == "task" and value in TASKS):  # a file: its content, not its path
            training[name] = "file"
            data[name] = _file_hash(value.removeprefix("jsonl:"))
    if cfg.task in TASKS:  # a named task: its version and a digest of its examples (new task data, new key)
        data["task"] = get_task(cfg.task).fingerprint()
    what = {
        "version": KEY_VERSION,
        "base": module_identity(cfg.base_model),
        "decode": module_identity(cfg.decode_module) if cfg.decode_module else None,
        "data": data,
        "training": training,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, what


def entry_name(settings: dict[str, Any], key: str) -> str:
    from sunray.sun.tasks import TASKS

    task = settings["task"]
    label = task if task in TASKS else Path(str(task).removeprefix("jsonl:")).stem
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40] or "task"
    return f"{label}-{settings['method']}-{key}"


def root_dir() -> Path:
    return cache_dir() / SUBDIR


def is_finished(path: Path) -> bool:
    """A finished module: its final directory exists (it is renamed there only when complete) with a manifest."""
    return (path / MANIFEST).is_file()


def cached_path(settings: dict[str, Any]) -> Path:
    """Where the module of `settings` lives in the cache (finished or not)."""
    key, _ = cache_key(settings)
    return root_dir() / entry_name(settings, key)


# -- training once ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path, log: Logger, waiting: str) -> Iterator[None]:
    """An exclusive flock on `path` (created if need be). flock locks belong to the open file, so two threads of
    one process exclude each other too. Closing the file (or the process dying) releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_threads() -> int:
    """Every core this process may use: training runs alone (the training lock), so it gets them all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ensure_trained(
    settings: dict[str, Any], log: Logger = _stderr, threads: int | None = None, name: str | None = None
) -> Path:
    """The finished module of `settings` (checked with `check_settings`): from the cache, or trained now with
    `sunray train`'s code under the locks described above, resuming an interrupted training. Returns its path."""
    settings = check_settings(settings)
    tag = f"[task model {name or describe(settings)}]"
    key, what = cache_key(settings)
    root = root_dir()
    final = root / entry_name(settings, key)
    if is_finished(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(
        root / f".{final.name}.lock", log, f"{tag} another process is training {final.name}; waiting"
    ):
        if is_finished(final):  # trained by whoever held the lock
            log(f"{tag} trained by another process: {final}")
            return final
        with _locked(root / ".train.lock", log, f"{tag} waiting for another task model's training to finish"):
            partial = root / f".{final.name}.partial"
            if not is_finished(partial):  # (finished: killed between the last write and the rename)
                resume = (partial / CHECKPOINT / "state.pt").is_file()
                if partial.exists() and not resume:  # killed before its first checkpoint: start over
                    shutil.rmtree(partial)
                t0 = time.perf_counter()
                log(
                    f"{tag} {'resuming' if resume else 'training'} {describe(settings)} into {final} "
                    f"({threads or default_threads()} threads)"
                )
                with _torch_threads(threads or default_threads()):
                    train(train_config(settings, partial), resume=resume, log=log)
                log(f"{tag} trained in {time.perf_counter() - t0:.0f} s")
            _finalize(partial, final, key, what, settings)
    return final


def _finalize(partial: Path, final: Path, key: str, what: dict[str, Any], settings: dict[str, Any]) -> None:
    """Record the cache entry in the manifest, drop the checkpoint, and rename the module into place."""
    shutil.rmtree(partial / CHECKPOINT, ignore_errors=True)
    manifest = read_manifest(partial) or {}
    manifest.setdefault("training", {})["output"] = str(final)
    manifest["task_model"] = {"key": key, "settings": settings, "identity": what}
    tmp = partial / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, partial / MANIFEST)
    if final.exists():  # a leftover without a manifest (is_finished was false): never a finished module
        shutil.rmtree(final)
    partial.rename(final)
