"""The task-model cache key follows the task's data (issue 15): a module trained on the old examples of a generated
task is never served for the new ones, because the key hashes the task's fingerprint (its version and a digest of
its examples)."""

from __future__ import annotations

import pytest

from sunray.sun.task_models import cache_key
from sunray.sun.tasks.code import CodeTask
from sunray.sun.tasks.math import MathTask


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("task-data-key"), "llama", seed=5)


def settings(tiny_dir, **kw) -> dict:
    return {"method": "sun", "task": "math", "base_model": str(tiny_dir), "steps": 4, **kw}


def test_the_key_names_the_task_data_and_is_stable(tiny_dir):
    key, what = cache_key(settings(tiny_dir))
    assert what["data"]["task"] == MathTask().fingerprint()
    assert cache_key(settings(tiny_dir))[0] == key
    assert cache_key(settings(tiny_dir, task="code"))[1]["data"]["task"] == CodeTask().fingerprint()


def test_a_new_task_version_changes_the_key(tiny_dir, monkeypatch):
    before, _ = cache_key(settings(tiny_dir))
    monkeypatch.setattr(MathTask, "version", MathTask.version + 1)
    assert cache_key(settings(tiny_dir))[0] != before


def test_changed_task_data_changes_the_key_even_without_a_version_bump(tiny_dir, monkeypatch):
    before, _ = cache_key(settings(tiny_dir))
    monkeypatch.setattr(MathTask, "split_sizes", {**MathTask.split_sizes, "train": 3999})
    assert cache_key(settings(tiny_dir))[0] != before
