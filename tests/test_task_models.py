"""Task models from training recipes (`prefill_module: {train: {...}}`): `sunray prepare` trains each once with
`sunray train`'s code, caches it and writes the config to serve with its directory; never twice at once (file
locks, across threads and processes); a bad training setting stops the config before anything trains; a killed
training leaves no finished-looking module and resumes; serving itself refuses a recipe, naming `sunray prepare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from sunray.cli import find_recipes
from sunray.models.loader import MANIFEST, load_model
from sunray.serve.config import AppArgs
from sunray.sun import task_models
from sunray.sun.task_models import cached_path, ensure_trained, is_finished

pytestmark = pytest.mark.usefixtures("single_thread")
TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("task-models"), "llama", seed=5)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SUNRAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def trainings(monkeypatch) -> list[str]:
    """The outputs `sunray train`'s `train` was called with (in this process)."""
    calls: list[str] = []
    real = task_models.train

    def counting(cfg, *args, **kwargs):
        calls.append(cfg.output)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(task_models, "train", counting)
    return calls


def settings(tiny_dir, **kw) -> dict:
    s = dict(
        method="sun",
        task="math",
        base_model=str(tiny_dir),
        steps=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        num_train=8,
        val_examples=4,
        log_every=2,
        save_every=2,
        device="cpu",
        max_prompt_len=192,
        max_response_len=56,
    )
    s.update(kw)
    return s


def quiet(_msg: str) -> None:
    pass


def test_trains_once_then_hits_the_cache(tiny_dir, cache, trainings):
    s = settings(tiny_dir)
    path = ensure_trained(s, log=quiet, threads=1)
    assert len(trainings) == 1 and is_finished(path) and path.parent == cache / "task-models"
    assert path.name.startswith("math-sun-")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["metrics"]["steps"] == 4 and "val_loss" in manifest["metrics"]
    assert manifest["task_model"]["settings"]["steps"] == 4 and manifest["training"]["output"] == str(path)
    assert not (path / "checkpoint").exists() and not list(path.parent.glob(".*.partial"))
    # The module is a prefill module of the base: the engine loads it with the base's fingerprint.
    assert load_model(path).fingerprint == load_model(tiny_dir).fingerprint
    # Second resolution: a cache hit, no training. Settings that only change how it runs keep the entry;
    # settings that change what is trained name another one.
    assert ensure_trained(s, log=quiet) == path
    assert ensure_trained({**s, "log_every": 1, "device": "cpu"}, log=quiet) == path
    assert len(trainings) == 1
    assert cached_path({**s, "steps": 5}) != path and cached_path({**s, "seed": 1}) != path


def test_concurrent_resolutions_train_once(tiny_dir, cache, trainings):
    """Three threads resolve the same module at once (as three replicas would): one trains, the others wait."""
    s = settings(tiny_dir, method="lora-sun", lr=1e-2)
    barrier = threading.Barrier(3)
    results: list[Path | BaseException] = []

    def resolve():
        barrier.wait()
        try:
            results.append(ensure_trained(s, log=quiet, threads=1))
        except BaseException as e:  # noqa: BLE001 (reported below)
            results.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3 and all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1 and is_finished(results[0])
    assert len(trainings) == 1


_RESOLVE = """
import os, signal, sys
from sunray.sun import task_models, train
if {kill!r}:  # die (SIGKILL, as an OOM kill or a lost node) right after the first checkpoint is written
    save = train.Trainer.save_checkpoint
    def save_and_die(self):
        save(self)
        os.kill(os.getpid(), signal.SIGKILL)
    train.Trainer.save_checkpoint = save_and_die
print("RESULT", task_models.ensure_trained({settings!r}, threads=1), flush=True)
"""


def _resolve_in_subprocess(s: dict, kill: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = _RESOLVE.format(kill=kill, settings=s)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_processes_train_once(tiny_dir, cache):
    s = settings(tiny_dir, seed=3)
    procs = [_resolve_in_subprocess(s) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {
        line.split(" ", 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")
    }
    assert paths == {str(cached_path(s))}
    logs = "".join(err for _, err in outs)
    assert logs.count("[task model") and logs.count(" training sun math") == 1, logs


def test_killed_training_leaves_no_finished_module_and_resumes(tiny_dir, cache, trainings):
    s = settings(tiny_dir, seed=4)
    final = cached_path(s)
    proc = _resolve_in_subprocess(s, kill=True)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == -9, err
    partial = final.parent / f".{final.name}.partial"
    assert not final.exists() and not is_finished(final)
    assert (partial / "checkpoint" / "state.pt").is_file() and not (partial / MANIFEST).exists()
    logs: list[str] = []
    assert ensure_trained(s, log=logs.append, threads=1) == final
    assert any("resuming" in m for m in logs) and any("resumed from" in m and "step 2" in m for m in logs), (
        logs
    )
    assert json.loads((final / MANIFEST).read_text())["metrics"]["steps"] == 4
    assert not partial.exists() and len(trainings) == 1


def test_partial_without_checkpoint_starts_over(tiny_dir, cache, trainings):
    """Killed before its first checkpoint: the half-written directory is discarded, training starts from step 0."""
    s = settings(tiny_dir, seed=5)
    final = cached_path(s)
    partial = final.parent / f".{final.name}.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    assert not is_finished(final)
    assert ensure_trained(s, log=quiet, threads=1) == final and len(trainings) == 1
    assert load_model(final).fingerprint == load_model(tiny_dir).fingerprint


def _app(tiny_dir, *models) -> dict:
    return {"decode_module": str(tiny_dir), "device": "cpu", "models": list(models)}


def _config(tmp_path, args) -> Path:
    config = tmp_path / "serve.yaml"
    app = {"name": "sunray", "import_path": "sunray.serve.app:build_app", "args": args}
    config.write_text(yaml.safe_dump({"applications": [app]}))
    return config


@pytest.mark.parametrize(
    "change, words",
    [
        ({"task": "poetry"}, ["task", "poetry"]),
        ({"method": "magic"}, ["method", "magic"]),
        ({"steps": -3}, ["steps", "-3"]),
        ({"batch_size": "eight"}, ["batch_size", "eight"]),
        ({"method": "full"}, ["method full"]),
        ({"output": "runs/x"}, ["output"]),
        ({"colour": "red"}, ["colour"]),
    ],
)
def test_bad_train_settings_fail_before_anything_trains(tiny_dir, cache, trainings, change, words, tmp_path):
    from sunray.sun.train import ConfigError

    train = {"method": "sun", "task": "math", "steps": 4, **change}
    config = _config(tmp_path, _app(tiny_dir, {"name": "m1", "prefill_module": {"train": train}}))
    with pytest.raises(ConfigError) as e:
        find_recipes(yaml.safe_load(config.read_text()))
    msg = str(e.value)
    assert "'m1': prefill_module.train:" in msg and all(w in msg for w in words), msg
    assert not cache.exists() and not trainings  # nothing started


def test_serving_refuses_a_recipe_and_names_prepare(tiny_dir):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="training recipe.*sunray prepare"):
        AppArgs.model_validate(
            _app(tiny_dir, {"name": "m1", "prefill_module": {"train": settings(tiny_dir)}})
        )


def test_prepare_fills_the_base_trains_what_is_missing_and_writes_the_config_to_serve(
    tiny_dir, cache, tmp_path, capsys
):
    from sunray.cli import main

    fast = settings(tiny_dir)
    del fast["base_model"]  # the application's decode module is the base
    args = _app(
        tiny_dir,
        {"name": "a", "prefill_module": {"train": fast}},
        {"name": "b", "prefill_module": {"train": {**fast, "task": "code"}}},
        {"name": "c"},
    )
    config = _config(tmp_path, args)
    recipes = find_recipes(yaml.safe_load(config.read_text()))
    assert [(r.model["name"], r.settings["task"]) for r in recipes] == [("a", "math"), ("b", "code")]
    assert all(r.settings["base_model"] == str(tiny_dir) for r in recipes)
    with pytest.raises(ValueError, match="dummy_shape"):
        find_recipes({"applications": [{"import_path": "x:build_app", "args": {**args, "dummy_shape": "s"}}]})
    out_path = tmp_path / "prepared.yaml"
    assert main(["prepare", str(config), "--threads", "1", "--output", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] sunray/a" in out and out.count(": trained in") == 2
    assert main(["prepare", str(config), "--output", str(out_path)]) == 0
    assert capsys.readouterr().out.count(": cached,") == 2
    # The prepared config names each module's directory and is what serving accepts as it is.
    prepared = yaml.safe_load(out_path.read_text())["applications"][0]["args"]
    served = AppArgs.model_validate(prepared)
    assert [m.prefill_module for m in served.models] == [
        str(cached_path(recipes[0].settings)),
        str(cached_path(recipes[1].settings)),
        "default",
    ]
    assert all(load_model(m.prefill_module).manifest for m in served.models[:2])


def test_prepare_refuses_a_bad_config_before_training(tiny_dir, cache, tmp_path, capsys, trainings):
    from sunray.cli import main

    bad = {"name": "broken", "prefill_module": {"train": {"method": "sun", "task": "math", "steps": 0}}}
    good = {"name": "fine", "prefill_module": {"train": settings(tiny_dir)}}
    config = _config(tmp_path, _app(tiny_dir, good, bad))
    assert main(["prepare", str(config), "--output", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'broken': prefill_module.train: steps must be a positive integer" in err
    assert not trainings and not cache.exists()


@pytest.mark.parametrize("name", ["default.yaml", "partitioned.yaml"])
def test_shipped_configs_name_three_distinct_trained_task_models(name):
    config = yaml.safe_load((REPO / "deployments" / name).read_text())
    recipes = find_recipes(config)
    assert [r.model["name"] for r in recipes] == ["smollm2-math", "smollm2-code", "smollm2-tool"]
    assert len({r.settings["task"] for r in recipes}) == 3
    assert all(
        r.settings["method"] in ("sun", "lora-sun") and r.settings["base_model"] == "default" for r in recipes
    )
