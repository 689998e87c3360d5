"""`loadgen` (also `python -m loadgen`): load tests against OpenAI-compatible servers, plots, and the simulator.

    loadgen run --url http://127.0.0.1:8000 --num-models 8 --alpha 1.0 --rate 2 4 8 --duration 60 \\
        --input-len 128:1024 --output-len 64:512 --num-gpus 2 --tpot-slo-ms 50 --out results/run1
    loadgen plot results/run1 results/run2 --out results/plots
    loadgen capacity --url http://127.0.0.1:8000 --num-models 2 --tpot-slo-ms 20 40 --ttft-slo-ms 1000 --gpus 1
    loadgen fake-server --port 8100
    loadgen sim run --profile h100-llama-3.1-8b-analytic --policy sun --prefill-gpus 8 --decode-gpus 4 ...
    loadgen sim paper --out docs/results/simulation.json
    loadgen sim capacity --profile PROFILE --policy sun --prefill-gpus 1,1 --decode-gpus 1 \\
        --prefill-gpu-ids 0,0 --decode-gpu-ids 0 --num-models 2 --tpot-slo-ms 20 40 --ttft-slo-ms 1000
    loadgen sim validate --live results/run1 --profile PROFILE --policy sun --prefill-gpus 1 --decode-gpus 1
    loadgen sim analytic-profile --out PROFILE.json    # measured profiles: python -m experiments.measure_profile
    loadgen sim calibrate --profile PROFILE --status STATUS.json --context C --out PROFILE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from loadgen.metrics import SLO, summarize
from loadgen.workload import ARRIVALS, LengthDist, WorkloadConfig, generate, load_dataset


# -- argument types (argparse turns their ArgumentTypeError into "argument --x: message") ---------------------------
def _bounded(cast, what: str, ok, rule: str):
    """An argparse type: `cast(text)`, then `ok(value)`; each failure says what was expected."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return v

    return parse


_positive_float = _bounded(float, "a number", lambda v: v > 0 and math.isfinite(v), "a positive number")
_nonneg_float = _bounded(float, "a number", lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
_positive_int = _bounded(int, "an integer", lambda v: v >= 1, "an integer >= 1")
_nonneg_int = _bounded(int, "an integer", lambda v: v >= 0, "an integer >= 0")


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"GPU counts must be >= 0, got {text!r}")
    return vals


# -- shared workload flags ------------------------------------------------------------------------------------------
def _add_workload_flags(p: argparse.ArgumentParser, need_load: bool = True, capacity: bool = False) -> None:
    """The workload and metrics flags. capacity: the rate is what is searched for (no --rate, --num-requests or
    --duration), several TPOT SLOs may be given, and --gpus is a synonym of --num-gpus."""
    g = p.add_argument_group("workload")
    g.add_argument("--models", nargs="+", metavar="NAME", help="model names, most popular first")
    g.add_argument(
        "--num-models",
        type=_positive_int,
        default=None,
        help="instead of --models: M models named by --model-template (default 1)",
    )
    g.add_argument(
        "--model-template", default="model-{i}", help="name of model i for --num-models (default model-{i})"
    )
    g.add_argument(
        "--alpha", type=_nonneg_float, default=0.0, help="Zipf popularity exponent (0: uniform; default 0)"
    )
    if need_load:
        load = g.add_mutually_exclusive_group(required=True)
        load.add_argument(
            "--rate",
            type=_positive_float,
            nargs="+",
            metavar="R",
            help="open loop: requests/s (several: a sweep)",
        )
        load.add_argument(
            "--concurrency",
            type=_positive_int,
            nargs="+",
            metavar="C",
            help="closed loop: users (several: a sweep)",
        )
    g.add_argument(
        "--arrival", choices=ARRIVALS, default="poisson", help="open-loop arrival process (default poisson)"
    )
    g.add_argument(
        "--cv",
        type=_positive_float,
        default=None,
        help="gamma arrivals: coefficient of variation of the gaps (>1 burstier than Poisson; default 1)",
    )
    g.add_argument(
        "--input-len",
        type=_length,
        default=LengthDist(256, 256),
        metavar="N|LOW:HIGH",
        help="prompt tokens, fixed or uniform (default 256)",
    )
    g.add_argument(
        "--output-len",
        type=_length,
        default=LengthDist(128, 128),
        metavar="N|LOW:HIGH",
        help="output tokens asked for, fixed or uniform (default 128)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="JSONL (or JSON array) of ShareGPT conversations or {prompt, response} "
        "lines: prompts and output lengths from it (overrides --input-len/--output-len)",
    )
    g.add_argument(
        "--max-prompt-tokens", type=_positive_int, default=None, help="skip dataset prompts longer than this"
    )
    if not capacity:
        g.add_argument(
            "--num-requests",
            type=_positive_int,
            default=1000,
            help="requests per run, at most (default 1000)",
        )
        g.add_argument(
            "--duration",
            type=_positive_float,
            default=None,
            help="seconds per run: no request is issued after it",
        )
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    s = p.add_argument_group("metrics")
    s.add_argument(
        "--num-gpus",
        *(("--gpus",) if capacity else ()),
        dest="num_gpus",
        type=_positive_int,
        default=None,
        help="GPUs behind the server, for throughput per GPU",
    )
    s.add_argument(
        "--ttft-slo-ms", type=_positive_float, default=None, help="TTFT SLO for attainment and goodput"
    )
    if capacity:
        s.add_argument(
            "--tpot-slo-ms",
            type=_positive_float,
            nargs="+",
            required=True,
            metavar="MS",
            help="per-request TPOT SLO(s); each is searched for (sharing the probes)",
        )
    else:
        s.add_argument(
            "--tpot-slo-ms", type=_positive_float, default=None, help="TPOT SLO for attainment and goodput"
        )


def _workload(args, parser: argparse.ArgumentParser) -> WorkloadConfig:
    if args.models and args.num_models:
        parser.error("give either --models or --num-models, not both")
    if args.cv is not None and args.arrival != "gamma":
        parser.error("--cv only applies to --arrival gamma")
    models = (
        tuple(args.models)
        if args.models
        else tuple(args.model_template.format(i=i) for i in range(args.num_models or 1))
    )
    dataset = None
    if args.dataset:
        if not os.path.exists(args.dataset):
            parser.error(f"--dataset: no such file {args.dataset!r}")
        try:
            dataset = tuple(load_dataset(args.dataset, args.max_prompt_tokens))
        except ValueError as e:
            parser.error(f"--dataset: {e}")
    try:
        return WorkloadConfig(
            models,
            alpha=args.alpha,
            input_len=args.input_len,
            output_len=args.output_len,
            arrival=args.arrival,
            cv=args.cv or 1.0,
            seed=args.seed,
            dataset=dataset,
        )
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable


def _slo(args) -> SLO | None:
    if args.ttft_slo_ms is None and args.tpot_slo_ms is None:
        return None
    return SLO(args.ttft_slo_ms, args.tpot_slo_ms)


def _out_dir(args, prefix: str) -> Path:
    out = Path(args.out or f"results/{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _command_line() -> str:
    return "loadgen " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- loadgen run ----------------------------------------------------------------------------------------------------
def cmd_run(args, parser) -> int:
    from loadgen.report import table, write_records
    from loadgen.runner import run

    wc = _workload(args, parser)
    client = _client_config(args, parser)
    slo = _slo(args)
    out = _out_dir(args, "loadgen")
    points = [("rate", r) for r in args.rate] if args.rate else [("concurrency", c) for c in args.concurrency]
    summary = {
        "command": _command_line(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "url": client.endpoint_url,
        "endpoint": args.endpoint,
        "workload": wc.describe(),
        "num_requests": args.num_requests,
        "duration_s": args.duration,
        "num_gpus": args.num_gpus,
        "slo": None if slo is None else {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "runs": [],
    }
    runner = _event_loop_runner()
    for kind, value in points:
        label = f"{args.label + ' ' if args.label else ''}{kind[0]}={value:g}"
        rate = value if kind == "rate" else None
        specs = generate(wc, args.num_requests, rate=rate, duration_s=args.duration)
        records: list = []
        interrupted = False
        t_start = time.perf_counter()
        try:
            _, duration = runner(
                run(
                    specs,
                    client,
                    concurrency=None if rate else int(value),
                    duration_s=args.duration,
                    max_concurrency=args.max_concurrency,
                    drain_timeout_s=args.drain_timeout,
                    label=label,
                    progress=not args.no_progress,
                    records=records,
                )
            )
        except KeyboardInterrupt:  # keep what was recorded: in-flight requests stay 'cancelled'
            interrupted, duration = True, time.perf_counter() - t_start
        tag = f"{kind}-{value:g}"
        write_records(out / f"requests-{tag}.jsonl", records)
        s = summarize(records, duration_s=duration, num_gpus=args.num_gpus, slo=slo)
        lag = s["overall"]["send_lag_ms"]["p99"]
        if lag is not None and lag > 100:
            print(
                f"warning: {label}: requests went out up to {lag:.0f} ms late (p99): the load generator fell "
                "behind; latencies include none of that lag, but the offered rate was lower",
                file=sys.stderr,
            )
        summary["runs"].append(
            {
                "label": label,
                kind: value,
                "requests_file": f"requests-{tag}.jsonl",
                "interrupted": interrupted,
                **s,
            }
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if interrupted:
            print(f"interrupted: partial results of {label} written", file=sys.stderr)
            print(table(summary["runs"]), end="")
            return 130
    print(table(summary["runs"]), end="")
    print(f"results in {out}/ (summary.json, requests-*.jsonl)", file=sys.stderr)
    total = sum(r["overall"]["requests"] for r in summary["runs"])
    ok = sum(r["overall"]["ok"] for r in summary["runs"])
    return 0 if total and ok else 1


def _event_loop_runner():
    """uvloop's runner when it is installed (Ray workers have it; this driver must install it itself)."""
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        import asyncio

        return asyncio.run


# -- loadgen capacity -----------------------------------------------------------------------------------------------
def _capacity_flags(p: argparse.ArgumentParser) -> None:
    """The SLO criterion, the search and the probe design (loadgen/capacity.py explains each)."""
    g = p.add_argument_group("capacity search")
    g.add_argument(
        "--target",
        type=_positive_float,
        default=0.9,
        help="share of measured requests that must meet every SLO (default 0.9: the p90 of TPOT)",
    )
    g.add_argument(
        "--max-errors",
        type=_nonneg_int,
        default=0,
        help="failures other than refusals a probe may have and still hold (default 0)",
    )
    g.add_argument("--start-rate", type=_positive_float, default=4.0, help="first rate, req/s (default 4)")
    g.add_argument("--growth", type=_positive_float, default=2.0, help="ramp factor (default 2)")
    g.add_argument(
        "--resolution",
        type=_positive_float,
        default=0.1,
        help="bisect until hi / lo <= 1 + this (default 0.1)",
    )
    g.add_argument("--min-rate", type=_positive_float, default=0.25, help="lowest rate probed (default 0.25)")
    g.add_argument("--max-rate", type=_positive_float, default=1e4, help="highest rate probed (default 1e4)")
    g.add_argument("--max-probes", type=_positive_int, default=12, help="probes at most (default 12)")
    g.add_argument(
        "--budget", type=_positive_float, default=None, help="seconds for the whole search (default none)"
    )
    g.add_argument(
        "--warmup", type=_nonneg_float, default=3.0, help="seconds before the measurement window (default 3)"
    )
    g.add_argument(
        "--measure", type=_positive_float, default=6.0, help="seconds of the measurement window (default 6)"
    )
    g.add_argument(
        "--max-lag",
        type=_nonneg_float,
        default=0.2,
        help="a probe holds only if the server streamed >= 1 - this of the offered tokens in the window (default 0.2)",
    )
    g.add_argument(
        "--tail",
        type=_nonneg_float,
        default=None,
        help="seconds after the window before unfinished measured requests are cancelled "
        "(default: the longest a request meeting every SLO takes, + 1 s)",
    )


def _criteria(args, parser):
    from loadgen.capacity import Criterion

    try:
        return [
            Criterion(t, args.ttft_slo_ms, target=args.target, max_errors=args.max_errors)
            for t in sorted(set(args.tpot_slo_ms))
        ]
    except ValueError as e:
        parser.error(str(e))
        raise


def _search_config(args, parser):
    from loadgen.capacity import SearchConfig

    try:
        return SearchConfig(
            start_rate=args.start_rate,
            growth=args.growth,
            resolution=args.resolution,
            min_rate=min(args.min_rate, args.start_rate),
            max_rate=max(args.max_rate, args.start_rate),
            max_probes=args.max_probes,
            budget_s=args.budget,
        )
    except ValueError as e:
        parser.error(str(e))
        raise


def _probe_config(args, parser, **extra):
    from loadgen.capacity import ProbeConfig

    try:
        return ProbeConfig(
            warmup_s=args.warmup, measure_s=args.measure, tail_s=args.tail, max_lag=args.max_lag, **extra
        )
    except ValueError as e:
        parser.error(str(e))
        raise


def _capacity_doc(args, wc, criteria, pcfg, result, **extra) -> dict:
    max_out = wc.output_len.high if wc.dataset is None else max(d[2] for d in wc.dataset)
    return {
        "command": _command_line(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **extra,
        "workload": wc.describe(),
        "criteria": [c.describe() for c in criteria],
        "probe": pcfg.describe(criteria, max_out),
        "method": "loadgen/capacity.py (module docstring)",
        **result.to_json(),
    }


def cmd_capacity(args, parser) -> int:
    from loadgen.capacity import LiveProber, search, table
    from loadgen.report import write_records

    wc = _workload(args, parser)
    client = _client_config(args, parser)
    criteria = _criteria(args, parser)
    scfg = _search_config(args, parser)
    pcfg = _probe_config(
        args,
        parser,
        settle_s=args.settle,
        settle_timeout_s=args.settle_timeout,
        max_in_flight=args.max_concurrency,
        drain=args.drain,
    )
    out = _out_dir(args, "capacity")
    log = None if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True))
    prober = LiveProber(wc, client, criteria, pcfg, runner=_event_loop_runner(), log=log)
    try:
        base = prober.measure_baseline()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.no_progress:
        print(f"idle canary: {1e3 * base:.1f} ms end to end", file=sys.stderr)
    n = [0]

    def keep(p) -> None:
        n[0] += 1
        name = f"probe-{n[0]:02d}-rate-{p.rate:.4g}.jsonl"
        write_records(out / name, p.records)
        p.stats["requests_file"] = name

    try:
        result = search(
            prober, criteria, scfg, gpus=args.num_gpus, on_probe=keep, **({"log": log} if log else {})
        )
    except KeyboardInterrupt:
        return 130
    doc = _capacity_doc(
        args,
        wc,
        criteria,
        pcfg,
        result,
        url=client.endpoint_url,
        label=args.label,
        idle_canary_ms=round(1e3 * base, 2),
    )
    (out / "capacity.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc), end="")
    print(f"results in {out}/ (capacity.json, probe-*.jsonl)", file=sys.stderr)
    return 0


def _client_config(args, parser):
    from loadgen.client import ClientConfig

    try:
        return ClientConfig(
            args.url,
            endpoint=args.endpoint,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            timeout_s=args.timeout,
            ignore_eos=not args.no_ignore_eos,
            temperature=args.temperature,
            prompt_seed=args.seed,
        )
    except ValueError as e:
        parser.error(str(e))
        raise


def _add_client_flags(p: argparse.ArgumentParser, drain: bool = True) -> None:
    p.add_argument(
        "--url", required=True, help="server root (http://127.0.0.1:8000), .../v1, or a full endpoint URL"
    )
    p.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions (default) or /v1/chat/completions",
    )
    c = p.add_argument_group("client")
    c.add_argument(
        "--max-concurrency", type=_positive_int, default=None, help="open loop: at most this many in flight"
    )
    c.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds per request (default 600)")
    if drain:
        c.add_argument(
            "--drain-timeout",
            type=_nonneg_float,
            default=60.0,
            help="seconds to wait for requests still running after --duration (default 60); then cancelled",
        )
    c.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    c.add_argument("--temperature", type=_nonneg_float, default=0.0, help="sampling temperature (default 0)")
    c.add_argument(
        "--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers that reject it)"
    )


# -- loadgen plot ---------------------------------------------------------------------------------------------------
def cmd_plot(args, parser) -> int:
    from loadgen.plot import per_model, throughput_latency
    from loadgen.report import read_summary

    try:
        summaries = [read_summary(p) for p in args.summaries]
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    labels = args.labels or [Path(p).name or str(p) for p in args.summaries]
    if len(labels) != len(summaries):
        parser.error(f"--labels: {len(labels)} labels for {len(summaries)} summaries")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [throughput_latency(summaries, labels, out / "throughput_latency.png")]
    for s, label in zip(summaries, labels):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        paths.append(per_model(s, out / f"per_model_{safe}.png"))
    for p in paths:
        print(p)
    return 0


# -- loadgen fake-server --------------------------------------------------------------------------------------------
def cmd_fake_server(args, parser) -> int:
    from loadgen.fake_server import FakeConfig, serve_forever

    models = tuple(args.models) if args.models else tuple(f"model-{i}" for i in range(args.num_models))
    serve_forever(
        FakeConfig(
            models=models,
            ttft_s=args.ttft_ms / 1e3,
            tpot_s=args.tpot_ms / 1e3,
            max_tokens_cap=args.max_tokens_cap,
            refuse_every=args.refuse_every,
            error_every=args.error_every,
            step_base_ms=args.step_base_ms,
            step_per_seq_ms=args.step_per_seq_ms,
            max_batch=args.max_batch,
        ),
        host=args.host,
        port=args.port,
    )
    return 0


# -- loadgen sim ... ------------------------------------------------------------------------------------------------
def _load_profile(args, parser):
    from loadgen.sim.profile import load_profile

    try:
        return load_profile(args.profile)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--profile: {e}")


def _cluster(args, parser, models: tuple[str, ...], weights: list[float]):
    from loadgen.sim.cluster import ClusterConfig, allocate

    m = len(models)

    def per_model(vals: list[int], flag: str) -> tuple[int, ...]:
        if len(vals) == m:
            return tuple(vals)
        if len(vals) == 1:
            try:
                return tuple(allocate(vals[0], weights, minimum=1))
            except ValueError as e:
                parser.error(f"{flag}: {e}")
        parser.error(f"{flag}: give one total or one count per model ({m} models), got {len(vals)} values")
        raise AssertionError  # unreachable

    prefill = None if args.prefill_gpus == [0] else per_model(args.prefill_gpus, "--prefill-gpus")
    if args.policy == "sun":
        if len(args.decode_gpus) != 1:
            parser.error("--decode-gpus: sun takes one pool size")
        decode: int | tuple[int, ...] = args.decode_gpus[0]
    else:
        decode = per_model(args.decode_gpus, "--decode-gpus")
    try:
        return ClusterConfig(
            args.policy,
            models,
            prefill_gpus=prefill,
            decode_gpus=decode,
            max_num_seqs=args.max_num_seqs,
            kv_capacity_tokens=args.kv_capacity_tokens,
            prefill_max_batched_tokens=args.prefill_max_batched_tokens,
            kv_link_bytes_per_s=args.kv_link_gbps * 1e9,
            decode_workers_per_gpu=args.decode_workers_per_gpu,
            prefill_modules_per_gpu=args.prefill_modules_per_gpu,
            prefill_gpu_ids=None if args.prefill_gpu_ids is None else tuple(args.prefill_gpu_ids),
            decode_gpu_ids=None if args.decode_gpu_ids is None else tuple(args.decode_gpu_ids),
            gpu_sharing=args.gpu_sharing,
            frontend_s=args.frontend_ms / 1e3,
        )
    except ValueError as e:
        parser.error(str(e))
        raise


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--profile",
        default="h100-llama-3.1-8b-analytic",
        help="step-time profile: a JSON file or a built-in name (default h100-llama-3.1-8b-analytic)",
    )
    g.add_argument(
        "--policy", choices=("sun", "partitioned"), default="sun", help="decode routing (default sun)"
    )
    g.add_argument(
        "--prefill-gpus",
        type=_int_list,
        default=None,
        required=True,
        metavar="N|N1,N2,..",
        help="prefill GPUs: a total (split by popularity, >= 1 per model) or one count per model; 0: ideal",
    )
    g.add_argument(
        "--decode-gpus",
        type=_int_list,
        required=True,
        metavar="N|N1,N2,..",
        help="sun: the pool size; partitioned: a total (split by popularity) or one count per model",
    )
    g.add_argument("--max-num-seqs", type=_positive_int, default=512, help="decode batch limit (default 512)")
    g.add_argument(
        "--kv-capacity-tokens",
        type=_positive_int,
        default=None,
        help="KV tokens per decode GPU (default: the profile's)",
    )
    g.add_argument(
        "--prefill-max-batched-tokens",
        type=_positive_int,
        default=8192,
        help="tokens per prefill pass (default 8192)",
    )
    g.add_argument(
        "--prefill-modules-per-gpu",
        type=_positive_int,
        default=1,
        help="prefill replicas sharing one GPU by time slicing, in model order (default 1)",
    )
    g.add_argument(
        "--decode-workers-per-gpu",
        type=_positive_int,
        default=1,
        help="decode workers sharing one GPU by time slicing (fractional num_gpus; default 1)",
    )
    g.add_argument(
        "--prefill-gpu-ids",
        type=_int_list,
        default=None,
        metavar="I1,I2,..",
        help="the GPU index of each prefill replica, in model order (one index space with --decode-gpu-ids: "
        "equal indices share a GPU; default: GPUs of their own)",
    )
    g.add_argument(
        "--decode-gpu-ids",
        type=_int_list,
        default=None,
        metavar="I1,I2,..",
        help="the GPU index of each decode worker (e.g. 0 with --prefill-gpu-ids 0,0: one GPU for everything)",
    )
    g.add_argument(
        "--gpu-sharing",
        choices=("turns", "apart", "none"),
        default="turns",
        help="who takes turns on a shared GPU: everyone (default; offline profiles), replicas of one kind only "
        "(apart: an in-situ profile holding prefill's interference), nobody (none: an in-situ profile of this "
        "very deployment)",
    )
    g.add_argument(
        "--kv-link-gbps",
        type=_nonneg_float,
        default=25.0,
        help="prefill->decode KV link, GB/s (0: instant; default 25)",
    )
    g.add_argument(
        "--frontend-ms",
        type=_nonneg_float,
        default=0.0,
        help="the serving path outside the GPU, added before each request's prefill: HTTP proxy, ingress, Serve "
        "call, batch wait (default 0: bare engines; sunray on an H100 measured about 20)",
    )


def cmd_sim_run(args, parser) -> int:
    from loadgen.report import table
    from loadgen.sim.cluster import simulate

    if args.concurrency:
        parser.error("the simulator runs open loop: use --rate")
    wc = _workload(args, parser)
    profile = _load_profile(args, parser)
    cluster = _cluster(args, parser, wc.models, list(wc.popularity.values()))
    slo = _slo(args)
    summary = {
        "command": _command_line(),
        "profile": profile.to_json() | {"prefill": "...", "decode": "..."},
        "workload": wc.describe(),
        "cluster": _cluster_json(cluster),
        "runs": [],
    }
    for rate in args.rate:
        n = (
            args.num_requests
            if args.duration is None
            else min(args.num_requests, int(rate * args.duration * 1.5) + 100)
        )
        specs = generate(wc, n, rate=rate, duration_s=args.duration)
        res = simulate(specs, profile, cluster)
        s = res.summary(slo)
        summary["runs"].append({"label": f"{args.policy[:4]} r={rate:g}", "rate": rate, **s})
    print(table(summary["runs"]), end="")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"summary in {args.out}", file=sys.stderr)
    return 0


def cmd_sim_capacity(args, parser) -> int:
    from loadgen.capacity import search, table
    from loadgen.sim.capacity import SimProber

    wc = _workload(args, parser)
    profile = _load_profile(args, parser)
    cluster = _cluster(args, parser, wc.models, list(wc.popularity.values()))
    criteria = _criteria(args, parser)
    scfg = _search_config(args, parser)
    pcfg = _probe_config(args, parser)
    log = None if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True))
    gpus = args.num_gpus or cluster.num_gpus
    result = search(SimProber(wc, profile, cluster, criteria, pcfg), criteria, scfg, gpus=gpus, log=log)
    doc = _capacity_doc(
        args,
        wc,
        criteria,
        pcfg,
        result,
        profile=profile.name,
        cluster=_cluster_json(cluster),
        simulated=True,
    )
    print(table(doc), end="")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"results in {args.out}", file=sys.stderr)
    return 0


def _cluster_json(c) -> dict:
    import dataclasses

    d = dataclasses.asdict(c)
    d["num_gpus"] = c.num_gpus
    return d


def cmd_sim_paper(args, parser) -> int:
    from loadgen.sim.experiment import Setting, capacity_curves, markdown_table, size_setting

    profile = _load_profile(args, parser)
    results_all = []
    for tpot in args.tpot_slo_ms:
        setting = Setting(
            input_len=args.input_len,
            output_len=args.output_len,
            ttft_slo_s=args.ttft_slo_ms / 1e3,
            tpot_slo_s=tpot / 1e3,
            target=args.target,
            max_decode_wait_s=args.max_decode_wait_ms / 1e3,
            sim_seconds=args.sim_seconds,
            max_num_seqs=args.max_num_seqs,
            kv_link_bytes_per_s=args.kv_link_gbps * 1e9,
            seed=args.seed,
        )
        print(f"# TPOT SLO {tpot:g} ms: capacity curves", file=sys.stderr)
        dec, pre = capacity_curves(profile, setting)
        results = []
        for alpha in args.alphas:
            for gpus in args.gpus:
                print(f"# {args.num_models} models, alpha {alpha:g}, {gpus} GPUs", file=sys.stderr)
                results.append(size_setting(profile, setting, dec, pre, args.num_models, alpha, gpus))
        results_all.append(
            {
                "setting": setting.describe(),
                "capacity": {
                    "decode_req_per_s": {str(k): round(v, 3) for k, v in dec.points.items()},
                    "prefill_req_per_s": {str(k): round(v, 3) for k, v in pre.points.items()},
                },
                "results": results,
            }
        )
        print(f"\nTPOT SLO {tpot:g} ms (p{args.target * 100:g}), TTFT SLO {args.ttft_slo_ms:g} ms:\n")
        print(markdown_table(results))
    doc = {
        "command": _command_line(),
        "date": datetime.date.today().isoformat(),
        "profile": {k: v for k, v in profile.to_json().items() if k not in ("prefill", "decode")},
        "method": "loadgen/sim/experiment.py (module docstring)",
        "experiments": results_all,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nresults in {args.out}", file=sys.stderr)
    return 0


def cmd_sim_validate(args, parser) -> int:
    """Replay a live run's requests (arrival, model, token counts) through the simulator; compare the metrics."""
    from loadgen.metrics import summarize as summ
    from loadgen.report import read_records, read_summary
    from loadgen.sim.cluster import simulate
    from loadgen.workload import RequestSpec

    live = Path(args.live)
    if live.is_dir():
        s = read_summary(live)
        run = s["runs"][args.run]
        path = live / run["requests_file"]
    else:
        path = live
    try:
        records = read_records(path)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--live: {e}")
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        parser.error(f"--live: {path} has no successful requests to replay")
    specs = [
        RequestSpec(
            r.index,
            r.sent_s or r.scheduled_s,
            r.model,
            r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len,
            max(1, r.output_tokens),
        )
        for r in ok
    ]
    profile = _load_profile(args, parser)
    models = tuple(sorted({r.model for r in ok}))
    counts = {m: sum(r.model == m for r in ok) for m in models}
    cluster = _cluster(args, parser, models, [counts[m] for m in models])
    res = simulate(specs, profile, cluster)
    sim = summ(res.records(), num_gpus=cluster.num_gpus)
    real = summ(ok, num_gpus=cluster.num_gpus)
    rows = []
    print(f"{'metric':<28} {'live':>10} {'sim':>10} {'sim/live':>9}")
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for q in ("p50", "p90"):
            a, b = real["overall"][metric][q], sim["overall"][metric][q]
            rows.append(
                {
                    "metric": f"{metric} {q}",
                    "live": a,
                    "sim": b,
                    "ratio": round(b / a, 3) if a and b else None,
                }
            )
    for metric in ("request_throughput", "output_token_throughput"):
        a, b = real["overall"][metric], sim["overall"][metric]
        rows.append({"metric": metric, "live": a, "sim": b, "ratio": round(b / a, 3) if a and b else None})
    for row in rows:
        print(f"{row['metric']:<28} {_num(row['live']):>10} {_num(row['sim']):>10} {_num(row['ratio']):>9}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": _command_line(),
                    "live": str(path),
                    "profile": profile.name,
                    "cluster": _cluster_json(cluster),
                    "comparison": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def cmd_sim_analytic(args, parser) -> int:
    from loadgen.sim.profile import Roofline, analytic_profile

    roof = Roofline(
        decode_overhead_ms=args.decode_overhead_ms,
        prefill_flops_fraction=args.prefill_flops_fraction,
        hbm_bytes_per_s=args.hbm_tbps * 1e12,
    )
    prof = analytic_profile(roof)
    prof.save(args.out)
    print(f"{prof.summary()} -> {args.out}", file=sys.stderr)
    return 0


def cmd_sim_calibrate(args, parser) -> int:
    from loadgen.sim.profile import calibrate_in_situ, load_profile, merge_step_times

    try:
        prof = load_profile(args.profile)
        status = json.loads(Path(args.status).read_text())
        cal = calibrate_in_situ(
            prof,
            merge_step_times(status),
            args.context,
            min_steps=args.min_steps,
            name=args.name,
            source=args.status,
        )
    except (OSError, ValueError) as e:
        parser.error(str(e))
    cal.command = _command_line()
    cal.save(args.out)
    print(f"{cal.summary()} -> {args.out}\n{cal.notes.split('. Offline notes')[0]}", file=sys.stderr)
    return 0


# -- the parser -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadgen",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="load-test an OpenAI-compatible server")
    _add_client_flags(r)
    _add_workload_flags(r)
    r.add_argument("--out", default=None, help="results directory (default results/loadgen-DATE-TIME)")
    r.add_argument("--label", default="", help="prefix for the run labels")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.set_defaults(func=cmd_run, parser=r)

    cp = sub.add_parser(
        "capacity", help="the highest Poisson rate at which a server holds a TPOT (and TTFT) SLO"
    )
    _add_client_flags(cp, drain=False)
    _add_workload_flags(cp, need_load=False, capacity=True)
    _capacity_flags(cp)
    cp.add_argument(
        "--settle", type=_nonneg_float, default=2.0, help="seconds of quiet after each probe (default 2)"
    )
    cp.add_argument(
        "--settle-timeout",
        type=_positive_float,
        default=30.0,
        help="then canary requests until the server answers as fast as idle, for at most this (default 30)",
    )
    cp.add_argument(
        "--drain",
        action="store_true",
        help="at a probe's end let the requests in flight finish (up to the tail bound) instead of cancelling them",
    )
    cp.add_argument("--out", default=None, help="results directory (default results/capacity-DATE-TIME)")
    cp.add_argument("--label", default="", help="a name for this server or layout, kept in capacity.json")
    cp.add_argument("--no-progress", action="store_true", help="no probe lines on stderr")
    cp.set_defaults(func=cmd_capacity, parser=cp)

    pl = sub.add_parser("plot", help="PNG plots from summary files (throughput-latency, per model)")
    pl.add_argument("summaries", nargs="+", help="summary.json files or result directories")
    pl.add_argument("--labels", nargs="+", default=None, help="one legend label per summary")
    pl.add_argument("--out", default="plots", help="directory for the PNG files (default plots)")
    pl.set_defaults(func=cmd_plot, parser=pl)

    fs = sub.add_parser("fake-server", help="a fake OpenAI-compatible server for dry runs")
    fs.add_argument("--host", default="127.0.0.1")
    fs.add_argument("--port", type=_positive_int, default=8100)
    fs.add_argument("--models", nargs="+", default=None)
    fs.add_argument("--num-models", type=_positive_int, default=8)
    fs.add_argument("--ttft-ms", type=_nonneg_float, default=20.0)
    fs.add_argument("--tpot-ms", type=_nonneg_float, default=5.0)
    fs.add_argument("--max-tokens-cap", type=_positive_int, default=256)
    fs.add_argument(
        "--refuse-every", type=_nonneg_int, default=0, help="answer 429 to every k-th request (0: never)"
    )
    fs.add_argument(
        "--error-every", type=_nonneg_int, default=0, help="answer 500 to every k-th request (0: never)"
    )
    fs.add_argument(
        "--step-base-ms",
        type=_nonneg_float,
        default=0.0,
        help="capacity model: a batched step takes this + --step-per-seq-ms x running (replaces --tpot-ms)",
    )
    fs.add_argument("--step-per-seq-ms", type=_nonneg_float, default=0.0)
    fs.add_argument("--max-batch", type=_nonneg_int, default=0, help="capacity model: batch limit (0: none)")
    fs.set_defaults(func=cmd_fake_server, parser=fs)

    sim = sub.add_parser("sim", help="the cluster simulator").add_subparsers(
        dest="sim_command", required=True
    )
    sr = sim.add_parser("run", help="simulate one cluster under a workload (a rate sweep gives several runs)")
    _add_workload_flags(sr)
    _add_cluster_flags(sr)
    sr.add_argument("--out", default=None, help="write the summary JSON here (loadgen plot reads it)")
    sr.set_defaults(func=cmd_sim_run, parser=sr)

    sk = sim.add_parser(
        "capacity", help="the capacity search of `loadgen capacity` over simulated rates (the same probes)"
    )
    _add_workload_flags(sk, need_load=False, capacity=True)
    _add_cluster_flags(sk)
    _capacity_flags(sk)
    sk.add_argument("--out", default=None, help="write the capacity JSON here")
    sk.add_argument("--no-progress", action="store_true", help="no probe lines on stderr")
    sk.set_defaults(func=cmd_sim_capacity, parser=sk)

    sp = sim.add_parser(
        "paper", help="size SUN and partitioned clusters for M models on G GPUs (docs/results/simulation.md)"
    )
    sp.add_argument(
        "--profile", default="h100-llama-3.1-8b-analytic", help="step-time profile (file or built-in name)"
    )
    sp.add_argument("--num-models", type=_positive_int, default=8)
    sp.add_argument("--alphas", type=_nonneg_float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    sp.add_argument("--gpus", type=_positive_int, nargs="+", default=[16, 32, 64])
    sp.add_argument("--input-len", type=_length, default=LengthDist(64, 1024))
    sp.add_argument("--output-len", type=_length, default=LengthDist(64, 512))
    sp.add_argument("--ttft-slo-ms", type=_positive_float, default=1000.0)
    sp.add_argument("--tpot-slo-ms", type=_positive_float, nargs="+", default=[20.0])
    sp.add_argument(
        "--target", type=_positive_float, default=0.9, help="SLO attainment to hold (default 0.9)"
    )
    sp.add_argument("--max-decode-wait-ms", type=_positive_float, default=1000.0)
    sp.add_argument("--sim-seconds", type=_positive_float, default=40.0)
    sp.add_argument("--max-num-seqs", type=_positive_int, default=512)
    sp.add_argument("--kv-link-gbps", type=_nonneg_float, default=25.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default=None, help="write the results JSON here")
    sp.set_defaults(func=cmd_sim_paper, parser=sp)

    sv = sim.add_parser(
        "validate", help="replay a live run through the simulator and compare (the validation hook)"
    )
    sv.add_argument("--live", required=True, help="a `loadgen run` results directory or its requests-*.jsonl")
    sv.add_argument(
        "--run", type=int, default=-1, help="which run of the directory's sweep (default the last)"
    )
    _add_cluster_flags(sv)
    sv.add_argument("--out", default=None, help="write the comparison JSON here")
    sv.set_defaults(func=cmd_sim_validate, parser=sv)

    sc = sim.add_parser(
        "calibrate", help="scale a profile's decode times to the step times live decode workers reported"
    )
    sc.add_argument("--profile", required=True, help="the offline profile (file or built-in name)")
    sc.add_argument("--status", required=True, help="a saved /sunray/status answer (its decode step times)")
    sc.add_argument(
        "--context",
        type=_positive_float,
        required=True,
        help="tokens each sequence held on average while those steps ran (e.g. prompt + output / 2)",
    )
    sc.add_argument(
        "--min-steps", type=_positive_int, default=20, help="ignore batch buckets with fewer steps"
    )
    sc.add_argument("--name", default=None)
    sc.add_argument("--out", required=True)
    sc.set_defaults(func=cmd_sim_calibrate, parser=sc)

    sa = sim.add_parser("analytic-profile", help="write the analytic H100 / Llama-3.1-8B roofline profile")
    sa.add_argument("--out", required=True)
    sa.add_argument("--decode-overhead-ms", type=_nonneg_float, default=2.0)
    sa.add_argument("--prefill-flops-fraction", type=_positive_float, default=0.6)
    sa.add_argument("--hbm-tbps", type=_positive_float, default=3.0)
    sa.set_defaults(func=cmd_sim_analytic, parser=sa)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, args.parser)  # the subcommand's parser: its errors name the subcommand
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
