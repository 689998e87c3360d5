"""The capacity search of `loadgen.capacity` over simulated rates: the same probes, judged the same way.

    loadgen sim capacity --profile PROFILE --policy sun --prefill-gpus 1,1 --decode-gpus 1 \\
        --prefill-gpu-ids 0,0 --decode-gpu-ids 0 --num-models 2 --tpot-slo-ms 20 40 --ttft-slo-ms 1000

A simulated probe at rate r generates the very requests a live probe at r sends (the same workload, seed and
horizon: arrivals up to the end of the window plus the tail), runs them through the cluster simulator to the end,
and then treats them as the live probe does: the measured requests are those arriving in the window; a measured
request still unfinished at the tail bound is cancelled (a miss); delivered tokens are counted over the window
(each request's tokens spread evenly from its first token to its end: the simulator's steps are uniform per
request between admissions), and the probe holds only if the server kept up with them, as live. The live early stop and settling have no counterpart: nothing carries over between
simulated probes. So a live capacity and a simulated one, of the same deployed cluster and workload, compare like
with like.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from loadgen.capacity import (
    Criterion,
    Probe,
    ProbeConfig,
    evaluate,
    keeps_up,
    probe_specs,
    tokens_in_window,
    window_stats,
)
from loadgen.sim.cluster import ClusterConfig, simulate
from loadgen.sim.profile import Profile
from loadgen.workload import WorkloadConfig


class SimProber:
    """Call it with a rate: one simulated probe (module docstring)."""

    def __init__(
        self,
        wc: WorkloadConfig,
        profile: Profile,
        cluster: ClusterConfig,
        criteria: Sequence[Criterion],
        pcfg: ProbeConfig,
    ) -> None:
        self.wc, self.profile, self.cluster, self.criteria, self.pcfg = (
            wc,
            profile,
            cluster,
            list(criteria),
            pcfg,
        )

    def __call__(self, rate: float) -> Probe:
        w0, w1 = self.pcfg.window
        max_out = self.wc.output_len.high if self.wc.dataset is None else max(d[2] for d in self.wc.dataset)
        deadline = w1 + self.pcfg.tail(self.criteria, max_out)
        t0 = time.perf_counter()
        specs, measured, asked = probe_specs(self.wc, rate, self.pcfg, deadline)
        res = simulate(specs, self.profile, self.cluster)
        records = res.records()
        delivered = sum(tokens_in_window(r, w0, w1) for r in records)
        stop = "done"
        for r in records:  # what the live probe would have cancelled at its tail bound
            if r.index in measured and r.status == "ok" and r.end_s is not None and r.end_s > deadline:
                r.status, r.end_s, r.completion_tokens = "cancelled", None, None
                stop = "tail bound"
        mine = [r for r in records if r.index in measured]
        stats = window_stats(records, measured, len(measured), asked, w0, w1, rate)
        stats["delivered"]["tok_s"] = round(delivered / (w1 - w0), 1)
        stats["sim"] = {
            "decode_mean_batch": [round(b, 1) for b in res.decode_mean_batch],
            "decode_utilization": [
                round(b / res.sim_end_s, 3) if res.sim_end_s else 0.0 for b in res.decode_busy_s
            ],
            "gpus": self.cluster.num_gpus,
        }
        up = keeps_up(stats, self.pcfg.max_lag)
        verdicts = {c.label: evaluate(mine, len(measured), c, up) for c in self.criteria}
        return Probe(rate, stats, verdicts, stop, time.perf_counter() - t0, 0.0, records)
