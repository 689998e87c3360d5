"""Helpers of the tests that run Serve on a local Ray cluster (the `ray_cluster` fixture of conftest.py): one
cluster per test session, each test module deploying its own applications under its own names and routes."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request

import ray
from ray import serve

# Tiny-model engine settings of every serving test: 512 blocks of 8 tokens per worker, contexts up to 256.
ENGINE = {"num_kv_blocks": 512, "block_size": 8, "max_num_seqs": 64, "max_model_len": 256}
ON_PREFILL_NODE = {"num_cpus": 0, "resources": {"prefill_node": 1}}
ON_DECODE_NODE = {"num_cpus": 0, "resources": {"decode_node": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RayCluster:
    """The session's cluster: the head (Serve's controller and proxy, ingress and prefill replicas, resource
    `prefill_node`) and one node marked `decode_node`, so KV crosses nodes as on a real cluster. Tests may add and
    remove nodes of their own (`cluster.add_node`, `cluster.remove_node`)."""

    cluster: object  # ray.cluster_utils.Cluster
    url: str  # Serve's HTTP proxy, http://127.0.0.1:<port>


def start_cluster() -> RayCluster:
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "the serving tests start (and stop) their own cluster"
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 8, "include_dashboard": False, "resources": {"prefill_node": 100}},
    )
    c.add_node(num_cpus=4, resources={"decode_node": 100})
    ray.init(address=c.address, log_to_driver=False, namespace="sunray-tests")
    port = free_port()
    # One proxy, on the head. Serve's default puts one on every node, and here every node is this machine: the
    # proxies share the port (SO_REUSEPORT), so the kernel spreads connections over them and a test that removes a
    # node would also cut the connections its proxy happened to carry (that is the ingress-kill case, not a node
    # of decode workers going away).
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    return RayCluster(c, f"http://127.0.0.1:{port}")


def stop_cluster(rc: RayCluster) -> None:
    serve.shutdown()
    ray.shutdown()
    rc.cluster.shutdown()


def get_json(url: str, timeout: float = 10.0, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def router_status(base_url: str) -> dict:
    return get_json(f"{base_url}/sunray/status")["router"]


def wait_pools_free(
    base_url: str, timeout_s: float = 10.0, blocks: int = 512, live: int | None = None
) -> dict:
    """Until every live worker reports an empty queue and all KV blocks free (reports come every 0.25 s), and, if
    given, `live` workers are registered; returns the last status either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = router_status(base_url)
        except (urllib.error.URLError, OSError):  # the ingress or router restarting
            status = {"live": [], "workers": {}}
        workers = [status["workers"][w] for w in status["live"]]
        free = all(w["queue_depth"] == 0 and w["kv_blocks_free"] == blocks for w in workers)
        if (free and (live is None or len(workers) == live)) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def decode_actor(worker_id: str):
    """The DecodeWorker actor behind a decode worker id of the router's status."""
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"] == f"sunray-{worker_id}":
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no actor for {worker_id}")


def replica_actors(app: str, deployment: str) -> list:
    """The live replica actors of a Serve deployment (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def running_replicas(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)
