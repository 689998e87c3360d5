"""The fault matrix over HTTP on a local Ray cluster: with streams in flight, kill a decode worker, a prefill
replica, the router replica, an ingress replica, or a whole node hosting a decode worker. For each fault:

- no request hangs past BOUND_S (each client has that timeout and every outcome is timed);
- each stream ends complete (finish_reason "length", every token) or with a clear error (an error event or a
  failed connection); none ends early as if it had finished;
- afterwards every live decode worker has all its KV blocks free and an empty queue;
- the system serves again within RECOVER_S of the fault.

The counts of every run are printed (pytest -s) and quoted in the closing note of issue 12.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import openai
import pytest
import ray
from ray import serve
from serving import ENGINE, ON_PREFILL_NODE, decode_actor, replica_actors, router_status, wait_pools_free
from tiny_models import make_tiny_model_dir, perturbed_copy

from sunray.serve.app import build_app, build_decode_app

pytestmark = pytest.mark.serve
APP, DECODE_APP, ROUTE = "faults", "faults-decode", "/faults"
MODELS = ("alpha", "beta")
BOUND_S = 90.0  # no request may take longer than this, whatever fails
RECOVER_S = 60.0  # after a fault, a new request succeeds within this
MAX_TOKENS = 60
SLOT = {"num_cpus": 0, "resources": {"fault_slot": 1}}  # one decode worker per node that has a slot


@dataclasses.dataclass
class Outcome:
    kind: str  # complete | error | truncated
    tokens: int
    seconds: float
    detail: str = ""


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory):
    """Two decode workers, one on each of two nodes of their own (so one node can be killed), and a task-model
    application with two models whose prefill replicas live on the head."""
    root = tmp_path_factory.mktemp("fault-models")
    base = make_tiny_model_dir(root, "llama", seed=0, name="base", max_position_embeddings=512)
    tasks = {"alpha": str(base), "beta": str(perturbed_copy(base, root / "beta", 2e-3, seed=1))}
    nodes = [ray_cluster.cluster.add_node(num_cpus=2, resources={"fault_slot": 1}) for _ in range(2)]
    ray_cluster.cluster.wait_for_nodes()
    decode = {
        "decode_module": str(base),
        "decode_workers": 2,
        "engine": ENGINE,
        "decode_worker_options": SLOT,  # each worker and its pool replica on one fault node
        "router_options": ON_PREFILL_NODE,  # on the head: the node and hung-worker tests leave it alone
    }
    serve.run(build_decode_app(decode), name=DECODE_APP, route_prefix=None)
    models = [
        {"name": n, "prefill_module": p, "ray_actor_options": ON_PREFILL_NODE} for n, p in tasks.items()
    ]
    args = {
        "decode_module": str(base),
        "decode_app": DECODE_APP,
        "models": models,
        "engine": ENGINE,
        "default_max_tokens": 16,
        "decode_stall_timeout_s": 10,
        "ingress_options": ON_PREFILL_NODE,  # on the head: the node test kills a node of decode workers only
        "prefill_timeout_s": 60,
    }
    serve.run(build_app(args), name=APP, route_prefix=ROUTE)
    url = f"{ray_cluster.url}{ROUTE}"
    yield {"url": url, "cluster": ray_cluster.cluster, "nodes": nodes}
    serve.delete(APP)
    serve.delete(DECODE_APP)
    for node in nodes:
        if node in ray_cluster.cluster.worker_nodes:
            ray_cluster.cluster.remove_node(node)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=BOUND_S)


def _stream(client: openai.OpenAI, i: int, started: threading.Barrier | None) -> Outcome:
    t0, tokens, finish = time.monotonic(), 0, None
    try:
        stream = client.completions.create(
            model=MODELS[i % len(MODELS)],
            prompt=f"fault {i}",
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for n, chunk in enumerate(stream):
            if n == 0 and started is not None:
                started.wait(timeout=BOUND_S)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # an error event (openai.APIError) or a broken connection: a clear error
        return Outcome("error", tokens, time.monotonic() - t0, f"{type(e).__name__}: {str(e)[:120]}")
    kind = "complete" if finish == "length" and tokens == MAX_TOKENS else "truncated"
    return Outcome(kind, tokens, time.monotonic() - t0, f"finish={finish}")


def _run_with_fault(url: str, fault, n: int = 8) -> tuple[list[Outcome], float]:
    """`n` streams; once each has its first chunk, `fault()` runs; returns the outcomes and when the fault hit."""
    client = _client(url)
    started = threading.Barrier(n + 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(_stream, client, i, started) for i in range(n)]
        started.wait(timeout=BOUND_S)
        fault()
        hit = time.monotonic()
        outcomes = [f.result(timeout=BOUND_S + 30) for f in futures]
    return outcomes, hit


def _serves_again(url: str, since: float) -> float:
    """Seconds from `since` until a fresh request completes in full (fails the test after RECOVER_S)."""
    client = _client(url)
    while True:
        o = _stream(client, 0, None)
        if o.kind == "complete":
            return time.monotonic() - since
        assert time.monotonic() - since < RECOVER_S, f"the system did not serve again in time: {o}"
        time.sleep(0.5)


def _check(name: str, url: str, outcomes: list[Outcome], hit: float, live: int = 2) -> dict:
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("complete", "error", "truncated")}
    slowest = max(o.seconds for o in outcomes)
    recovered = _serves_again(url, hit)
    status = wait_pools_free(url, timeout_s=RECOVER_S, live=live)
    report = {"fault": name, **counts, "slowest_s": round(slowest, 1), "serves_again_s": round(recovered, 1)}
    print(f"\nFAULT {report} errors: {[o.detail for o in outcomes if o.kind == 'error'][:3]}")
    assert counts["truncated"] == 0, [o for o in outcomes if o.kind == "truncated"]
    assert slowest < BOUND_S
    workers = [status["workers"][w] for w in status["live"]]
    assert len(workers) == live, status
    assert all(w["kv_blocks_free"] == 512 and w["queue_depth"] == 0 for w in workers), status
    return counts


def test_decode_worker_killed(deployed):
    url = deployed["url"]
    victim = router_status(url)["live"][0]
    outcomes, hit = _run_with_fault(url, lambda: ray.kill(decode_actor(victim)))
    counts = _check("decode worker", url, outcomes, hit)
    assert counts["complete"] == len(outcomes)  # re-prefilled onto the other worker, every token delivered


def test_prefill_replica_killed(deployed):
    url = deployed["url"]

    def kill():
        for actor in replica_actors(APP, "Prefill-alpha"):
            ray.kill(actor, no_restart=False)

    outcomes, hit = _run_with_fault(url, kill)
    counts = _check("prefill replica", url, outcomes, hit)
    # Streams past their prefill go on decoding; none is lost with the replica.
    assert counts["complete"] == len(outcomes)


def test_prefill_replica_killed_during_prefill(deployed):
    """A burst still waiting for its prefill when the replica dies: retried once Serve has replaced it."""
    url = deployed["url"]
    client = _client(url)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(_stream, client, 2 * i, None) for i in range(16)]  # all on alpha
        time.sleep(0.05)
        for actor in replica_actors(APP, "Prefill-alpha"):
            ray.kill(actor, no_restart=False)
        hit = time.monotonic()
        outcomes = [f.result(timeout=BOUND_S + 30) for f in futures]
    counts = _check("prefill replica (during prefill)", url, outcomes, hit)
    assert counts["complete"] == len(outcomes)


def test_router_replica_killed(deployed):
    url = deployed["url"]

    def kill():
        for actor in replica_actors(DECODE_APP, "Router"):
            ray.kill(actor, no_restart=False)

    outcomes, hit = _run_with_fault(url, kill)
    counts = _check("router replica", url, outcomes, hit)
    assert counts["complete"] == len(outcomes)  # the router is not on the token path


def test_ingress_replica_killed(deployed):
    """The streams it carried end with an error (their connection breaks); the decode workers free their KV, and
    Serve's new ingress replica serves."""
    url = deployed["url"]

    def kill():
        for actor in replica_actors(APP, "Ingress"):
            ray.kill(actor, no_restart=False)

    outcomes, hit = _run_with_fault(url, kill)
    _check("ingress replica", url, outcomes, hit)


def test_decode_node_killed(deployed):
    """The node of one decode worker goes away: its streams re-prefill onto the other worker; when a node with a
    free slot joins again, the pool is back to two workers."""
    url, cluster = deployed["url"], deployed["cluster"]
    victim, survivor = router_status(url)["live"]
    node_id = ray.get(decode_actor(victim).info.remote())["node_id"]
    node = next(n for n in deployed["nodes"] if n.node_id == node_id)
    outcomes, hit = _run_with_fault(url, lambda: cluster.remove_node(node))
    counts = _check("decode node", url, outcomes, hit, live=1)
    assert counts["complete"] == len(outcomes)
    # only the node's own worker went: the other one (and the pool replica owning it) lives elsewhere
    assert router_status(url)["live"] == [survivor]
    deployed["nodes"].append(cluster.add_node(num_cpus=2, resources={"fault_slot": 1}))
    status = wait_pools_free(url, timeout_s=RECOVER_S, live=2)
    assert len(status["live"]) == 2, status


def test_hung_decode_worker(deployed):
    """A worker that stops dead (SIGSTOP: alive to Ray, silent to everyone): its streams are failed by the
    ingress's stall watchdog after decode_stall_timeout_s (10 s here) and re-prefilled onto the other worker; when
    it resumes, it reports to the router again and serves."""
    import os
    import signal

    url = deployed["url"]
    victim = router_status(url)["live"][0]
    pid = ray.get(decode_actor(victim).info.remote())["pid"]
    try:
        outcomes, hit = _run_with_fault(url, lambda: os.kill(pid, signal.SIGSTOP))
        assert all(o.kind == "complete" for o in outcomes), outcomes
        # the stall bound (10 s, checked every 2.5 s), plus the re-prefill and decode; and, seen in some runs, the
        # router going silent at the same moment until Serve replaces it (three missed 1 s checks of 5 s each)
        assert max(o.seconds for o in outcomes) < 10 + 2.5 + 18
    finally:
        os.kill(pid, signal.SIGCONT)
    _check("hung decode worker", url, outcomes, hit)
