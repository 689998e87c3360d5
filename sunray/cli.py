"""`sunray`: the command line (the top layer: it may import every other layer of sunray).

sunray generate [--prefill-module DIR] [--decode-module DIR] [--chat] "prompt"
sunray bench decode|prefill [--shape llama-3.1-8b --dummy-weights] ...
sunray prepare deployments/default.yaml      # train a config's task models (once, cached); write it to serve
sunray serve deployments/default.yaml        # prepare, then `serve run` it (what `make serve` runs)
(train, quantize, eval: sunray/sun/cli.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from sunray.models.devices import add_device_flags, device_and_dtype
from sunray.models.loader import DEFAULT_MODEL


def cmd_generate(args) -> int:
    from sunray.engine.config import EngineConfig
    from sunray.engine.local import LocalSUN, encode_prompt
    from sunray.engine.sequence import SamplingParams
    from sunray.models.loader import load_model

    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    device, dtype = device_and_dtype(args)
    t0 = time.perf_counter()
    decode = load_model(args.decode_module, device=device, dtype=dtype)
    prefill = (
        decode
        if args.prefill_module == args.decode_module
        else load_model(args.prefill_module, device=device, dtype=dtype)
    )
    engine = LocalSUN(decode, {"task": prefill}, EngineConfig())
    load_s = time.perf_counter() - t0
    prompt_ids = encode_prompt(decode.tokenizer, args.prompt, chat=args.chat)
    engine.add_request(prompt_ids, sampling, model="task")
    t1 = time.perf_counter()
    n_tokens, first_token_s, reason = 0, None, None
    for out in engine.stream():
        if first_token_s is None:
            first_token_s = time.perf_counter() - t1
        n_tokens += len(out.new_token_ids)
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        reason = out.finish_reason
    total = time.perf_counter() - t1
    sys.stdout.write("\n")
    if not args.quiet:
        decode_tps = (
            (n_tokens - 1) / (total - first_token_s) if n_tokens > 1 and total > first_token_s else 0.0
        )
        print(
            f"[{n_tokens} tokens, finish={reason}, prompt {len(prompt_ids)} tokens, load {load_s:.1f} s, "
            f"first token {first_token_s * 1e3:.0f} ms, decode {decode_tps:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def _bench_model(args):
    from sunray.models.loader import load_model
    from sunray.models.presets import dummy_model

    device, dtype = device_and_dtype(args)
    if args.dummy_weights or args.shape:
        return dummy_model(args.shape or "smollm2-135m", device=device, dtype=dtype)
    return load_model(args.model, device=device, dtype=dtype)


def cmd_bench(args) -> int:
    import datetime

    import torch

    from sunray.bench import bench_decode, bench_prefill, quantize_for_bench

    torch.manual_seed(0)
    lm = _bench_model(args)
    quant = None
    if args.quant != "none":
        quant = quantize_for_bench(lm, args.quant)
        print(f"# quantized: {json.dumps(quant)}", file=sys.stderr)
    device = lm.device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    graphs = False if args.eager or args.reference else None
    fast = False if args.reference else None
    backend = "torch" if args.reference else args.attention
    print(
        f"# {args.what} on {name}, model {args.shape or args.model}, dtype {lm.dtype}, "
        f"{lm.config.num_parameters() / 1e9:.2f} B parameters, attention {backend}"
        f"{', weights ' + quant['scheme'] if quant else ''}"
        f"{', eager' if args.eager else ''}{', reference path' if args.reference else ''}"
        f"{', overlapped steps' if args.what == 'decode' and args.overlap else ''}",
        file=sys.stderr,
    )
    rows = []
    if args.what == "decode":
        from sunray.bench import measure_copy_bandwidth, print_kernel_profile

        measured = args.bandwidth is None
        bandwidth = measure_copy_bandwidth(lm.device) if measured else args.bandwidth * 1e9
        print(
            f"# floor: weights (without an untied embedding table) + KV read once at {bandwidth / 1e12:.3f} TB/s "
            f"({'measured: device-to-device copy, read + write' if measured else 'given with --bandwidth'})",
            file=sys.stderr,
        )
        print(
            f"{'dtype':>8} {'batch':>6} {'context':>8} {'ms/step':>9} {'tok/s':>9} {'fwd ms':>8} {'fwd tok/s':>10} "
            f"{'floor ms':>9} {'step/floor':>10} {'fwd/floor':>9} {'b2b ms':>8}"
        )
        for context in args.context:
            for b in args.batch_sizes:
                r = bench_decode(
                    lm,
                    b,
                    context,
                    args.steps,
                    backend=backend,
                    cuda_graphs=graphs,
                    fast_path=fast,
                    bandwidth=bandwidth,
                    kernels=args.kernels,
                    overlap_steps=args.overlap,
                )
                rows.append(r)
                print(
                    f"{r['dtype']:>8} {b:>6} {context:>8} {r['ms_per_step']:>9.2f} {r['tok_per_s']:>9.1f} {r['forward_ms']:>8.2f} "
                    f"{r['forward_tok_per_s']:>10.1f} {r['floor_ms']:>9.2f} {r['step_over_floor']:>9.2f}x "
                    f"{r['forward_over_floor']:>8.2f}x {r['back_to_back_ms']:>8.2f}",
                    flush=True,
                )
                if args.kernels:
                    print_kernel_profile(r["kernel_profile"], sys.stdout)
    elif args.what == "sampler":
        from sunray.bench import bench_sampler

        rows = bench_sampler(lm, args.batch_sizes, args.steps)
        print(f"# logits: {rows[0]['logits']}, vocabulary {rows[0]['vocab']}", file=sys.stderr)
        print(f"{'batch':>6} {'ms':>9}  sampling")
        for r in rows:
            print(f"{r['batch']:>6} {r['ms']:>9.3f}  {r['case']}", flush=True)
    else:
        print(f"{'prompt':>7} {'batch':>6} {'ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'of peak':>8}")
        for n in args.prompt_len:
            r = bench_prefill(
                lm,
                n,
                args.batch,
                args.steps,
                backend=backend,
                fast_path=fast,
                peak_flops=args.peak_tflops * 1e12,
            )
            rows.append(r)
            print(
                f"{n:>7} {args.batch:>6} {r['ms']:>9.1f} {r['tok_per_s']:>10.1f} {r['tflops']:>8.1f} "
                f"{r['peak_fraction']:>8.2f}",
                flush=True,
            )
    tuning = _int4_tuning() if quant else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "date": datetime.date.today().isoformat(),
                    "command": "sunray " + " ".join(sys.argv[1:]),
                    "model": args.shape or args.model,
                    "quantization": quant,
                    args.what: rows,
                    **({"int4_tuning": tuning} if tuning else {}),
                },
                f,
                indent=2,
            )
    return 0


def _int4_tuning() -> list[dict]:
    """What the int4 tuner timed and chose for each (M bucket, weight shape) the benchmark met, printed one line
    each (the kernel that ran every int4 matmul of the rows above), and returned for the JSON."""
    from sunray.models import int4

    for t in int4.TUNING:
        ms = t["ms"]
        print(
            f"# int4 M={t['m']} [{t['n']} x {t['k']}] g{t['group']}: {t['choice']} {ms[t['choice']]:.4f} ms "
            f"(of {len(ms)} timed; slowest {max(ms.values()):.4f} ms)",
            file=sys.stderr,
        )
    return list(int4.TUNING)


def _quant_scheme(value: str) -> str:
    if value.strip().lower() == "none":
        return "none"
    from sunray.models.quant.formats import QuantSpec

    try:
        return QuantSpec.parse(value, awq=False).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- sunray prepare / serve: a `serve run` config's training recipes become trained modules' directories -----------
PREPARED_DIR = Path("build/serve")


@dataclasses.dataclass
class Recipe:
    """One task model of a config whose prefill module is a training recipe (`prefill_module: {train: ...}`)."""

    app: str
    model: dict[str, Any]  # the model's entry in the config; its prefill_module is replaced by the directory
    settings: dict[str, Any]  # checked `sunray train` settings, the base (or decode module) filled in


def find_recipes(config: dict[str, Any]) -> list[Recipe]:
    """Every training recipe of a `serve run` config's task-model applications, checked (ConfigError naming the
    model and the setting) before anything trains, together with everything else `serve run` would check."""
    from sunray.serve.config import AppArgs
    from sunray.sun.task_models import check_settings
    from sunray.sun.train import ConfigError

    recipes = []
    for app in config.get("applications") or []:
        if not str(app.get("import_path", "")).endswith(":build_app"):
            continue
        args = app.get("args") or {}
        for model in args.get("models") or []:
            spec = model.get("prefill_module") if isinstance(model, dict) else None
            if not isinstance(spec, dict):
                continue
            where = f"{app.get('name', '?')}: model {model.get('name', '?')!r}: prefill_module"
            if set(spec) != {"train"} or not isinstance(spec["train"], dict):
                raise ConfigError(
                    f"{where} is a model directory, 'default', or {{train: {{...}}}} (`sunray train` settings); "
                    f"got the key(s) {', '.join(map(str, spec)) or 'none'}"
                )
            if args.get("dummy_shape"):
                raise ConfigError(f"{where}: a trained module needs a real decode module, not dummy_shape")
            try:
                settings = check_settings(spec["train"])
            except ConfigError as e:
                raise ConfigError(f"{where}.train: {e}") from None
            # Trained against the decode module the application serves, unless the settings name another.
            settings.setdefault(
                "decode_module" if settings["method"] == "qsun" else "base_model",
                args.get("decode_module", "default"),
            )
            recipes.append(Recipe(app.get("name", "?"), model, check_settings(settings)))
        # The rest of the application's arguments, as serving will read them (recipes stand in as "default").
        plain = [
            {**m, "prefill_module": "default"} if any(m is r.model for r in recipes) else m
            for m in args["models"]
        ]
        try:
            AppArgs.model_validate({**args, "models": plain})
        except ValueError as e:
            raise ConfigError(f"{app.get('name', '?')}: {e}") from None
    return recipes


def prepare(config_path: Path, output: Path, threads: int | None = None) -> Path:
    """Train what the cache lacks, then write `output`: the config with every recipe replaced by its directory."""
    import yaml

    from sunray.models.loader import DEFAULT_ALIASES, ensure_default_model, read_manifest
    from sunray.sun.task_models import cached_path, default_threads, describe, ensure_trained, is_finished

    t_start = time.perf_counter()
    if not config_path.is_file():
        raise FileNotFoundError(f"config file {config_path} does not exist")
    config = yaml.safe_load(config_path.read_text()) or {}
    recipes = find_recipes(config)
    if any(r.settings.get("base_model", "default") in DEFAULT_ALIASES for r in recipes):
        t0 = time.perf_counter()
        ensure_default_model()  # converts the embedded GGUF once
        print(f"base model ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    threads = threads or default_threads()
    for i, r in enumerate(recipes, 1):
        where = cached_path(r.settings)
        head = f"[{i}/{len(recipes)}] {r.app}/{r.model['name']} ({describe(r.settings)})"
        if is_finished(where):
            print(f"{head}: cached, {where}", flush=True)
        else:
            print(f"{head}: training with {threads} threads (once; then cached in {where})", flush=True)
            t0 = time.perf_counter()
            ensure_trained(r.settings, threads=threads, name=r.model["name"])
            metrics = (read_manifest(where) or {}).get("metrics", {})
            val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            print(f"{head}: trained in {time.perf_counter() - t0:.0f} s{val}", flush=True)
        r.model["prefill_module"] = str(where)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by `sunray prepare {config_path}`: the config with each prefill_module {{train: ...}} replaced\n"
        "# by the directory of its trained (cached) module. Serve this file; edit the original.\n"
    )
    output.write_text(header + yaml.safe_dump(config, sort_keys=False))
    print(
        f"prepared {len(recipes)} task model(s) in {time.perf_counter() - t_start:.0f} s: {output}",
        flush=True,
    )
    return output


def prepared_path(config: str, output: str | None) -> Path:
    return Path(output) if output else PREPARED_DIR / Path(config).name


def cmd_prepare(args) -> int:
    out = prepare(Path(args.config), prepared_path(args.config, args.output), args.threads)
    print(f"serve it with: RAY_AUTH_MODE=disabled serve run --address local {out}")
    return 0


def cmd_serve(args) -> int:
    """`sunray prepare`, then `serve run` of the prepared config in a Ray instance of its own; says when every
    model answers (GET /health). Ctrl-C (or SIGTERM) stops it, the Ray instance included."""
    import os
    import signal
    import subprocess
    import urllib.error
    import urllib.request

    import yaml

    out = prepare(Path(args.config), prepared_path(args.config, args.output), args.threads)
    env = {"RAY_AUTH_MODE": "disabled", **os.environ}
    if args.api_key:
        env["SUNRAY_API_KEY"] = args.api_key
    http = (yaml.safe_load(out.read_text()) or {}).get("http_options") or {}
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    child = subprocess.Popen(
        [str(Path(sys.executable).with_name("serve")), "run", "--address", "local", str(out)], env=env
    )
    # The child has a session of its own, so a Ctrl-C reaches it once, from here, and it shuts Ray down cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda n, _f: child.send_signal(n))
    deadline = time.monotonic() + args.ready_timeout
    while child.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                models = ", ".join(json.loads(r.read()).get("models", []))
            key = " (API key required)" if env.get("SUNRAY_API_KEY") else ""
            print(f"\nsunray is ready on {url}/v1{key}: {models}\n", flush=True)
            break
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(2)
    return child.wait()


# Other layers add their subcommands here: each module has `register(subparsers)`, imported when the CLI starts.
COMMAND_MODULES: tuple[str, ...] = ("sunray.sun.cli",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sunray", description="SUN multi-LLM serving: engine, training, serving."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="complete one prompt through a prefill module and the shared decode module"
    )
    g.add_argument("prompt", help="the prompt text")
    g.add_argument(
        "--prefill-module",
        default=DEFAULT_MODEL,
        help=f"task model's prefill module: a model directory (default: {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--decode-module",
        default=DEFAULT_MODEL,
        help=f"the frozen shared decode module: a model directory (default: {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user turn in the chat template"
    )
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default), up to 2")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", help="a stop string (repeat the flag for several)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the completion, no timing line")
    add_device_flags(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="engine benchmarks (print a table; --json writes the rows)")
    b.add_argument("what", choices=["decode", "prefill", "sampler"])
    b.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default: the embedded SmolLM2)")
    b.add_argument(
        "--shape", default=None, help="dummy-weight shape instead of a checkpoint: llama-3.1-8b, smollm2-135m"
    )
    b.add_argument(
        "--dummy-weights",
        action="store_true",
        help="random weights (with --shape; default shape smollm2-135m)",
    )
    b.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="decode (and sampler) batch sizes"
    )
    b.add_argument("--context", type=int, nargs="+", default=[128], help="decode context lengths")
    b.add_argument("--prompt-len", type=int, nargs="+", default=[1024], help="prefill prompt lengths")
    b.add_argument("--batch", type=int, default=1, help="prefill prompts per pass")
    b.add_argument("--steps", type=int, default=32, help="timed steps (decode) or repeats (prefill)")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="attention backend (auto: triton on CUDA, torch elsewhere)",
    )
    b.add_argument("--eager", action="store_true", help="no CUDA graphs for decode")
    b.add_argument(
        "--overlap",
        action="store_true",
        help="decode: overlapped steps (each pass launched before the last one's tokens are read); compare "
        "the b2b ms column (steps back to back) with and without",
    )
    b.add_argument(
        "--kernels",
        action="store_true",
        help="decode: also profile each row's step (kernel families, launches per layer, gaps between kernels)",
    )
    b.add_argument(
        "--reference",
        action="store_true",
        help="the reference path: torch attention, unfused weights and ops, no CUDA graphs",
    )
    b.add_argument(
        "--quant",
        default="none",
        type=_quant_scheme,
        metavar="{none,int8,int4,int4-g32,int4-g64,int4-g128,...}",
        help="quantize the decoder layers' linears on load (round to nearest, no AWQ: speed only); int4 "
        "on CUDA runs the int4 fast path. Rows then carry dtype int4 / int8",
    )
    b.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="memory bandwidth in GB/s for the decode floor (default: measured on the device first, as a "
        "device-to-device copy counting read + write)",
    )
    b.add_argument(
        "--peak-tflops", type=float, default=790.0, help="bf16 matmul peak for prefill (default 790)"
    )
    add_device_flags(b)
    b.set_defaults(func=cmd_bench)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)

    p = sub.add_parser(
        "prepare",
        help="train the task models a `serve run` config names (once, cached) and write the config to serve",
        description="Every `prefill_module: {train: {...}}` of the config's task-model applications is trained "
        "with `sunray train`'s code, one after another, and cached under $SUNRAY_CACHE/task-models (default "
        "~/.cache/sunray); cached ones are skipped. Writes the prepared config (each recipe replaced by its "
        f"module's directory) to --output (default {PREPARED_DIR}/<config name>).",
    )
    s_ = sub.add_parser(
        "serve",
        help="prepare a config, then `serve run` it and say when every model answers",
        description="`sunray prepare CONFIG`, then `serve run --address local` of the prepared config (a Ray "
        "instance of its own, stopped with it). `make serve` runs this with deployments/default.yaml.",
    )
    for q in (p, s_):
        q.add_argument("config", help="a `serve run` YAML config, e.g. deployments/default.yaml")
        q.add_argument("--output", default=None, help=f"the prepared config (default {PREPARED_DIR}/<name>)")
        q.add_argument(
            "--threads", type=int, default=None, help="torch threads for training (default: all cores)"
        )
    s_.add_argument(
        "--api-key",
        default=None,
        help="require this key (Authorization: Bearer ...); default: $SUNRAY_API_KEY if set, else none",
    )
    s_.add_argument(
        "--ready-timeout", type=float, default=900, help="seconds to wait for GET /health (default 900)"
    )
    p.set_defaults(func=cmd_prepare)
    s_.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in ("batch_sizes", "context", "prompt_len"):
        if any(v <= 0 for v in getattr(args, name, None) or []):
            parser.error(f"--{name.replace('_', '-')} values must be positive")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"sunray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
