"""Typed arguments of a sunray application, as `serve run` passes them from a YAML file's `args`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sunray.engine.config import EngineConfig
from sunray.serve.router import POLICIES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1)
    kv_cache_mb: int = Field(256, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    attention_backend: str = "auto"  # triton with CUDA graphs on a GPU, torch on a CPU
    # Decode workers launch each pass before reading the last one's tokens (EngineConfig.overlap_steps): the same
    # tokens, the host's share of a step hidden under the device's (Llama-3.1-8B on an H100, steps back to back:
    # 22.8 -> 19.9 ms at batch 256, 10.3 -> 9.2 at 64; docs/results/gpu-notes.md). Unset: on for a CUDA decode
    # device only. A CPU computes each pass as it is launched, so there nothing overlaps and every output would
    # reach its client one step later.
    overlap_steps: bool | None = None

    def engine_config(self, device: str = "cpu") -> EngineConfig:
        return EngineConfig(
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_bytes=self.kv_cache_mb << 20,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            attention_backend=self.attention_backend,
            overlap_steps=device.startswith("cuda") if self.overlap_steps is None else self.overlap_steps,
        )


class ModelArgs(BaseModel):
    """One task model: a name clients use, and its prefill module."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # A model directory, or "default" (the embedded SmolLM2 base). A training recipe ({train: {...}}) is turned
    # into a directory by `sunray prepare`, which trains it once and writes the prepared config; serving never trains.
    prefill_module: str = "default"
    description: str = ""
    num_replicas: int | Literal["auto"] = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("prefill_module", mode="before")
    @classmethod
    def _check_prefill_module(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, dict):
            raise ValueError(
                f"model {info.data.get('name', '?')!r}: prefill_module {{{', '.join(map(str, v))}: ...}} is a "
                "training recipe; serving takes a model directory. Run `sunray prepare CONFIG` (or `make serve`): "
                "it trains the module once, caches it, and writes a config that names its directory"
            )
        return v


class DecodeArgs(BaseModel):
    """What a decode worker (and anything that loads a module) needs; independent of the task models, so adding a
    model never changes the decode pool's arguments and Serve keeps its replicas running."""

    model_config = ConfigDict(extra="forbid")

    decode_module: str = "default"
    dummy_shape: str | None = None  # benchmarks: a presets shape with random weights for every module
    # With dummy_shape: quantize the decode module so (int4-g128, ...: round to nearest, speed only) and give the
    # prefill modules its fingerprint, as QSUN-trained ones would have. int8 is refused on CUDA (no fast path).
    dummy_quantization: str | None = None
    tokenizer: str = "default"  # used with dummy_shape only; otherwise each module brings its own
    decode_worker_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(1, ge=1)
    engine: EngineArgs = Field(default_factory=EngineArgs)
    max_waiting_per_worker: int = Field(256, ge=1)  # beyond this a decode worker answers 503 with Retry-After
    # How prompt KV travels from prefill to decode (give both applications the same): the Ray object store
    # (anywhere), CUDA IPC (one GPU/node), or NCCL from the prefill GPU to the decode GPU (gloo when device is cpu).
    kv_transport: Literal["object_store", "cuda_ipc", "nccl"] = "object_store"
    kv_timeout_s: float = Field(10.0, gt=0)  # nccl: the longest wait for one KV transfer before re-prefilling

    @model_validator(mode="after")
    def _check_dummy_quantization(self) -> DecodeArgs:
        if self.dummy_quantization is None:
            return self
        if not self.dummy_shape:
            raise ValueError(
                "dummy_quantization goes with dummy_shape; a real decode module is quantized with "
                "`sunray quantize` and named as decode_module"
            )
        from sunray.models.quant.formats import QuantSpec

        spec = QuantSpec.parse(self.dummy_quantization, awq=False)  # ValueError naming the scheme
        if spec.bits == 8 and self.device.startswith("cuda"):
            raise ValueError(
                "dummy_quantization int8 has no fast path on CUDA (the reference path runs at bf16 "
                "speed); use int4-g128"
            )
        return self

    @model_validator(mode="after")
    def _check_transport(self) -> DecodeArgs:
        if self.kv_transport == "nccl":
            import torch.distributed as dist

            if not dist.is_available():
                raise ValueError(
                    "kv_transport nccl needs torch.distributed, which this torch build lacks; "
                    "use object_store"
                )
            if self.device.startswith("cuda") and not dist.is_nccl_available():
                raise ValueError(
                    "kv_transport nccl needs a torch build with NCCL; use object_store or cuda_ipc"
                )
        return self

    def kv_transport_options(self) -> dict[str, Any]:
        """The constructor options of this config's KV transport."""
        if self.kv_transport == "nccl":
            return {"device": self.device, "timeout_s": self.kv_timeout_s}
        return {}

    def _check_own_gpus(self, what: str, options: dict[str, Any]) -> None:
        """NCCL moves KV between two GPUs: with kv_transport nccl on CUDA, every worker needs a GPU. A fraction is
        allowed (several prefill replicas may share one GPU, several decode workers another); a prefill replica and
        a decode worker that land on the same GPU are refused when they pair, naming the fix."""
        if self.kv_transport == "nccl" and self.device.startswith("cuda"):
            gpus = options.get("num_gpus", 0) or 0
            if gpus <= 0:
                raise ValueError(
                    f"kv_transport nccl moves KV from one GPU to another, so {what} needs a GPU "
                    f"(num_gpus > 0, got {gpus}); prefill and decode that share a GPU use "
                    "kv_transport: cuda_ipc"
                )

    def decode_args(self) -> dict[str, Any]:
        """Only the loading fields: what decode workers and prefill replicas are built from."""
        return DecodeArgs.model_validate(self.model_dump(include=set(DecodeArgs.model_fields))).model_dump()

    def torch_dtype(self):
        import torch

        return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.dtype
        ]


class DecodeAppArgs(DecodeArgs):
    """The decode application: the router and the shared decode pool. It lives apart from the task models'
    application so that adding a task model (a redeploy of that one) never restarts the decode workers."""

    decode_workers: int = Field(2, ge=1)
    # Instead of a fixed count: Serve autoscaling of the pool, e.g. with sunray.serve.autoscaling's policy.
    decode_autoscaling_config: dict[str, Any] | None = None
    router_policy: str = "sun"
    # partitioned only: the task model names, and optionally model -> decode worker indices (0-based);
    # without `partition` the workers are dealt round-robin to the sorted models.
    models: list[str] = Field(default_factory=list)
    partition: dict[str, list[int]] | None = None
    # Ray actor options of the router replica (e.g. a node resource that keeps it off the decode nodes).
    router_options: dict[str, Any] = Field(default_factory=dict)

    def worker_bundle(self) -> dict[str, float]:
        """What one decode worker takes from its node, as a placement-group bundle (zeros left out)."""
        o = self.decode_worker_options
        bundle = {"CPU": o.get("num_cpus", 0), "GPU": o.get("num_gpus", 0), **o.get("resources", {})}
        return {k: float(v) for k, v in bundle.items() if v}

    @field_validator("router_policy")
    @classmethod
    def _check_policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"router_policy {v!r} is not one of {', '.join(POLICIES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> DecodeAppArgs:
        self._check_own_gpus("each decode worker (decode_worker_options)", self.decode_worker_options)
        if self.router_policy == "partitioned" and not self.models:
            raise ValueError(
                "router_policy partitioned needs `models`: the task model names to pin to workers"
            )
        if self.partition is not None:
            unknown = sorted(set(self.partition) - set(self.models))
            if unknown:
                raise ValueError(f"partition names unknown models: {', '.join(unknown)}")
            bad = sorted(
                {i for ids in self.partition.values() for i in ids if not 0 <= i < self.decode_workers}
            )
            if bad:
                raise ValueError(
                    f"partition names decode workers {bad}; there are {self.decode_workers} (0-based)"
                )
        return self


class AppArgs(DecodeArgs):
    """The task models' application: the OpenAI ingress and one prefill deployment per task model."""

    models: list[ModelArgs] = Field(min_length=1)
    decode_app: str = "sunray-decode"  # the name of the decode application this one sends requests to
    default_max_tokens: int = Field(256, ge=1)
    max_ongoing_requests: int = Field(512, ge=1)  # per ingress replica; beyond it 503 with Retry-After
    # Request limits (413 beyond the body size) and the bounds on every wait (503 with Retry-After past them).
    max_request_bytes: int = Field(4 << 20, ge=1024)
    prefill_timeout_s: float = Field(120.0, gt=0)  # one prefill call, queueing at a busy replica included
    decode_stall_timeout_s: float = Field(30.0, gt=0)  # a decode worker silent this long is treated as failed
    # The environment variable holding the API key (read by each ingress replica); unset or empty: no key needed.
    api_key_env: str | None = "SUNRAY_API_KEY"
    ingress_replicas: int = Field(1, ge=1)
    # Tokens per streamed chunk at most (vLLM's --stream-interval): the first token and the last chunk go at once,
    # the rest in chunks of this many tokens. Each chunk is an item on Serve's stream from the ingress to the HTTP
    # proxy, about 0.3 ms of CPU in the two (python -m experiments.serving_overhead), so at GPU rates 1 (every
    # token at once, the default) costs more host time than the rest of a request.
    stream_interval: int = Field(1, ge=1)
    ingress_options: dict[str, Any] = Field(default_factory=dict)  # Ray actor options of the ingress replicas

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        for m in self.models:
            self._check_own_gpus(f"each prefill replica of {m.name} (ray_actor_options)", m.ray_actor_options)
        return self
