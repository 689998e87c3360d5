"""`sunray eval`: task accuracy of a (prefill module, decode module) pair through the real engine path.

Every test prompt goes through `LocalSUN`: the prefill engine runs the prefill module and samples the first token,
the KV hand-off carries the prompt KV to the decode engine, and the shared decode module generates the rest
(greedy). Completions are scored by the task's scorer. Nothing here calls `transformers.generate`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from sunray.engine.config import EngineConfig
from sunray.engine.local import LocalSUN
from sunray.engine.sequence import SamplingParams
from sunray.models.loader import LoadedModel, wrap_model
from sunray.sun.data import prompt_token_ids
from sunray.sun.tasks import Task


@dataclasses.dataclass
class EvalResult:
    task: str
    split: str
    n: int
    correct: int
    prefill_module: str
    decode_module: str
    fingerprint: str
    naive_mix: bool
    wall_s: float
    samples: list[dict[str, Any]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "accuracy": self.accuracy}


def as_naive_mix(prefill: LoadedModel, decode: LoadedModel) -> LoadedModel:
    """The naive-mix baseline: a prefill module declared compatible with a decode module it was not trained for.

    The engine refuses mismatched KV on purpose; this re-labels the prefill module with the decode module's
    fingerprint so the (deliberately wrong) pairing can be measured.
    """
    manifest = dict(prefill.manifest or {})
    manifest["base_fingerprint"] = decode.fingerprint.to_dict()
    return wrap_model(prefill.model, prefill.tokenizer, prefill.path, manifest)


def evaluate(
    prefill: LoadedModel,
    decode: LoadedModel,
    task: Task,
    split: str = "test",
    limit: int | None = None,
    *,
    naive_mix: bool = False,
    engine_config: EngineConfig | None = None,
    chunk: int = 256,
    keep_samples: int = 8,
    max_new_tokens: int | None = None,
) -> EvalResult:
    examples = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    if naive_mix:
        prefill = as_naive_mix(prefill, decode)
    sampling = SamplingParams(max_tokens=max_new_tokens or task.max_new_tokens, temperature=0.0)
    prompts = [prompt_token_ids(decode.tokenizer, e) for e in examples]
    if engine_config is None:
        # KV for a full decode batch of the longest request, not more (the default pools are sized for serving).
        longest = min(max(map(len, prompts)) + sampling.max_tokens + 1, decode.config.max_position_embeddings)
        need = 64 * longest * decode.config.kv_bytes_per_token(decode.dtype)
        engine_config = EngineConfig(
            kv_cache_bytes=min(need, 1 << 30), max_num_seqs=64, max_model_len=longest
        )
    engine = LocalSUN(decode, {"task": prefill}, engine_config)
    t0 = time.perf_counter()
    texts: list[str] = []
    for i in range(0, len(prompts), chunk):
        texts += [c.text for c in engine.generate(prompts[i : i + chunk], sampling, model="task")]
    ok = task.score_many(examples, texts)
    wall = time.perf_counter() - t0
    samples = [
        {"prompt": e.prompt, "reference": e.response, "completion": t, "correct": c}
        for e, t, c in list(zip(examples, texts, ok))[:keep_samples]
    ]
    return EvalResult(
        task=task.name,
        split=split,
        n=len(examples),
        correct=sum(ok),
        prefill_module=str(prefill.path or "(in memory)"),
        decode_module=str(decode.path or "(in memory)"),
        fingerprint=decode.fingerprint.digest,
        naive_mix=naive_mix,
        wall_s=round(wall, 2),
        samples=samples,
    )


def markdown_table(results: list[EvalResult]) -> str:
    lines = [
        "| task | split | prefill module | decode module | n | accuracy |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        mix = " (naive mix)" if r.naive_mix else ""
        lines.append(
            f"| {r.task} | {r.split} | `{r.prefill_module}`{mix} | `{r.decode_module}` | {r.n} | {r.accuracy:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    results: list[EvalResult], json_path: str | Path | None, md_path: str | Path | None
) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown_table(results))
