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
experiment is started again, so an interrupted experiment resumes. With several GPUs, (task, seed) units run in
parallel, one process per GPU.

    python -m sunray.sun.experiment --out docs/results                 # what `make experiment-accuracy` runs
    python -m sunray.sun.experiment --quick --out /tmp/sunray-quick    # a minutes-long pipeline check on CPU
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
    lr: float = 1e-4
    lora_lr: float = 1e-3
    num_train: int | None = None
    test_limit: int = 300
    val_examples: int = 64
    calib_samples: int = 128
    max_prompt_len: int = 512
    max_response_len: int = 128
    device: str | None = None
    work_dir: str = ""
    out: str = "docs/results"
    quick: bool = False

    def train_args(self, method: str, task: str, seed: int) -> dict[str, Any]:
        args: dict[str, Any] = {
            "method": method, "task": task, "base_model": self.base_model, "steps": self.steps,
            "batch_size": self.batch_size, "lr": self.lora_lr if method == "lora-sun" else self.lr, "seed": seed,
            "max_prompt_len": self.max_prompt_len, "max_response_len": self.max_response_len,
            "num_train": self.num_train, "val_examples": self.val_examples, "device": self.device, "log_every": max(1, min(50, self.steps // 10)),
            "save_every": max(1, min(200, self.steps)),
        }  # fmt: skip
        return {k: v for k, v in args.items() if v is not None}


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
    from sunray.models.quant import AWQConfig
    from sunray.sun.tasks import get_task
    from sunray.sun.train import quant_spec, quantize_decode_module

    base_dir = resolve_model_dir(s.base_model)
    commands = {}
    base = None
    for scheme in QUANT_SCHEMES.values():
        out = _decode_dir(s, scheme)
        commands[scheme] = _command("quantize", {"model": s.base_model, "scheme": scheme, "calib_tasks": s.tasks,
                                                 "calib_samples": s.calib_samples, "output": str(out)})  # fmt: skip
        if (out / MANIFEST).is_file():
            continue
        if base is None:
            device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
            base = load_model(base_dir, device=device, dtype=torch.float32)
        t0 = time.perf_counter()
        # --quick: a coarse AWQ search without clipping (the full search takes most of an hour on 2 CPU cores).
        awq = AWQConfig(grid=4, clip=False, max_tokens=256) if s.quick else None
        quantize_decode_module(base, base_dir, quant_spec(scheme), out, [get_task(t) for t in s.tasks],
                               s.calib_samples, s.max_prompt_len, s.base_model, awq)  # fmt: skip
        _log(f"quantized {scheme} in {time.perf_counter() - t0:.0f} s -> {out}")
    return commands


def _eval(prefill, decode, task, s: Settings, naive_mix: bool = False) -> dict[str, Any]:
    from sunray.sun.evaluate import evaluate

    r = evaluate(prefill, decode, task, "test", s.test_limit, naive_mix=naive_mix, keep_samples=4)
    return {"accuracy": r.accuracy, "n": r.n, "correct": r.correct, "wall_s": r.wall_s, "samples": r.samples}


def run_base(s: Settings, task_name: str) -> dict[str, Any]:
    """The base model on a task (no training: greedy decoding makes it the same for every seed)."""
    import torch

    from sunray.models.loader import load_model
    from sunray.sun.tasks import get_task

    path = _work(s) / "results" / f"{task_name}-base.json"
    if path.is_file():
        return json.loads(path.read_text())
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(s.base_model, device=device)
    res = {"base": _eval(base, base, get_task(task_name), s)}
    res["base"]["command"] = _command("eval", {"prefill_module": s.base_model, "decode_module": s.base_model,
                                               "task": task_name, "limit": s.test_limit})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    _log(f"{task_name} base: accuracy {res['base']['accuracy']:.3f}")
    return res


def run_unit(s: Settings, task_name: str, seed: int) -> dict[str, Any]:
    """Train full / sun / qsun_int8 / qsun_int4 / lora_sun for one (task, seed), then evaluate the six pairs."""
    import torch

    from sunray.models.loader import MANIFEST, load_model
    from sunray.sun.tasks import get_task
    from sunray.sun.train import TrainConfig, train

    work = _work(s)
    path = work / "results" / f"{task_name}-s{seed}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    runs = {
        "full": ("full", {}),
        "sun": ("sun", {}),
        "qsun_int8": ("qsun", {"decode_module": str(_decode_dir(s, "int8"))}),
        "qsun_int4": ("qsun", {"decode_module": str(_decode_dir(s, "int4-g128"))}),
        "lora_sun": ("lora-sun", {}),
    }
    out_dirs = {}
    for key, (method, extra) in runs.items():
        out = work / "models" / f"{task_name}-{key}-s{seed}"
        out_dirs[key] = out
        args = {**s.train_args(method, task_name, seed), **extra, "output": str(out)}
        rec = results.setdefault(key, {})
        rec["train_command"] = _command("train", args)
        if (out / MANIFEST).is_file():
            continue
        t0 = time.perf_counter()
        r = train(TrainConfig(**args), resume=True)
        rec["train"] = {**r.metrics, "wall_s": round(time.perf_counter() - t0, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(task_name)
    base = None
    pairs = {  # method: (prefill dir, decode dir or "base" / "self", naive mix)
        "full": (out_dirs["full"], "self", False),
        "naive_mix": (out_dirs["full"], "base", True),
        "sun": (out_dirs["sun"], "base", False),
        "qsun_int8": (out_dirs["qsun_int8"], _decode_dir(s, "int8"), False),
        "qsun_int4": (out_dirs["qsun_int4"], _decode_dir(s, "int4-g128"), False),
        "lora_sun": (out_dirs["lora_sun"], "base", False),
    }
    for key, (pdir, ddir, mix) in pairs.items():
        rec = results.setdefault(key, {})
        if "accuracy" in rec:
            continue
        prefill = load_model(pdir, device=device)
        if ddir == "self":
            decode = prefill
        elif ddir == "base":
            base = base or load_model(s.base_model, device=device)
            decode = base
        else:
            decode = load_model(ddir, device=device)
        rec.update(_eval(prefill, decode, task, s, naive_mix=mix))
        rec["eval_command"] = _command("eval", {
            "prefill_module": str(pdir), "decode_module": str(pdir) if ddir == "self" else (s.base_model if ddir == "base" else str(ddir)),
            "task": task_name, "limit": s.test_limit, "naive_mix": mix,
        })  # fmt: skip
        del prefill, decode
        path.write_text(json.dumps(results, indent=2, default=str))
        _log(f"{task_name} seed {seed} {key}: accuracy {rec['accuracy']:.3f}")
    return results


def _units_parallel(s: Settings, units: list[tuple[str, int]], gpus: int, argv_base: list[str]) -> None:
    """Run (task, seed) units as subprocesses, one per GPU at a time."""
    pending = list(units)
    running: dict[int, tuple[subprocess.Popen, tuple[str, int]]] = {}
    logs = _work(s) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    while pending or running:
        for gpu in range(gpus):
            if gpu not in running and pending:
                task, seed = pending.pop(0)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                cmd = [sys.executable, "-m", "sunray.sun.experiment", *argv_base, "--unit", f"{task}:{seed}"]
                log = open(logs / f"{task}-s{seed}.log", "w")  # noqa: SIM115 (closed with the process)
                running[gpu] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), (task, seed))
                _log(f"unit {task}:{seed} started on GPU {gpu} (log {log.name})")
        time.sleep(2)
        for gpu, (proc, unit) in list(running.items()):
            if proc.poll() is not None:
                del running[gpu]
                if proc.returncode:
                    failed.append(unit)
                    _log(f"unit {unit[0]}:{unit[1]} FAILED (exit {proc.returncode}); see {logs}/{unit[0]}-s{unit[1]}.log")
                else:
                    _log(f"unit {unit[0]}:{unit[1]} done")
    if failed:
        raise RuntimeError(f"{len(failed)} unit(s) failed: {failed}")


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def aggregate(s: Settings, commands: dict[str, str], wall_s: float, argv: list[str]) -> dict[str, Any]:
    work = _work(s)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    details: dict[str, Any] = {}
    for task in s.tasks:
        base = json.loads((work / "results" / f"{task}-base.json").read_text())["base"]
        per_seed = {seed: json.loads((work / "results" / f"{task}-s{seed}.json").read_text()) for seed in s.seeds}
        table[task] = {}
        for m in METHODS:
            accs = [base["accuracy"]] * len(s.seeds) if m == "base" else [per_seed[seed][m]["accuracy"] for seed in s.seeds]
            table[task][m] = {"accuracy": [round(a, 4) for a in accs], "mean": round(sum(accs) / len(accs), 4)}
        details[task] = {"base": base, **{f"seed{seed}": r for seed, r in per_seed.items()}}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "accuracy.md").write_text(_markdown(s, table, details, commands, wall_s, argv))
    return table


def _markdown(s, table, details, commands, wall_s, argv) -> str:
    lines = [
        "# Accuracy: SUN vs full fine-tuning (issue 3)",
        "",
        *(["**PIPELINE CHECK (--quick): tiny step counts; these numbers mean nothing.**", ""] if s.quick else []),
        f"Base model `{s.base_model}`; tasks {', '.join(s.tasks)}; seeds {', '.join(map(str, s.seeds))}; "
        f"{s.steps} steps of batch {s.batch_size} for every trained method (lr {s.lr:g}, LoRA lr {s.lora_lr:g}); "
        f"{s.test_limit} test examples per task, greedy, through the engine (prefill engine, KV hand-off, decode "
        "engine). Accuracy is the fraction of test examples the task's scorer accepts: math (exact number), code "
        "(hidden unit tests in the sandbox), tool (valid JSON call, right function and arguments).",
        "",
        f"Machine: {_machine()}. Date: {datetime.date.today().isoformat()}. Wall time of the last invocation: "
        f"{wall_s / 60:.1f} min; training and evaluation time summed over all runs (also those of earlier, "
        f"resumed invocations): {_summed_minutes(details):.1f} min.",
        "",
        "| task | " + " | ".join(METHODS) + " |",
        "|---|" + "---:|" * len(METHODS),
    ]
    for task, row in table.items():
        cells = []
        for m in METHODS:
            r = row[m]
            seeds = "/".join(f"{a:.3f}" for a in r["accuracy"])
            cells.append(f"**{r['mean']:.3f}** ({seeds})" if m != "base" else f"**{r['mean']:.3f}**")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds in bold, per seed in parentheses. base and naive_mix involve no SUN training; base "
              "is deterministic (greedy), so its seeds repeat one number.", "", "## Targets", ""]  # fmt: skip
    for a, b, tol, text in TARGETS:
        for task, row in table.items():
            gap = row[b]["mean"] - row[a]["mean"]
            ok = gap <= tol
            lines.append(f"- {task}: {text}: {row[a]['mean']:.3f} vs {row[b]['mean']:.3f} (gap {gap:+.3f}) "
                         f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    for task, row in table.items():
        below = row["naive_mix"]["mean"] < row["sun"]["mean"]
        lines.append(f"- {task}: naive mix below SUN: {row['naive_mix']['mean']:.3f} vs {row['sun']['mean']:.3f} "
                     f"{'PASS' if below else 'FAIL'}")  # fmt: skip
    lines += ["", "## Commands", "", "The whole experiment (`make experiment-accuracy` runs it with `--out docs/results`):",
              "", "```", shlex.join(["python", "-m", "sunray.sun.experiment", *argv]), "```",
              "", "Its steps, each runnable alone:", "", "```"]  # fmt: skip
    lines += list(commands.values())
    first = s.tasks[0]
    d = details[first][f"seed{s.seeds[0]}"]
    for key in ("full", "sun", "qsun_int8", "qsun_int4", "lora_sun"):
        lines.append(d[key]["train_command"])
    for key in ("full", "naive_mix", "sun", "qsun_int8", "qsun_int4", "lora_sun"):
        lines.append(d[key]["eval_command"])
    lines += ["```", "", f"(shown for {first}, seed {s.seeds[0]}; the other tasks and seeds differ in --task, --seed and "
              "the paths.)", "", "## Training and evaluation details", "",
              "| task | seed | method | train wall s | final val loss | eval wall s |", "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for task in s.tasks:
        for seed in s.seeds:
            d = details[task][f"seed{seed}"]
            for key in ("full", "sun", "qsun_int8", "qsun_int4", "lora_sun"):
                t = d[key].get("train", {})
                vl = t.get("val_loss")
                lines.append(f"| {task} | {seed} | {key} | {t.get('wall_s', '-')} | "
                             f"{'-' if vl is None else f'{vl:.4f}'} | {d[key].get('wall_s', '-')} |")  # fmt: skip
    lines += ["", "## Sample completions (first test examples, seed " + str(s.seeds[0]) + ")", ""]
    for task in s.tasks:
        d = details[task][f"seed{s.seeds[0]}"]
        for key in ("sun", "naive_mix"):
            for smp in d[key]["samples"][:2]:
                lines.append(f"- {task} / {key} / {'correct' if smp['correct'] else 'wrong'}: "
                             f"`{smp['completion'][:160]!r}`")  # fmt: skip
    return "\n".join(lines) + "\n"


def _summed_minutes(details: dict[str, Any]) -> float:
    total = 0.0
    for per_task in details.values():
        for key, runs in per_task.items():
            recs = [runs] if key == "base" else list(runs.values())
            for r in recs:
                total += float(r.get("wall_s") or 0) + float((r.get("train") or {}).get("wall_s") or 0)
    return total / 60


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m sunray.sun.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["math", "code", "tool"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--base-model", default="default")
    p.add_argument("--steps", type=int, default=None, help="training steps for every method (default 600; --quick 3)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick 2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--num-train", type=int, default=None, help="training examples per task (default: all 4000)")
    p.add_argument("--test-limit", type=int, default=None, help="test examples per task (default 300; --quick 4)")
    p.add_argument("--calib-samples", type=int, default=None, help="AWQ calibration prompts (default 128; --quick 8)")
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", default=None, help="models, per-run results, logs (default: $SUNRAY_CACHE/experiment-accuracy)")
    p.add_argument("--out", default="docs/results", help="where accuracy.json and accuracy.md go")
    p.add_argument("--gpus", type=int, default=None, help="run (task, seed) units in parallel on this many GPUs (default: all)")
    p.add_argument("--quick", action="store_true", help="a pipeline check with tiny step counts (numbers mean nothing)")
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # internal: run one task:seed unit
    a = p.parse_args(argv)
    from sunray.models.loader import cache_dir

    q = a.quick
    s = Settings(
        tasks=a.tasks, seeds=a.seeds, base_model=a.base_model,
        steps=a.steps or (3 if q else 600), batch_size=a.batch_size or (2 if q else 16), lr=a.lr, lora_lr=a.lora_lr,
        num_train=a.num_train or (16 if q else None), test_limit=a.test_limit or (4 if q else 300),
        val_examples=4 if q else 64,
        calib_samples=a.calib_samples or (6 if q else 128), device=a.device, quick=q,
        work_dir=a.work_dir or str(cache_dir() / ("experiment-quick" if q else "experiment-accuracy")), out=a.out,
    )  # fmt: skip
    for name in ("steps", "batch_size", "test_limit", "calib_samples"):
        if getattr(s, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    from sunray.sun.tasks import TASKS

    bad = [t for t in s.tasks if t not in TASKS]
    if bad:
        p.error(f"unknown task(s) {bad}; tasks: {', '.join(TASKS)}")
    if len(set(s.seeds)) != len(s.seeds):
        p.error("--seeds must be distinct")
    return s, a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    s, a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sunray").setLevel(logging.INFO)
    if a.unit:
        task, seed = a.unit.split(":")
        run_unit(s, task, int(seed))
        return 0
    import torch

    t0 = time.perf_counter()
    _work(s).mkdir(parents=True, exist_ok=True)
    _log(f"work dir {s.work_dir}; {len(s.tasks)} tasks x {len(s.seeds)} seeds, {s.steps} steps x batch {s.batch_size}")
    commands = prepare(s)
    units = [(t, seed) for t in s.tasks for seed in s.seeds]
    gpus = a.gpus if a.gpus is not None else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if gpus > 1:
        base_argv = [x for x in argv if not x.startswith("--unit")]
        _units_parallel(s, units, gpus, base_argv)
    else:
        for task, seed in units:
            run_unit(s, task, seed)
    for task in s.tasks:
        run_base(s, task)
    wall = time.perf_counter() - t0
    table = aggregate(s, commands, wall, argv)
    _log(f"done in {wall / 60:.1f} min; wrote {s.out}/accuracy.json and accuracy.md")
    for task, row in table.items():
        _log(f"{task}: " + ", ".join(f"{m} {row[m]['mean']:.3f}" for m in METHODS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
