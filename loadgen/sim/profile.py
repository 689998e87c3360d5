"""Step-time profiles: how long a prefill pass and a decode step take on one GPU (or CPU) for one model shape.

A profile is a JSON file (format "sunray-step-profile/1"):

    {"format": "sunray-step-profile/1", "name": ..., "source": "measured" | "analytic",
     "device": ..., "date": "YYYY-MM-DD", "model": ..., "dtype": ..., "command": how it was made, "notes": ...,
     "kv_bytes_per_token": bytes of KV per token (all layers, K and V),
     "kv_capacity_tokens": KV tokens one decode worker holds,
     "prefill": {"tokens": [n, ...], "ms": [ms for one pass over n prompt tokens, ...]},
     "decode": {"batch": [b, ...], "context": [c, ...], "ms": [[ms per step at batch b, context c per sequence]]}}

Lookups interpolate linearly (bilinearly for decode) and extrapolate the last segment beyond the table, so a
profile that is linear in batch x context (memory-bound decode) is reproduced exactly. No torch needed here.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import json
import os
from pathlib import Path

FORMAT = "sunray-step-profile/1"
PROFILE_DIR = Path(__file__).parent / "profiles"


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); extends the end segments linearly; a single point is constant."""
    n = len(xs)
    if n == 1:
        return ys[0]
    i = bisect.bisect_right(xs, x) - 1
    i = 0 if i < 0 else (n - 2 if i > n - 2 else i)
    x0, x1 = xs[i], xs[i + 1]
    return ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0)


def _segment(xs: list[float], x: float) -> tuple[int, float]:
    """(i, w): x lies at weight w between xs[i] and xs[i + 1] (w outside [0, 1] beyond the ends)."""
    if len(xs) == 1:
        return 0, 0.0
    i = bisect.bisect_right(xs, x) - 1
    i = 0 if i < 0 else (len(xs) - 2 if i > len(xs) - 2 else i)
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def _bilinear(xs: list[float], ys: list[float], table: list[list[float]], x: float, y: float) -> float:
    i, wx = _segment(xs, x)
    j, wy = _segment(ys, y)
    i1 = i + 1 if len(xs) > 1 else i
    j1 = j + 1 if len(ys) > 1 else j
    r0, r1 = table[i], table[i1]
    a = r0[j] + (r0[j1] - r0[j]) * wy
    b = r1[j] + (r1[j1] - r1[j]) * wy
    return a + (b - a) * wx


@dataclasses.dataclass
class Profile:
    name: str
    source: str  # measured | analytic
    device: str
    date: str
    model: str
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    prefill_tokens: list[float]
    prefill_ms: list[float]
    decode_batch: list[float]
    decode_context: list[float]
    decode_ms: list[list[float]]  # [batch index][context index]
    dtype: str = ""
    command: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("measured", "analytic"):
            raise ValueError(
                f"profile {self.name}: source must be 'measured' or 'analytic', got {self.source!r}"
            )
        for label, xs in (
            ("prefill tokens", self.prefill_tokens),
            ("decode batch", self.decode_batch),
            ("decode context", self.decode_context),
        ):
            if not xs or any(b <= a for a, b in zip(xs, xs[1:])):
                raise ValueError(f"profile {self.name}: {label} must be a non-empty increasing list")
        if len(self.prefill_ms) != len(self.prefill_tokens):
            raise ValueError(f"profile {self.name}: prefill tokens and ms differ in length")
        if len(self.decode_ms) != len(self.decode_batch) or any(
            len(r) != len(self.decode_context) for r in self.decode_ms
        ):
            raise ValueError(f"profile {self.name}: decode ms must be a batch x context table")
        if any(v <= 0 for v in self.prefill_ms) or any(v <= 0 for r in self.decode_ms for v in r):
            raise ValueError(f"profile {self.name}: times must be positive")
        if self.kv_capacity_tokens <= 0 or self.kv_bytes_per_token <= 0:
            raise ValueError(
                f"profile {self.name}: kv_capacity_tokens and kv_bytes_per_token must be positive"
            )
        self._floor_prefill = min(self.prefill_ms) / 1e3
        self._floor_decode = min(min(r) for r in self.decode_ms) / 1e3

    # -- lookups (seconds) ---------------------------------------------------------------------------------------
    def prefill_s(self, tokens: float) -> float:
        """One prefill pass over `tokens` prompt tokens (several prompts batched: their total)."""
        return max(self._floor_prefill, _interp(self.prefill_tokens, self.prefill_ms, tokens) / 1e3)

    def decode_s(self, batch: float, context: float) -> float:
        """One decode step for `batch` sequences whose KV holds `context` tokens each on average."""
        return max(
            self._floor_decode,
            _bilinear(self.decode_batch, self.decode_context, self.decode_ms, batch, context) / 1e3,
        )

    # -- files ---------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "source": self.source,
            "device": self.device,
            "date": self.date,
            "model": self.model,
            "dtype": self.dtype,
            "command": self.command,
            "notes": self.notes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "prefill": {"tokens": self.prefill_tokens, "ms": self.prefill_ms},
            "decode": {"batch": self.decode_batch, "context": self.decode_context, "ms": self.decode_ms},
        }

    @classmethod
    def from_json(cls, d: dict, where: str = "profile") -> Profile:
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not a step profile (format {d.get('format')!r}, expected {FORMAT!r})")
        try:
            return cls(
                name=d["name"],
                source=d["source"],
                device=d["device"],
                date=d["date"],
                model=d["model"],
                dtype=d.get("dtype", ""),
                command=d.get("command", ""),
                notes=d.get("notes", ""),
                kv_bytes_per_token=int(d["kv_bytes_per_token"]),
                kv_capacity_tokens=int(d["kv_capacity_tokens"]),
                prefill_tokens=[float(x) for x in d["prefill"]["tokens"]],
                prefill_ms=[float(x) for x in d["prefill"]["ms"]],
                decode_batch=[float(x) for x in d["decode"]["batch"]],
                decode_context=[float(x) for x in d["decode"]["context"]],
                decode_ms=[[float(x) for x in row] for row in d["decode"]["ms"]],
            )
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r}") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def summary(self) -> str:
        return (
            f"{self.name} ({self.source}; {self.device}; {self.date}; model {self.model} {self.dtype}; "
            f"KV capacity {self.kv_capacity_tokens} tokens)"
        )


def merge_step_times(status: dict) -> dict[str, dict]:
    """The decode step times of every worker in a `/sunray/status` answer (or its "router" part), merged per batch
    bucket: {bucket: {steps, mean_ms, mean_batch}} as DecodeWorker.StepTimes.summary() gives them."""
    workers = status.get("router", status).get("workers", {})
    acc: dict[str, list[float]] = {}
    for w in workers.values():
        for bucket, t in (w.get("step_times") or {}).items():
            a = acc.setdefault(bucket, [0, 0.0, 0.0])
            a[0] += t["steps"]
            a[1] += t["steps"] * t["mean_ms"]
            a[2] += t["steps"] * t["mean_batch"]
    if not acc:
        raise ValueError("no decode step times in this status (a sunray /sunray/status answer is needed)")
    return {b: {"steps": n, "mean_ms": ms / n, "mean_batch": k / n} for b, (n, ms, k) in acc.items() if n}


def calibrate_in_situ(
    profile: Profile,
    step_times: dict[str, dict],
    context: float,
    *,
    min_steps: int = 20,
    name: str | None = None,
    source: str = "",
) -> Profile:
    """`profile` with its decode table scaled, batch size by batch size, to the step times a live decode worker
    reported (merge_step_times) while its sequences held about `context` tokens each.

    At each reported bucket (with at least `min_steps` steps) the factor is the live mean step time over the
    profile's time at the bucket's mean batch and `context`; between reported batches the factor is interpolated,
    beyond them held at the nearest. The dependence on context stays the profile's, and prefill is unchanged. What
    the factor takes in is whatever the offline profile leaves out: admitting new requests, the serving thread's
    share of the CPU, other processes on the same GPU."""
    points = sorted(
        (t["mean_batch"], t["mean_ms"] / (1e3 * profile.decode_s(t["mean_batch"], context)))
        for t in step_times.values()
        if t["steps"] >= min_steps
    )
    if not points:
        raise ValueError(f"no batch bucket has {min_steps} or more steps to calibrate from")
    xs, fs = [p[0] for p in points], [p[1] for p in points]

    def factor(batch: float) -> float:
        return fs[0] if batch <= xs[0] else fs[-1] if batch >= xs[-1] else _interp(xs, fs, batch)

    d = profile.to_json()
    d["name"] = name or f"{profile.name}-in-situ"
    d["decode"]["ms"] = [
        [round(v * factor(b), 3) for v in row] for b, row in zip(profile.decode_batch, profile.decode_ms)
    ]
    d["notes"] = (
        f"{profile.name} with decode scaled to live step times at context ~{context:g}{' (' + source + ')' if source else ''}; "
        "factor live/offline at mean batch "
        + ", ".join(f"{x:.1f}: {f:.2f}" for x, f in points)
        + f". Offline notes: {profile.notes}"
    )
    d["date"] = datetime.date.today().isoformat()
    return Profile.from_json(d)


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A profile from a JSON path or the name of one shipped in loadgen/sim/profiles/."""
    path = Path(name_or_path)
    if not path.exists():
        builtin = PROFILE_DIR / f"{name_or_path}.json"
        if not builtin.exists():
            raise FileNotFoundError(
                f"no profile file {str(name_or_path)!r} and no built-in profile of that name "
                f"(built-in: {', '.join(builtin_profiles()) or 'none'})"
            )
        path = builtin
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    return Profile.from_json(data, str(path))


# -- the analytic H100 profile for the Llama-3.1-8B shape ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Roofline:
    """A roofline model of one GPU running one dense decoder (defaults: Llama-3.1-8B bf16 on an H100 SXM)."""

    params: float = 8.030e9  # sunray.models.presets.SHAPES["llama-3.1-8b"].num_parameters()
    bytes_per_param: float = 2.0  # bf16: 16.06 GB of weights
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    kv_bytes_per_elem: int = 2
    hbm_bytes_per_s: float = 3.0e12  # measured device-to-device copy on the lent H100: 3.02 TB/s
    peak_flops: float = 790e12  # dense bf16 (the brief's figure)
    decode_flops_fraction: float = 0.5  # of the peak, for the decode GEMMs when they turn compute-bound
    prefill_flops_fraction: float = 0.6  # of the peak, for prefill
    decode_overhead_ms: float = 2.0  # launch, sampling, scheduling, per step
    prefill_overhead_ms: float = 3.0  # per pass
    memory_bytes: float = 80e9
    memory_utilization: float = 0.9  # share of HBM the engine takes
    activation_bytes: float = 4e9  # activations, CUDA graphs, workspace

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.memory_bytes * self.memory_utilization - self.weight_bytes - self.activation_bytes
        return int(free // self.kv_bytes_per_token)

    def decode_ms(self, batch: float, context: float) -> float:
        mem = (self.weight_bytes + batch * context * self.kv_bytes_per_token) / self.hbm_bytes_per_s
        # QK^T and PV, per sequence.
        attn_flops = 4 * self.num_layers * self.num_heads * self.head_dim * context
        flops = batch * (2 * self.params + attn_flops)
        compute = flops / (self.peak_flops * self.decode_flops_fraction)
        return self.decode_overhead_ms + 1e3 * max(mem, compute)

    def prefill_ms(self, tokens: float) -> float:
        # causal attention over one prompt of `tokens` (batched prompts overcount it a little: conservative)
        flops = 2 * self.params * tokens + 2 * self.num_layers * self.num_heads * self.head_dim * tokens**2
        compute = flops / (self.peak_flops * self.prefill_flops_fraction)
        mem = (self.weight_bytes + tokens * self.kv_bytes_per_token) / self.hbm_bytes_per_s
        return self.prefill_overhead_ms + 1e3 * max(mem, compute)


def analytic_profile(roof: Roofline | None = None, name: str = "h100-llama-3.1-8b-analytic") -> Profile:
    roof = roof or Roofline()
    batches = [
        1,
        2,
        4,
        8,
        16,
        32,
        48,
        64,
        96,
        128,
        160,
        192,
        224,
        256,
        288,
        320,
        352,
        384,
        416,
        448,
        480,
        512,
        576,
        640,
        768,
        1024,
    ]
    contexts = [64, 128, 192, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2048, 3072, 4096, 6144, 8192]
    tokens = [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    r = dataclasses.asdict(roof)
    return Profile(
        name=name,
        source="analytic",
        device="NVIDIA H100 SXM 80GB (analytic roofline, not measured)",
        date=datetime.date.today().isoformat(),
        model="llama-3.1-8b",
        dtype="bfloat16",
        command="python -m loadgen sim analytic-profile --out loadgen/sim/profiles/h100-llama-3.1-8b-analytic.json",
        notes=(
            "ANALYTIC until a measured GPU profile replaces it. Decode step = overhead + max(weights + KV "
            "reads at HBM bandwidth, FLOPs at a fraction of peak); prefill = overhead + max(weights read, FLOPs "
            f"at a fraction of peak). Parameters: {json.dumps(r)}"
        ),
        kv_bytes_per_token=roof.kv_bytes_per_token,
        kv_capacity_tokens=roof.kv_capacity_tokens,
        prefill_tokens=[float(t) for t in tokens],
        prefill_ms=[round(roof.prefill_ms(t), 4) for t in tokens],
        decode_batch=[float(b) for b in batches],
        decode_context=[float(c) for c in contexts],
        decode_ms=[[round(roof.decode_ms(b, c), 4) for c in contexts] for b in batches],
    )


def constant_profile(
    prefill_ms: float, decode_ms: float, kv_capacity_tokens: int = 1 << 30, name: str = "constant"
) -> Profile:
    """Flat step times (for tests and closed-form checks)."""
    return Profile(
        name=name,
        source="analytic",
        device="none (constant)",
        date="-",
        model="-",
        kv_bytes_per_token=1,
        kv_capacity_tokens=kv_capacity_tokens,
        prefill_tokens=[1.0],
        prefill_ms=[prefill_ms],
        decode_batch=[1.0],
        decode_context=[1.0],
        decode_ms=[[decode_ms]],
    )
