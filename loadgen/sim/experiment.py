"""Cluster sizing with the simulator: SUN's shared decode pool against per-model (partitioned) decode GPUs.

Method (every number comes from the discrete-event simulator, `loadgen.sim.cluster`):
1. Capacity curves, once per workload and SLO. decode_capacity[d]: the highest Poisson rate a pool of d decode
   GPUs serves with TPOT attainment >= target (and decode queueing <= max_decode_wait_s, so the pool is stable),
   prefill idealized. prefill_capacity[p]: the highest rate p prefill GPUs of one model serve with TTFT attainment
   >= target. Decode does not care which model a request came from, and a Zipf split of a Poisson stream is
   Poisson, so these curves size every model's share.
2. Sizing at rate L: model m gets share w_m of L. Prefill (per model in both systems): sum_m pmin(L w_m).
   SUN decode: dmin(L). Partitioned decode: sum_m max(1, dmin(L w_m)). The largest L whose prefill + decode fits
   G GPUs is the cluster's capacity; throughput per GPU = L * mean output tokens / G.
3. Check: the whole cluster (every model's prefill GPUs, the decode pool or partitions, the KV link, routing) is
   simulated end to end at that rate; if it misses the SLOs, the rate steps down 2% until it holds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from loadgen.sim.cluster import ClusterConfig, SimResult, simulate
from loadgen.sim.profile import Profile
from loadgen.workload import LengthDist, WorkloadConfig, generate, zipf_weights

DECODE_POINTS = (1, 2, 3, 4, 6, 8, 12, 16)
PREFILL_POINTS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclasses.dataclass(frozen=True)
class Setting:
    input_len: LengthDist = LengthDist(64, 1024)
    output_len: LengthDist = LengthDist(64, 512)
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.020
    target: float = 0.9  # SLO attainment (share of requests within the SLO)
    max_decode_wait_s: float = 1.0  # stability guard: p90 wait between arriving at decode and joining a batch
    sim_seconds: float = 40.0  # arrivals per simulation (the steady-state window is 25%..80% of it)
    max_num_seqs: int = 512
    kv_link_bytes_per_s: float = 25e9
    seed: int = 0

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_len"], d["output_len"] = str(self.input_len), str(self.output_len)
        return d


def _single_model(setting: Setting, rate: float) -> list:
    wc = WorkloadConfig(("m",), input_len=setting.input_len, output_len=setting.output_len, seed=setting.seed)
    return generate(
        wc, max(200, int(rate * setting.sim_seconds * 1.2) + 10), rate=rate, duration_s=setting.sim_seconds
    )


def decode_holds(profile: Profile, setting: Setting, d: int, rate: float) -> bool:
    cl = ClusterConfig(
        "sun",
        ("m",),
        prefill_gpus=None,
        decode_gpus=d,
        max_num_seqs=setting.max_num_seqs,
        kv_link_bytes_per_s=setting.kv_link_bytes_per_s,
    )
    res = simulate(_single_model(setting, rate), profile, cl)
    return _decode_attained(res, res.window(), setting)


def _decode_attained(res: SimResult, mask: np.ndarray, setting: Setting) -> bool:
    att = res.attainment(mask, tpot_s=setting.tpot_slo_s)
    wait = res.decode_wait()[mask]
    wait = wait[np.isfinite(wait)]
    p90 = float(np.percentile(wait, 90)) if wait.size else 0.0
    return att >= setting.target and p90 <= setting.max_decode_wait_s


def prefill_holds(profile: Profile, setting: Setting, p: int, rate: float) -> bool:
    cl = ClusterConfig("sun", ("m",), prefill_gpus=(p,), decode_gpus=0)
    res = simulate(_single_model(setting, rate), profile, cl)
    return res.attainment(res.window(), ttft_s=setting.ttft_slo_s) >= setting.target


def max_rate(holds: Callable[[float], bool], guess: float, rel_tol: float = 0.01) -> float:
    """The highest rate where `holds(rate)` (assumed monotone): bracket by doubling or halving, then bisect."""
    lo, hi = 0.0, guess
    while holds(hi):
        lo, hi = hi, hi * 2
        if hi > 1e7:
            raise RuntimeError("capacity search diverged: the SLO holds at any rate")
    if lo == 0.0:
        lo = hi / 2
        while not holds(lo):
            hi, lo = lo, lo / 2
            if lo < 1e-4:
                return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if holds(mid) else (lo, mid)
    return lo


@dataclasses.dataclass
class Capacity:
    """Highest sustainable rate (requests/s) against the number of GPUs, interpolated between measured points
    (linearly per GPU; beyond the last point, at the last point's rate per GPU)."""

    points: dict[int, float]

    def rate(self, k: int) -> float:
        if k <= 0:
            return 0.0
        ks = sorted(self.points)
        if k in self.points:
            return self.points[k]
        if k > ks[-1]:
            return self.points[ks[-1]] / ks[-1] * k
        per = np.interp(k, ks, [self.points[x] / x for x in ks])
        return float(per * k)

    def gpus_for(self, rate: float, minimum: int = 0) -> int:
        """Fewest GPUs whose capacity reaches `rate` (at least `minimum`)."""
        k = max(minimum, 1 if rate > 0 else minimum)
        while k < 100_000 and self.rate(k) < rate:
            k += 1
        return k


def capacity_curves(
    profile: Profile,
    setting: Setting,
    decode_points: Sequence[int] = DECODE_POINTS,
    prefill_points: Sequence[int] = PREFILL_POINTS,
    log=None,
) -> tuple[Capacity, Capacity]:
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    # first guesses from the profile: decode at a batch whose step meets the TPOT SLO, prefill at full use
    ctx = setting.input_len.mean + setting.output_len.mean / 2
    b = 1
    while b < setting.max_num_seqs and profile.decode_s(b * 2, ctx) <= setting.tpot_slo_s:
        b *= 2
    dec_guess = b / profile.decode_s(b, ctx) / setting.output_len.mean
    pre_guess = 1 / profile.prefill_s(setting.input_len.mean)
    dec, pre = {}, {}
    for d in decode_points:
        t = time.perf_counter()
        guess = dec[max(dec)] / max(dec) * d if dec else dec_guess * d
        dec[d] = max_rate(lambda r, d=d: decode_holds(profile, setting, d, r), guess)
        log(
            f"decode capacity, {d:>3} GPUs: {dec[d]:9.2f} req/s ({dec[d] / d:7.2f} per GPU)  [{time.perf_counter() - t:.1f} s]"
        )
    for p in prefill_points:
        t = time.perf_counter()
        guess = pre[max(pre)] / max(pre) * p if pre else pre_guess * p
        pre[p] = max_rate(lambda r, p=p: prefill_holds(profile, setting, p, r), guess)
        log(
            f"prefill capacity, {p:>3} GPUs: {pre[p]:9.2f} req/s ({pre[p] / p:7.2f} per GPU)  [{time.perf_counter() - t:.1f} s]"
        )
    return Capacity(dec), Capacity(pre)


@dataclasses.dataclass
class Plan:
    policy: str
    rate: float
    prefill: list[int]
    decode: int | list[int]

    @property
    def num_prefill(self) -> int:
        return sum(self.prefill)

    @property
    def num_decode(self) -> int:
        return self.decode if isinstance(self.decode, int) else sum(self.decode)


def plan(policy: str, rate: float, weights: Sequence[float], dec: Capacity, pre: Capacity) -> Plan:
    prefill = [pre.gpus_for(rate * w, minimum=1) for w in weights]
    if policy == "sun":
        return Plan(policy, rate, prefill, dec.gpus_for(rate, minimum=1))
    return Plan(policy, rate, prefill, [dec.gpus_for(rate * w, minimum=1) for w in weights])


def max_cluster_rate(
    policy: str, gpus: int, weights: Sequence[float], dec: Capacity, pre: Capacity
) -> Plan | None:
    """The highest rate whose plan fits `gpus` (None if even a trickle does not fit)."""

    def fits(r: float) -> bool:
        p = plan(policy, r, weights, dec, pre)
        return p.num_prefill + p.num_decode <= gpus

    lo = 1e-3
    if not fits(lo):
        return None
    hi = lo
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1e-4 * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return plan(policy, lo, weights, dec, pre)


def verify(
    profile: Profile, setting: Setting, models: Sequence[str], alpha: float, p: Plan
) -> tuple[bool, dict]:
    """Simulate the whole cluster of plan `p` end to end; did it hold the SLOs?"""
    wc = WorkloadConfig(
        tuple(models),
        alpha=alpha,
        input_len=setting.input_len,
        output_len=setting.output_len,
        seed=setting.seed + 17,
    )
    specs = generate(
        wc, int(p.rate * setting.sim_seconds * 1.2) + 10, rate=p.rate, duration_s=setting.sim_seconds
    )
    cl = ClusterConfig(
        p.policy,
        tuple(models),
        prefill_gpus=tuple(p.prefill),
        decode_gpus=p.decode if isinstance(p.decode, int) else tuple(p.decode),
        max_num_seqs=setting.max_num_seqs,
        kv_link_bytes_per_s=setting.kv_link_bytes_per_s,
    )
    res = simulate(specs, profile, cl)
    mask = res.window()
    att = res.attainment(mask, ttft_s=setting.ttft_slo_s, tpot_s=setting.tpot_slo_s)
    ok = att >= setting.target and _decode_attained(res, mask, setting)
    # partitioned: every model must hold its SLO on its own GPUs, not only the mix
    per_model = {}
    for m in range(len(models)):
        mm = mask & (res.model_idx == m)
        if mm.sum() >= 20:
            a = res.attainment(mm, ttft_s=setting.ttft_slo_s, tpot_s=setting.tpot_slo_s)
            per_model[models[m]] = round(a, 3)
            ok = ok and a >= setting.target - 0.05
    tp, tt = res.tpot()[mask], res.ttft()[mask]
    util = np.asarray(res.decode_busy_s) / res.sim_end_s if res.decode_busy_s else np.zeros(1)
    stats = {
        "attainment": round(att, 4),
        "attainment_per_model": per_model,
        "tpot_ms_p50": _r(np.nanpercentile(tp, 50) * 1e3),
        "tpot_ms_p90": _r(np.nanpercentile(tp, 90) * 1e3),
        "ttft_ms_p90": _r(np.nanpercentile(tt, 90) * 1e3),
        "decode_utilization_mean": _r(float(util.mean())),
        "decode_utilization_min": _r(float(util.min())),
        "decode_mean_batch": _r(float(np.mean(res.decode_mean_batch))) if res.decode_mean_batch else None,
        "requests_simulated": len(specs),
    }
    return ok, stats


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 3)


def size_setting(
    profile: Profile,
    setting: Setting,
    dec: Capacity,
    pre: Capacity,
    num_models: int,
    alpha: float,
    gpus: int,
    log=None,
) -> dict:
    """Both policies on `gpus` GPUs: capacity, plan, end-to-end check; and decode GPUs each needs at one load."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    models = [f"model-{i}" for i in range(num_models)]
    weights = zipf_weights(num_models, alpha).tolist()
    out: dict = {"models": num_models, "alpha": alpha, "gpus": gpus}
    for policy in ("sun", "partitioned"):
        p = max_cluster_rate(policy, gpus, weights, dec, pre)
        if p is None:
            out[policy] = {"fits": False}
            continue
        planned = p.rate
        ok, stats = verify(profile, setting, models, alpha, p)
        tries = 0
        while not ok and tries < 15:
            tries += 1
            p = plan(policy, p.rate * 0.98, weights, dec, pre)
            ok, stats = verify(profile, setting, models, alpha, p)
        tput = p.rate * setting.output_len.mean
        out[policy] = {
            "fits": True,
            "verified": ok,
            "rate_planned": round(planned, 3),
            "rate": round(p.rate, 3),
            "output_tok_per_s": round(tput, 1),
            "output_tok_per_s_per_gpu": round(tput / gpus, 1),
            "output_tok_per_s_per_decode_gpu": round(tput / p.num_decode, 1),
            "prefill_gpus": p.prefill,
            "decode_gpus": p.decode,
            "gpus_used": p.num_prefill + p.num_decode,
            "sim": stats,
        }
        log(
            f"  {policy:>11}: {p.rate:8.1f} req/s, {tput / gpus:8.0f} tok/s/GPU, prefill {p.num_prefill} "
            f"decode {p.num_decode}, attainment {stats['attainment']}, TPOT p90 {stats['tpot_ms_p90']} ms"
            + ("" if ok else "  (NOT VERIFIED)")
        )
    if out["sun"].get("fits") and out["partitioned"].get("fits"):
        out["ratio"] = round(
            out["sun"]["output_tok_per_s_per_gpu"] / out["partitioned"]["output_tok_per_s_per_gpu"], 3
        )
        # the same load (what partitioned carries on `gpus`): how many GPUs each needs
        ref = out["partitioned"]["rate"]
        ps, pp = plan("sun", ref, weights, dec, pre), plan("partitioned", ref, weights, dec, pre)
        out["at_partitioned_load"] = {
            "rate": ref,
            "prefill_gpus": ps.num_prefill,
            "decode_gpus_sun": ps.num_decode,
            "decode_gpus_partitioned": pp.num_decode,
            "gpus_sun": ps.num_prefill + ps.num_decode,
            "gpus_partitioned": pp.num_prefill + pp.num_decode,
            "per_gpu_ratio": round((pp.num_prefill + pp.num_decode) / (ps.num_prefill + ps.num_decode), 3),
            "per_decode_gpu_ratio": round(pp.num_decode / ps.num_decode, 3),
        }
    else:
        out["ratio"] = None
    return out


def markdown_table(results: list[dict]) -> str:
    head = (
        "| models | alpha | GPUs | SUN req/s | SUN P+D | SUN tok/s/GPU | part. req/s | part. P+D | "
        "part. tok/s/GPU | **ratio** | at part. load: decode GPUs SUN / part. | at part. load: GPUs SUN / part. |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        s, p = r["sun"], r["partitioned"]

        def cell(x: dict) -> tuple[str, str, str]:
            if not x.get("fits"):
                return "does not fit", "-", "-"
            mark = "" if x["verified"] else " (unverified)"
            return (
                f"{x['rate']:.1f}{mark}",
                f"{sum(x['prefill_gpus'])}+{_n(x['decode_gpus'])}",
                f"{x['output_tok_per_s_per_gpu']:.0f}",
            )

        a = r.get("at_partitioned_load")
        dec = f"{a['decode_gpus_sun']} / {a['decode_gpus_partitioned']}" if a else "-"
        tot = f"{a['gpus_sun']} / {a['gpus_partitioned']}" if a else "-"
        ratio = f"**{r['ratio']:.2f}**" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['models']} | {r['alpha']} | {r['gpus']} | {' | '.join(cell(s))} | {' | '.join(cell(p))} | "
            f"{ratio} | {dec} | {tot} |"
        )
    return "\n".join(lines)


def _n(d: int | list[int]) -> int:
    return d if isinstance(d, int) else sum(d)
