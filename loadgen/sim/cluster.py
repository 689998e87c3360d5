"""A discrete-event simulator of a disaggregated multi-model cluster, driven by a step-time profile.

Requests arrive (any `RequestSpec` workload), queue at a prefill GPU of their model (each prefill module has its
own GPUs, in both policies), are prefilled in FIFO passes of up to `prefill_max_batched_tokens` tokens, emit their
first token there, move their prompt KV over a link (latency + bytes / bandwidth) and are placed on a decode GPU:

- `sun`: any decode GPU takes any model (one shared frozen decode module); the router picks the least loaded
  (fewest running + waiting requests, then least KV reserved).
- `partitioned`: conventional disaggregation; each model's requests go only to that model's decode GPUs (least
  loaded among them).

A decode GPU does continuous batching: at every step boundary it admits waiting requests in FIFO order while the
batch has room (`max_num_seqs`) and the KV pool does (a request reserves prompt + output tokens on admission, so
nothing is preempted), then runs one step for the whole batch, taking `profile.decode_s(batch, mean context)`.
Token 1 comes from prefill; tokens 2..n from n-1 decode steps. Requests with one output token skip decode.

**Placement: the deployed cluster.** Every prefill replica and decode worker sits on a physical GPU, and the
cluster's GPU count (what throughput per GPU divides by) is the number of distinct GPUs used, as deployed.
`decode_workers_per_gpu` > 1 puts that many consecutive decode workers on one GPU, `prefill_modules_per_gpu` > 1
that many prefill replicas (in model order: model 0's first); by default prefill and decode get GPUs of their own.
`prefill_gpu_ids` / `decode_gpu_ids` place each replica and worker explicitly on a GPU index instead (one index
space for both: a prefill replica and a decode worker with the same index share that GPU, as on a single-GPU
deployment).

**Sharing a GPU.** Processes on one GPU take turns: a pass or step starts only when the GPU has finished the ones
queued before it (time slicing, Ray's fractional num_gpus without MPS). Under CUDA MPS kernels of several processes
run at once, but a memory-bound decode step needs the same HBM bandwidth either way, so the same turn-taking is the
model for MPS too (the aggregate work per second of the GPU is the same; an in-situ profile calibrated on the MPS
deployment absorbs the rest). `gpu_sharing` says who takes turns: "turns" (everyone on the GPU: use with an
offline profile, timed alone), "apart" (replicas of one kind take turns, but a prefill replica and a decode worker
run side by side: an in-situ profile whose live step times already hold prefill's interference), "none" (nobody:
an in-situ profile calibrated on this very deployment, whose step times hold every neighbour's interference, which
would otherwise count twice). The GPU count is the deployed one in every mode.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import operator
from collections.abc import Sequence

import numpy as np

from loadgen.metrics import SLO, RequestRecord, summarize
from loadgen.sim.profile import Profile
from loadgen.workload import RequestSpec

POLICIES = ("sun", "partitioned")
SHARING = ("turns", "apart", "none")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    policy: str
    models: tuple[str, ...]
    prefill_gpus: tuple[int, ...] | None  # per model; None: ideal prefill (no queueing; isolates decode)
    decode_gpus: int | tuple[int, ...]  # sun: the pool size; partitioned: per model. 0: stop after prefill
    max_num_seqs: int = 512
    kv_capacity_tokens: int | None = None  # per decode GPU; None: the profile's
    prefill_max_batched_tokens: int = 8192
    kv_link_bytes_per_s: float = 25e9  # prefill -> decode KV transfer (0: instant)
    kv_link_latency_s: float = 0.0005
    # > 1: that many decode workers share one GPU, taking turns (time slicing)
    decode_workers_per_gpu: int = 1
    prefill_modules_per_gpu: int = 1  # > 1: that many prefill replicas share one GPU, likewise
    prefill_gpu_ids: tuple[int, ...] | None = None  # GPU index of each prefill replica (model order)
    decode_gpu_ids: tuple[int, ...] | None = None  # GPU index of each decode worker (worker order)
    gpu_sharing: str = "turns"  # turns | apart | none: who takes turns on a shared GPU (module docstring)
    # The serving path outside the GPU, added to each request's time to first token: the HTTP proxy, the ingress,
    # its Serve call to the prefill replica and that replica's batch wait. Each request reaches its prefill queue
    # this much after it was sent (0: the bare engines; live sunray on an H100 measured about 20 ms).
    frontend_s: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        m = len(self.models)
        if self.prefill_gpus is not None and (len(self.prefill_gpus) != m or min(self.prefill_gpus) < 1):
            raise ValueError(
                f"prefill_gpus needs one count >= 1 per model ({m} models), got {self.prefill_gpus}"
            )
        if self.policy == "sun":
            if not isinstance(self.decode_gpus, int) or self.decode_gpus < 0:
                raise ValueError(f"sun needs one decode pool size >= 0, got {self.decode_gpus}")
        elif isinstance(self.decode_gpus, int):
            if self.decode_gpus != 0:
                raise ValueError("partitioned needs decode GPUs per model (a list), or 0 for prefill only")
        elif len(self.decode_gpus) != m or min(self.decode_gpus) < 1:
            raise ValueError(
                f"partitioned needs one decode GPU count >= 1 per model ({m} models), got {self.decode_gpus}"
            )
        if (
            min(
                self.max_num_seqs,
                self.prefill_max_batched_tokens,
                self.decode_workers_per_gpu,
                self.prefill_modules_per_gpu,
            )
            < 1
        ):
            raise ValueError(
                "max_num_seqs, prefill_max_batched_tokens, decode_workers_per_gpu and "
                "prefill_modules_per_gpu must be >= 1"
            )
        if not self.frontend_s >= 0:
            raise ValueError(f"frontend_s must be >= 0, got {self.frontend_s}")
        if self.gpu_sharing not in SHARING:
            raise ValueError(f"gpu_sharing must be one of {', '.join(SHARING)}, got {self.gpu_sharing!r}")
        for what, ids, n, per in (
            ("prefill_gpu_ids", self.prefill_gpu_ids, self.num_prefill, self.prefill_modules_per_gpu),
            ("decode_gpu_ids", self.decode_gpu_ids, self.num_decode, self.decode_workers_per_gpu),
        ):
            if ids is None:
                continue
            if len(ids) != n or (ids and min(ids) < 0):
                raise ValueError(f"{what} needs one GPU index >= 0 for each of the {n} replicas, got {ids}")
            if per != 1:
                raise ValueError(f"{what} places each replica itself: leave its per-GPU count at 1")

    def placement(self) -> tuple[list[int], list[int]]:
        """The GPU index of every prefill replica (model order) and every decode worker."""
        taken = set(self.prefill_gpu_ids or ()) | set(self.decode_gpu_ids or ())
        fresh = max(taken) + 1 if taken else 0
        if self.prefill_gpu_ids is not None:
            prefill = list(self.prefill_gpu_ids)
        else:
            prefill = [fresh + j // self.prefill_modules_per_gpu for j in range(self.num_prefill)]
            fresh = max(prefill, default=fresh - 1) + 1
        if self.decode_gpu_ids is not None:
            decode = list(self.decode_gpu_ids)
        else:
            decode = [fresh + k // self.decode_workers_per_gpu for k in range(self.num_decode)]
        return prefill, decode

    @property
    def num_prefill(self) -> int:
        return sum(self.prefill_gpus) if self.prefill_gpus is not None else 0

    @property
    def num_decode(self) -> int:
        """Decode workers (each a continuous-batching engine; GPUs when decode_workers_per_gpu is 1)."""
        return self.decode_gpus if isinstance(self.decode_gpus, int) else sum(self.decode_gpus)

    @property
    def num_gpus(self) -> int:
        """Distinct physical GPUs, as deployed (what throughput per GPU divides by)."""
        prefill, decode = self.placement()
        return len(set(prefill) | set(decode))


def allocate(total: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """Split `total` GPUs over models in proportion to `weights`, at least `minimum` each (largest remainder)."""
    m = len(weights)
    if total < minimum * m:
        raise ValueError(f"{total} GPUs cannot give {m} models at least {minimum} each")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    extra = total - minimum * m
    share = w * extra
    base = np.floor(share).astype(int)
    order = np.argsort(-(share - base), kind="stable")
    base[order[: extra - base.sum()]] += 1
    return (base + minimum).tolist()


class _Decode:
    __slots__ = (
        "idx",
        "key",
        "running",
        "waiting",
        "finish",
        "step",
        "ctx",
        "kv",
        "busy",
        "busy_s",
        "steps",
        "batch_sum",
        "gpu",
    )

    def __init__(self, idx: int, gpu: list[float]) -> None:
        self.idx = idx
        self.gpu = gpu  # [time the GPU finishes its queued steps], shared by the workers on that GPU
        self.key = 0  # routing load: (running + waiting) << 40 | KV reserved, kept current
        self.running = 0
        self.waiting: collections.deque[int] = collections.deque()
        self.finish: list[tuple[int, int]] = []  # (last step index, request)
        self.step = 0
        self.ctx = 0  # sum of KV tokens of the running requests
        self.kv = 0  # KV tokens reserved by running requests
        self.busy = False
        self.busy_s = 0.0
        self.steps = 0
        self.batch_sum = 0


class _Prefill:
    __slots__ = ("queue", "queued_tokens", "busy", "busy_s", "gpu")

    def __init__(self, gpu: list[float]) -> None:
        self.queue: collections.deque[int] = collections.deque()
        self.queued_tokens = 0
        self.busy = False
        self.busy_s = 0.0
        self.gpu = gpu  # [time the GPU finishes its queued passes], shared by the replicas on that GPU


@dataclasses.dataclass
class SimResult:
    cluster: ClusterConfig
    models: list[str]
    arrival: np.ndarray
    model_idx: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    first_token: np.ndarray  # NaN where it never happened
    decode_arrive: np.ndarray
    decode_admit: np.ndarray
    end: np.ndarray
    rejected: np.ndarray  # bool: could never fit a decode GPU's KV pool
    decode_busy_s: list[float]
    decode_mean_batch: list[float]
    prefill_busy_s: list[float]
    sim_end_s: float

    @property
    def horizon_s(self) -> float:
        return float(self.arrival.max()) if len(self.arrival) else 0.0

    def window(self, warmup: float = 0.25, cooldown: float = 0.2) -> np.ndarray:
        """Mask of the requests that arrived after the first `warmup` and before the last `cooldown` share of the
        arrival span (steady state: the pipeline has filled and is not yet draining)."""
        h = self.horizon_s
        return (self.arrival >= warmup * h) & (self.arrival <= (1 - cooldown) * h)

    def tpot(self) -> np.ndarray:
        n = self.output_len
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n >= 2, (self.end - self.first_token) / (n - 1), np.nan)

    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    def decode_wait(self) -> np.ndarray:
        return self.decode_admit - self.decode_arrive

    def attainment(
        self,
        mask: np.ndarray,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        max_decode_wait_s: float | None = None,
    ) -> float:
        """Share of the masked requests that finished within the SLOs (NaN: did not finish: a miss)."""
        if not mask.any():
            return float("nan")
        ok = np.isfinite(self.end[mask]) & ~self.rejected[mask]
        if ttft_s is not None:
            ok &= self.ttft()[mask] <= ttft_s
        if tpot_s is not None:
            tp = self.tpot()[mask]
            ok &= np.isnan(tp) | (tp <= tpot_s)  # NaN here: a one-token answer (unfinished ones are out)
        if max_decode_wait_s is not None:
            w = self.decode_wait()[mask]
            ok &= np.isnan(w) | (w <= max_decode_wait_s)
        return float(ok.mean())

    def records(self, mask: np.ndarray | None = None) -> list[RequestRecord]:
        idx = np.flatnonzero(mask) if mask is not None else range(len(self.arrival))
        out = []
        for i in idx:
            done = math.isfinite(self.end[i]) and not self.rejected[i]
            out.append(
                RequestRecord(
                    index=int(i),
                    model=self.models[self.model_idx[i]],
                    status="ok" if done else ("error" if self.rejected[i] else "cancelled"),
                    scheduled_s=float(self.arrival[i]),
                    sent_s=float(self.arrival[i]),
                    first_token_s=float(self.first_token[i]) if math.isfinite(self.first_token[i]) else None,
                    end_s=float(self.end[i]) if done else None,
                    prompt_len=int(self.prompt_len[i]),
                    max_tokens=int(self.output_len[i]),
                    prompt_tokens=int(self.prompt_len[i]),
                    completion_tokens=int(self.output_len[i]) if done else None,
                    error="KV larger than a decode GPU's pool" if self.rejected[i] else None,
                )
            )
        return out

    def summary(self, slo: SLO | None = None, warmup: float = 0.25, cooldown: float = 0.2) -> dict:
        """Load-generator-style metrics over the steady-state window (throughput over the window's length)."""
        mask = self.window(warmup, cooldown)
        span = (1 - cooldown - warmup) * self.horizon_s
        s = summarize(self.records(mask), duration_s=span, num_gpus=self.cluster.num_gpus or None, slo=slo)
        s["decode_wait_ms"] = _pct(self.decode_wait()[mask] * 1e3)
        s["gpus"] = {
            "prefill": self.cluster.num_prefill,
            "decode": self.cluster.num_decode,
            "decode_utilization": _round(self.decode_busy_s, self.sim_end_s),
            "decode_mean_batch": [round(b, 1) for b in self.decode_mean_batch],
            "prefill_utilization": _round(self.prefill_busy_s, self.sim_end_s),
        }
        return s


def _round(busy: list[float], span: float) -> list[float]:
    return [round(b / span, 3) if span > 0 else 0.0 for b in busy]


def _pct(a: np.ndarray) -> dict:
    a = a[np.isfinite(a)]
    if not a.size:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "mean": round(float(a.mean()), 3),
        **{f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)},
    }


def simulate(specs: Sequence[RequestSpec], profile: Profile, cluster: ClusterConfig) -> SimResult:
    """Run the workload through the cluster to the end (every request finishes or is rejected)."""
    models = list(cluster.models)
    mindex = {m: i for i, m in enumerate(models)}
    unknown = {s.model for s in specs} - set(mindex)
    if unknown:
        raise ValueError(f"workload names models the cluster does not serve: {sorted(unknown)}")
    order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
    specs = [specs[i] for i in order]
    n = len(specs)
    arrival = [s.arrival_s for s in specs]
    midx = [mindex[s.model] for s in specs]
    plen = [s.prompt_len for s in specs]
    olen = [s.output_len for s in specs]
    nan = math.nan
    first, darr, dadm, end = [nan] * n, [nan] * n, [nan] * n, [nan] * n
    rejected = [False] * n

    cap = cluster.kv_capacity_tokens or profile.kv_capacity_tokens
    max_seqs = cluster.max_num_seqs
    max_pf = cluster.prefill_max_batched_tokens
    link_bw, link_lat = cluster.kv_link_bytes_per_s, cluster.kv_link_latency_s
    kv_bytes = profile.kv_bytes_per_token
    prefill_s, decode_s = profile.prefill_s, profile.decode_s

    # each GPU's timeline ([time it finishes its queued work]), shared by the processes that take turns on it
    prefill_ids, decode_ids = cluster.placement()
    sharing = cluster.gpu_sharing
    timelines: dict = {}

    def timeline(kind: str, gpu: int) -> list[float]:
        if sharing == "none":
            return [0.0]  # a timeline of its own: it never waits for a neighbour
        return timelines.setdefault((kind, gpu) if sharing == "apart" else gpu, [0.0])

    # decode workers and the candidates for each model
    num_decode = cluster.num_decode
    dgpus = [_Decode(k, timeline("d", decode_ids[k])) for k in range(num_decode)]
    if num_decode == 0:
        cands: list[list[_Decode]] = [[] for _ in models]
    elif cluster.policy == "sun":
        cands = [dgpus for _ in models]
    else:
        bounds = np.cumsum([0, *cluster.decode_gpus]).tolist()
        cands = [dgpus[bounds[m] : bounds[m + 1]] for m in range(len(models))]
    pgpus: list[list[_Prefill]] | None = None
    if cluster.prefill_gpus is not None:
        firsts = np.cumsum([0, *cluster.prefill_gpus]).tolist()
        pgpus = [
            [_Prefill(timeline("p", prefill_ids[firsts[m] + j])) for j in range(k)]
            for m, k in enumerate(cluster.prefill_gpus)
        ]

    events: list = []  # (time, seq, kind, payload)
    seq = 0
    PREFILL_DONE, DECODE_ARRIVE, STEP_DONE, KICK_PREFILL, KICK_DECODE = 1, 2, 3, 4, 5
    push, pop = heapq.heappush, heapq.heappop
    load = operator.attrgetter("key")

    def start_prefill(g: _Prefill, t: float) -> None:
        nonlocal seq
        if not g.queue:
            g.busy = False
            return
        batch, tokens = [], 0
        while g.queue and (not batch or tokens + plen[g.queue[0]] <= max_pf):
            r = g.queue.popleft()
            batch.append(r)
            tokens += plen[r]
        g.queued_tokens -= tokens
        dt = prefill_s(tokens)
        g.busy, g.busy_s = True, g.busy_s + dt
        done = max(t, g.gpu[0]) + dt  # after the passes other replicas queued on this GPU
        g.gpu[0] = done
        seq += 1
        push(events, (done, seq, PREFILL_DONE, (g, batch)))

    def first_token(r: int, t: float) -> None:
        nonlocal seq
        first[r] = t
        if olen[r] < 2 or num_decode == 0:
            end[r] = t
            return
        t_kv = t + (link_lat + plen[r] * kv_bytes / link_bw if link_bw > 0 else 0.0)
        seq += 1
        push(events, (t_kv, seq, DECODE_ARRIVE, r))

    def start_step(g: _Decode, t: float) -> None:
        nonlocal seq
        w = g.waiting
        while w and g.running < max_seqs:
            r = w[0]
            need = plen[r] + olen[r]
            if need > cap:  # could never fit, even alone
                w.popleft()
                rejected[r] = True
                continue
            if g.kv + need > cap:
                break
            w.popleft()
            g.kv += need
            g.ctx += plen[r] + 1
            g.running += 1
            dadm[r] = t
            heapq.heappush(g.finish, (g.step + olen[r] - 2, r))
        g.key = (g.running + len(w)) << 40 | g.kv
        if g.running == 0:
            g.busy = False
            return
        dt = decode_s(g.running, g.ctx / g.running)
        g.busy, g.busy_s, g.steps, g.batch_sum = True, g.busy_s + dt, g.steps + 1, g.batch_sum + g.running
        done = max(t, g.gpu[0]) + dt  # after the steps other workers queued on this GPU
        g.gpu[0] = done
        seq += 1
        push(events, (done, seq, STEP_DONE, g))

    # When each request reaches its prefill queue (the arrival times stay what TTFT is measured from).
    fe = cluster.frontend_s
    enter = [a + fe for a in arrival] if fe else arrival
    i_arr = 0
    t = 0.0
    while i_arr < n or events:
        if i_arr < n and (not events or enter[i_arr] <= events[0][0]):
            r, t = i_arr, enter[i_arr]
            i_arr += 1
            if pgpus is None:
                first_token(r, t + prefill_s(plen[r]))
            else:
                pool = pgpus[midx[r]]
                g = (
                    pool[0]
                    if len(pool) == 1
                    else min(pool, key=lambda p: p.queued_tokens + (1 << 30) * p.busy)
                )
                g.queue.append(r)
                g.queued_tokens += plen[r]
                if not g.busy:  # start after every arrival of this instant has queued
                    g.busy = True
                    seq += 1
                    push(events, (t, seq, KICK_PREFILL, g))
            continue
        t, _, kind, payload = pop(events)
        if kind == STEP_DONE:
            g = payload
            g.ctx += g.running
            fin = g.finish
            while fin and fin[0][0] == g.step:
                _, r = heapq.heappop(fin)
                end[r] = t
                g.running -= 1
                g.ctx -= plen[r] + olen[r]
                g.kv -= plen[r] + olen[r]
            g.step += 1
            start_step(g, t)
        elif kind == DECODE_ARRIVE:
            r = payload
            darr[r] = t
            cs = cands[midx[r]]
            g = cs[0] if len(cs) == 1 else min(cs, key=load)
            g.waiting.append(r)
            g.key += 1 << 40
            if not g.busy:  # the step starts after every hand-off of this instant has arrived
                g.busy = True
                seq += 1
                push(events, (t, seq, KICK_DECODE, g))
        elif kind == KICK_DECODE:
            start_step(payload, t)
        elif kind == KICK_PREFILL:
            start_prefill(payload, t)
        else:  # PREFILL_DONE
            g, batch = payload
            for r in batch:
                first_token(r, t)
            if g.queue:
                start_prefill(g, t)
            else:
                g.busy = False

    arr = np.asarray
    return SimResult(
        cluster=cluster,
        models=models,
        arrival=arr(arrival, dtype=float),
        model_idx=arr(midx, dtype=int),
        prompt_len=arr(plen, dtype=int),
        output_len=arr(olen, dtype=int),
        first_token=arr(first, dtype=float),
        decode_arrive=arr(darr, dtype=float),
        decode_admit=arr(dadm, dtype=float),
        end=arr(end, dtype=float),
        rejected=arr(rejected, dtype=bool),
        decode_busy_s=[g.busy_s for g in dgpus],
        decode_mean_batch=[g.batch_sum / g.steps if g.steps else 0.0 for g in dgpus],
        prefill_busy_s=[p.busy_s for pool in (pgpus or []) for p in pool],
        sim_end_s=t,
    )
