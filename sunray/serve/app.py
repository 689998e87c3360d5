"""Application builders for `serve run`: `sunray.serve.app:build_app` with the YAML's `args`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from sunray.models.loader import DEFAULT_ALIASES, ensure_default_model
from sunray.serve.config import AppArgs
from sunray.serve.decode_worker import DecodePool
from sunray.serve.ingress import Ingress
from sunray.serve.prefill import PrefillServer
from sunray.serve.router_deployment import Router


def build_app(args: dict[str, Any]) -> Application:
    """Ingress -> Prefill-<model> (one deployment per task model) -> Router -> DecodePool (shared decode workers)."""
    a = AppArgs.model_validate(args)
    plain = a.model_dump()
    specs = {a.decode_module, *(m.prefill_module for m in a.models)} if not a.dummy_shape else {a.tokenizer}
    if specs & set(DEFAULT_ALIASES):
        ensure_default_model()  # convert the embedded GGUF once here, not in every replica at the same time
    router = Router.bind(a.router_policy, [m.name for m in a.models], a.partition)
    pool = DecodePool.options(num_replicas=a.decode_workers).bind(plain, router)
    prefill = {}
    for m in a.models:
        opts: dict[str, Any] = {"name": f"Prefill-{m.name}", "ray_actor_options": m.ray_actor_options}
        if m.autoscaling_config:
            opts["autoscaling_config"] = m.autoscaling_config
        else:
            opts["num_replicas"] = m.num_replicas
        prefill[m.name] = PrefillServer.options(**opts).bind(m.name, m.prefill_module, plain, router)
    return Ingress.options(max_ongoing_requests=a.max_ongoing_requests * 2).bind(plain, prefill, router, pool)
