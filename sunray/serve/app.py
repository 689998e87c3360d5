"""Application builders for `serve run`. A sunray deployment is two Serve applications:

- the decode application (`build_decode_app`): the central Router and the DecodePool of shared decode workers;
- the task-model application (`build_app`): the OpenAI Ingress and one Prefill-<model> deployment per task model,
  finding the router by the decode application's name.

Kept apart so that adding or changing a task model redeploys only the second one: Serve restarts every deployment
of an application whose arguments change, and the decode workers must keep running.

Serving loads modules and never trains them: a config whose task models are training recipes (`prefill_module:
{train: {...}}`) goes through `sunray prepare` first, which trains each once (cached) and writes the prepared
config with their directories (`make serve` does both).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from sunray.models.loader import DEFAULT_ALIASES, ensure_default_model
from sunray.serve.config import AppArgs, DecodeAppArgs, DecodeArgs
from sunray.serve.decode_worker import DecodePool
from sunray.serve.ingress import Ingress
from sunray.serve.prefill import PrefillServer
from sunray.serve.router_deployment import Router


def _prepare_default(args: DecodeArgs, specs: set[str]) -> None:
    """Convert the embedded GGUF once here, in `serve run`'s process, not in every replica at the same time."""
    if (args.tokenizer if args.dummy_shape else None) in DEFAULT_ALIASES or specs & set(DEFAULT_ALIASES):
        ensure_default_model()


def build_decode_app(args: dict[str, Any]) -> Application:
    """Router + DecodePool. No HTTP route: give it `route_prefix: null` in the config."""
    a = DecodeAppArgs.model_validate(args)
    _prepare_default(a, set() if a.dummy_shape else {a.decode_module})
    router = Router
    if a.router_options:
        router = Router.options(ray_actor_options={"num_cpus": 0, **a.router_options})
    router = router.bind(a.router_policy, a.models, a.partition)
    pool: dict[str, Any] = (
        {"autoscaling_config": a.decode_autoscaling_config}
        if a.decode_autoscaling_config
        else {"num_replicas": a.decode_workers}
    )
    # A pool replica owns its worker actor, and an actor dies with its owner: the two go on one node (the worker in
    # the replica's placement group), so that a node going away takes only its own workers. A worker that needs
    # no resources is pinned to its replica's node instead (DecodePool).
    bundle = a.worker_bundle()
    if bundle:
        pool |= {"placement_group_bundles": [bundle], "placement_group_strategy": "STRICT_PACK"}
    return DecodePool.options(**pool).bind(a.decode_args(), router)


def build_app(args: dict[str, Any]) -> Application:
    """Ingress -> Prefill-<model> (one deployment per task model); decode goes to the decode application."""
    a = AppArgs.model_validate(args)
    _prepare_default(a, set() if a.dummy_shape else {a.decode_module, *(m.prefill_module for m in a.models)})
    loading = a.decode_args()
    prefill = {}
    for m in a.models:
        opts: dict[str, Any] = {"name": f"Prefill-{m.name}", "ray_actor_options": m.ray_actor_options}
        if m.autoscaling_config:
            opts["autoscaling_config"] = m.autoscaling_config
        else:
            opts["num_replicas"] = m.num_replicas
        prefill[m.name] = PrefillServer.options(**opts).bind(m.name, m.prefill_module, loading, a.decode_app)
    ingress = {"max_ongoing_requests": a.max_ongoing_requests * 2, "num_replicas": a.ingress_replicas}
    if a.ingress_options:
        ingress["ray_actor_options"] = {"num_cpus": 0, **a.ingress_options}
    return Ingress.options(**ingress).bind(a.model_dump(), prefill)
