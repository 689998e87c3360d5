"""The serving layer on a local Ray cluster, over HTTP with the official `openai` client: the OpenAI API, bad
inputs, a decode worker killed mid-stream, 200 concurrent streams, client disconnects, incompatible modules,
adding a task model, autoscaling the decode pool, prefill and decode on different nodes."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request

import openai
import pytest
import ray
from ray import serve
from serving import (
    ENGINE,
    ON_DECODE_NODE,
    ON_PREFILL_NODE,
    decode_actor,
    router_status,
    running_replicas,
    wait_pools_free,
)
from tiny_models import make_tiny_model_dir, perturbed_copy

from sunray.serve.app import build_app, build_decode_app

pytestmark = pytest.mark.serve
MODELS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    base = make_tiny_model_dir(root, "llama", seed=0, name="base", max_position_embeddings=512)
    tasks = {
        "alpha": str(base),
        "beta": str(perturbed_copy(base, root / "beta", 2e-3, seed=1)),
        "gamma": str(perturbed_copy(base, root / "gamma", 2e-3, seed=2)),
    }
    other = make_tiny_model_dir(root, "llama", seed=7, name="other-base", max_position_embeddings=512)
    return {"base": str(base), "tasks": tasks, "other": str(other)}


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster.url


def app_args(model_dirs, **overrides):
    args = {
        "decode_module": model_dirs["base"],
        "models": [
            {"name": n, "prefill_module": p, "ray_actor_options": ON_PREFILL_NODE}
            for n, p in model_dirs["tasks"].items()
        ],
        "engine": ENGINE,
        "default_max_tokens": 16,
        "max_request_bytes": 64 << 10,
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def server(cluster, model_dirs):
    # This module's decode workers overlap their steps (EngineConfig.overlap_steps, by default on a CUDA decode
    # device only); the other serving modules run the CPU default, plain steps, so both ways are served end to end.
    decode = {
        "decode_module": model_dirs["base"],
        "decode_workers": 2,
        "engine": {**ENGINE, "overlap_steps": True},
        "decode_worker_options": ON_DECODE_NODE,
    }
    serve.run(build_decode_app(decode), name="sunray-decode", route_prefix=None)
    serve.run(build_app(app_args(model_dirs)), name="sunray", route_prefix="/")
    yield cluster
    serve.delete("sunray")
    serve.delete("sunray-decode")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_completions(client):
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)
    r = client.completions.create(
        model="alpha", prompt="hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    again = client.completions.create(
        model="alpha", prompt="hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic through prefill + decode
    chat = client.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0.8,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4


def test_prefill_and_decode_run_on_their_nodes(client, server):
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    prefill = [
        serve.get_deployment_handle(f"Prefill-{m}", app_name="sunray").info.remote().result() for m in MODELS
    ]
    decode = [ray.get(decode_actor(w).info.remote()) for w in router_status(server)["live"]]
    assert len(decode) == 2
    assert all("prefill_node" in nodes[p["node_id"]] for p in prefill)
    assert all("decode_node" in nodes[d["node_id"]] for d in decode)
    assert not {p["node_id"] for p in prefill} & {d["node_id"] for d in decode}
    # A request crosses nodes: prefill on one, KV through the object store, decode on the other.
    r = client.completions.create(
        model="beta", prompt="across nodes", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 6


def test_streaming_chunks_end_with_usage(client):
    stream = client.chat.completions.create(
        model="gamma",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model="gamma",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert streamed == full.choices[0].message.content


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x"', 400),  # malformed JSON
    ("/v1/completions", b'\xff\xfe{"model": "alpha"}', 400),  # invalid UTF-8
    ("/v1/completions", b'["not", "an", "object"]', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": 5}', 400),  # wrong type
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "max_tokens": -1}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "max_tokens": 100000000}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "max_tokens": "many"}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "temperature": 3}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "top_p": 0}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "stop": ["", "a"]}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": ""}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": [1, 2, 999999]}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "' + b"word " * 400 + b'"}', 400),  # over the context
    # prompt + max_tokens > context
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "max_tokens": 300}', 400),
    ("/v1/chat/completions", b'{"model": "alpha", "messages": []}', 400),
    ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"model": "alpha"}', 400),
    # OpenAI parameters the server does not implement are refused, not ignored; their no-op values pass.
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "logprobs": 2}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "presence_penalty": 0.5}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "best_of": 3}', 400),
    (
        "/v1/chat/completions",
        b'{"model": "alpha", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}',
        400,
    ),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "n": 2}', 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "\\ud800"}', 400),  # a lone surrogate
    ("/v1/completions", b'{"model": "alpha", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400),
    ("/v1/completions", b'{"model": "alpha", "prompt": "' + b"x" * (80 << 10) + b'"}', 413),  # over the limit
    ("/v1/nothing", b"{}", 404),
    ("/v1/models", b"{}", 405),
]


def _post(url: str, body: bytes, headers: dict | None = None):
    """(status, parsed JSON body, headers) of a POST, for 2xx and errors alike."""
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS)
def test_bad_inputs_get_openai_errors(server, path, body, status):
    code, body, _ = _post(server + path, body)
    assert code == status, body
    err = body["error"]
    assert err["message"] and err["type"]


@pytest.mark.parametrize(
    "ctype,status",
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/json; charset=utf-8", 200),
        ("", 200),
    ],
)
def test_content_type(server, ctype, status):
    body = b'{"model": "alpha", "prompt": "x", "max_tokens": 2}'
    code, parsed, _ = _post(server + "/v1/completions", body, {"Content-Type": ctype})
    assert code == status, parsed


def test_no_op_values_of_unsupported_parameters_pass(client):
    r = client.completions.create(
        model="alpha", prompt="x", max_tokens=2, presence_penalty=0, logprobs=None, best_of=1, n=1
    )
    assert r.usage.completion_tokens >= 1


def test_echo_returns_the_prompt_first(client):
    kw = dict(model="alpha", prompt="echo me", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(**kw, echo=True).choices[0].text
    assert echoed == "echo me" + plain
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**kw, echo=True, stream=True) if c.choices
    )
    assert streamed == echoed


def test_health_and_models_say_ready(server):
    from serving import get_json

    health = get_json(f"{server}/health")
    assert (
        health["status"] == "ok" and health["models"] == sorted(MODELS) and health["live_decode_workers"] == 2
    )
    assert all(m["ready"] for m in get_json(f"{server}/v1/models")["data"])


def test_a_model_still_loading_gets_503_with_retry_after(server, model_dirs):
    """Its prefill replica cannot start (it asks for a resource no node has): the ingress answers at once, 503
    with Retry-After and code model_loading, and /health says which model is missing."""
    stuck = {
        "name": "stuck",
        "prefill_module": model_dirs["base"],
        "ray_actor_options": {"resources": {"nowhere": 1}},
    }
    args = app_args(model_dirs, models=[stuck])
    serve._run(build_app(args), _blocking=False, name="loading", route_prefix="/loading")
    try:
        deadline = time.monotonic() + 60
        while True:  # until the ingress itself is up
            code, body, headers = _post(
                f"{server}/loading/v1/completions", b'{"model": "stuck", "prompt": "x"}'
            )
            if code != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert code == 503 and body["error"]["code"] == "model_loading" and headers["Retry-After"] == "5", (
            body
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server}/loading/health", timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read())["loading_models"] == ["stuck"]
    finally:
        serve.delete("loading")


def test_api_key_is_required_when_set(server, model_dirs):
    options = {"runtime_env": {"env_vars": {"SUNRAY_TEST_KEY": "s3cret"}}}
    args = app_args(model_dirs, api_key_env="SUNRAY_TEST_KEY", ingress_options=options)
    serve.run(build_app(args), name="keyed", route_prefix="/keyed")
    try:
        url = f"{server}/keyed/v1/completions"
        body = b'{"model": "alpha", "prompt": "x", "max_tokens": 2}'
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            code, parsed, _ = _post(url, body, headers)
            assert code == 401 and parsed["error"]["code"] == "invalid_api_key", (headers, parsed)
        assert _post(url, body, {"Authorization": "Bearer s3cret"})[0] == 200
        keyed = openai.OpenAI(base_url=f"{server}/keyed/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert [m.id for m in keyed.models.list().data] == list(MODELS)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server}/keyed/v1", api_key="nope", max_retries=0).models.list()
        assert urllib.request.urlopen(f"{server}/keyed/health", timeout=10).status == 200  # open, for probes
    finally:
        serve.delete("keyed")


def test_server_keeps_serving_after_bad_inputs(client):
    r = client.completions.create(
        model="gamma", prompt="still here", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3


def test_200_concurrent_streams_complete_or_are_refused(client, server):
    def one(i: int):
        try:
            stream = client.completions.create(
                model=MODELS[i % 3],
                prompt=f"request {i}",
                max_tokens=8 + i % 5,
                temperature=0.7,
                seed=i,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            n = sum(
                1
                for c in stream
                for _ in (c.choices or [])
                if c.choices[0].text or c.choices[0].finish_reason
            )
            return "ok", n
        except openai.APIStatusError as e:
            return e.status_code, 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    outcomes = [r[0] for r in results]
    assert all(o in ("ok", 429, 503) for o in outcomes), outcomes
    assert outcomes.count("ok") >= 150
    status = wait_pools_free(server)
    assert len(status["live"]) == 2
    for w in status["live"]:
        assert status["workers"][w]["kv_blocks_free"] == 512 and status["workers"][w]["queue_depth"] == 0


def test_client_disconnect_frees_kv(client, server):
    stream = client.completions.create(
        model="alpha", prompt="long", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t = time.monotonic()
    status = wait_pools_free(server, timeout_s=5)
    assert all(status["workers"][w]["kv_blocks_free"] == 512 for w in status["live"])
    assert time.monotonic() - t < 2.5  # freed within a second, plus one stats report


def test_adding_a_task_model_keeps_the_decode_pool(client, server, model_dirs, tmp_path):
    before = set(router_status(server)["live"])
    delta = perturbed_copy(model_dirs["base"], tmp_path / "delta", 2e-3, seed=4)
    args = app_args(model_dirs)
    args["models"].append(
        {"name": "delta", "prefill_module": str(delta), "ray_actor_options": ON_PREFILL_NODE}
    )
    serve.run(build_app(args), name="sunray", route_prefix="/")
    r = client.completions.create(
        model="delta", prompt="new model", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 4
    assert set(router_status(server)["live"]) == before  # same decode workers, never restarted


def test_decode_worker_killed_mid_stream(client, server):
    n_streams, max_tokens = 6, 120
    streams = [
        client.completions.create(
            model=MODELS[i % 3],
            prompt=f"survive {i}",
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i in range(n_streams)
    ]
    iters = [iter(s) for s in streams]
    counts = [0] * n_streams
    for i, it in enumerate(iters):  # every stream is running on some decode worker
        next(it)
        counts[i] += 1
    victim = router_status(server)["live"][0]
    ray.kill(decode_actor(victim))
    finishes = []
    for i, it in enumerate(iters):
        for chunk in it:
            if chunk.choices and chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
            if chunk.usage is not None:
                counts[i] = chunk.usage.completion_tokens
    assert finishes == ["length"] * n_streams
    assert counts == [max_tokens] * n_streams
    # The router dropped the dead worker at once; Serve replaces the replica and the new worker registers.
    assert victim not in router_status(server)["live"]
    deadline = time.monotonic() + 60
    while len(router_status(server)["live"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(router_status(server)["live"]) == 2
    r = client.completions.create(
        model="alpha", prompt="after", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3


def test_prefill_module_of_another_base_is_refused(server, model_dirs):
    args = app_args(model_dirs, models=[{"name": "stranger", "prefill_module": model_dirs["other"]}])
    with pytest.raises(RuntimeError, match="Prefill-stranger"):
        serve.run(build_app(args), name="mismatch", route_prefix="/mismatch")
    # `serve status` carries the reason, naming the model and the differing fingerprint component.
    message = serve.status().applications["mismatch"].deployments["Prefill-stranger"].message
    assert "'stranger' was built for base" in message and "weights:" in message, message
    serve.delete("mismatch")


def test_decode_pool_autoscales_on_queue_depth(server, model_dirs):
    """A pool of one worker grows under load: a new worker registers with the router and takes requests, and
    every stream completes. (Scale-down: test_decode_pool_scales_down_by_draining.)"""
    decode = {
        "decode_module": model_dirs["base"],
        "engine": ENGINE,
        "decode_worker_options": ON_DECODE_NODE,
        "decode_autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "initial_replicas": 1,
            "target_ongoing_requests": 2,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 2,
            "policy": {"policy_function": "sunray.serve.autoscaling:decode_queue_depth_policy"},
        },
    }
    serve.run(build_decode_app(decode), name="scale-decode", route_prefix=None)
    args = app_args(model_dirs, decode_app="scale-decode")
    serve.run(build_app(args), name="scale", route_prefix="/scale")
    client = openai.OpenAI(base_url=f"{server}/scale/v1", api_key="unused", max_retries=0, timeout=120)
    router = serve.get_deployment_handle("Router", app_name="scale-decode")
    assert len(router.status.remote().result()["live"]) == 1

    def stream(i: int) -> str | None:
        s = client.completions.create(
            model=MODELS[i % 3],
            prompt=f"load {i}",
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return [c.choices[0].finish_reason for c in s if c.choices and c.choices[0].finish_reason][-1]

    def load(worker: int) -> list[str | None]:  # keep the pool busy until a second worker has taken requests
        done = []
        while not grown.is_set() and time.monotonic() < deadline:
            done.append(stream(worker))
        return done + [stream(worker)]

    grown, deadline = threading.Event(), time.monotonic() + 90
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(load, i) for i in range(8)]
        while not grown.is_set() and time.monotonic() < deadline:
            live = router.status.remote().result()["live"]
            if len(live) == 2 and all(ray.get(decode_actor(w).stats.remote())["tokens"] > 0 for w in live):
                grown.set()
            time.sleep(0.5)
        finishes = [r for f in futures for r in f.result()]
    assert grown.is_set(), "the pool should have grown to a second worker that takes requests"
    assert finishes == ["length"] * len(finishes)
    serve.delete("scale")
    serve.delete("scale-decode")


def _stream_tokens(client, model: str, prompt: str, max_tokens: int) -> tuple[str | None, int | None]:
    """(finish reason, completion tokens) of one streamed completion; an error event raises (openai.APIError)."""
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish, n = None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return finish, n


def test_decode_pool_scales_down_by_draining(cluster, model_dirs):
    """Load grows the pool to two workers; when it drops to a few long streams, Serve stops one replica. Its worker
    drains: the router marks it draining and places nothing there, its running streams finish in full on it (not
    cut off and re-prefilled elsewhere), then it goes; the remaining worker serves new requests and ends with all
    its KV free."""
    decode = {
        "decode_module": model_dirs["base"],
        "engine": {**ENGINE, "max_model_len": 512},
        "decode_worker_options": ON_DECODE_NODE,
        "decode_autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "initial_replicas": 1,
            "target_ongoing_requests": 4,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 3,
            "policy": {"policy_function": "sunray.serve.autoscaling:decode_queue_depth_policy"},
        },
    }
    alpha = {
        "name": "alpha",
        "prefill_module": model_dirs["tasks"]["alpha"],
        "ray_actor_options": ON_PREFILL_NODE,
    }
    # Tail: 4 in flight, at most target_ongoing_requests.
    n_load, n_tail, load_tokens, tail_tokens = (10, 4, 200, 480)
    try:
        serve.run(build_decode_app(decode), name="drain-decode", route_prefix=None)
        serve.run(
            build_app(
                app_args(
                    model_dirs,
                    models=[alpha],
                    decode_app="drain-decode",
                    engine={**ENGINE, "max_model_len": 512},
                )
            ),
            name="drain",
            route_prefix="/drain",
        )
        client = openai.OpenAI(base_url=f"{cluster}/drain/v1", api_key="unused", max_retries=0, timeout=120)
        router = serve.get_deployment_handle("Router", app_name="drain-decode")
        first = router.status.remote().result()["live"]
        assert len(first) == 1

        def run(i: int, stop: threading.Event, max_tokens: int) -> list:
            """Back-to-back streams until `stop` (or the deadline): (max_tokens, the outcome or the exception)."""
            done = []
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    done.append(
                        (max_tokens, _stream_tokens(client, "alpha", f"drain {i} {len(done)}", max_tokens))
                    )
                except Exception as e:
                    done.append((max_tokens, repr(e)))
            return done

        grown, shrunk, deadline = threading.Event(), threading.Event(), time.monotonic() + 90
        with concurrent.futures.ThreadPoolExecutor(max_workers=n_load + n_tail) as pool:
            # 1. Grow: ten streams at a time on a pool sized for four per worker.
            futures = [pool.submit(run, i, grown, load_tokens) for i in range(n_load)]
            while not grown.is_set() and time.monotonic() < deadline:
                live = router.status.remote().result()["live"]
                if len(live) == 2 and all(
                    ray.get(decode_actor(w).stats.remote())["tokens"] > 0 for w in live
                ):
                    grown.set()
                time.sleep(0.3)
            assert grown.is_set(), "the pool should have grown to a second worker that takes requests"
            workers = {w: decode_actor(w) for w in router.status.remote().result()["live"]}
            # 2. Shrink under a light load: four long streams at a time, spread over both workers.
            futures += [pool.submit(run, n_load + i, shrunk, tail_tokens) for i in range(n_tail)]
            victim, seen, placed_while_draining, dead = None, [], [], set()
            while time.monotonic() < deadline and not (
                victim in dead and running_replicas("drain-decode", "DecodePool") == 1
            ):
                status = router.status.remote().result()
                stats = {}
                for w, actor in workers.items():
                    if w not in dead:
                        try:
                            stats[w] = ray.get(actor.stats.remote(), timeout=10)
                        except ray.exceptions.RayActorError:
                            dead.add(w)
                if victim is None:
                    victim = next((w for w, v in status["workers"].items() if v["draining"]), None)
                    if victim is not None:  # the router must place nothing on it from now on
                        placed_while_draining = [router.place.remote("alpha").result()[0] for _ in range(5)]
                        shrunk.set()  # no new streams: those in flight finish while the worker drains
                if victim is not None and victim in stats:
                    seen.append((status["workers"].get(victim), stats[victim]))
                time.sleep(0.1)
            shrunk.set()
            results = [r for f in futures for r in f.result()]
        assert victim is not None, "no decode worker was marked draining: the pool did not scale down"
        survivor = next(w for w in workers if w != victim)
        assert victim in dead and running_replicas("drain-decode", "DecodePool") == 1, (
            f"{victim} should be gone, one replica left"
        )
        # (a) The router stopped placing on the draining worker while it was still alive.
        assert placed_while_draining == [survivor] * 5, placed_while_draining
        assert seen and all(v["draining"] for _, v in seen), seen
        # (b) What it had in flight when it began draining, it finished itself before it went. (Serve chooses the
        # replica to stop; with four streams over two workers it is usually busy, but it may have just gone idle,
        # in which case there is nothing to finish: every stream completing in full, below, is checked either way.)
        in_flight = seen[0][1]["num_running"] + seen[0][1]["num_waiting"]
        print(f"draining worker {victim}: {in_flight} request(s) in flight when it began draining")
        last = seen[-1][1]
        assert (
            last["num_running"] == last["num_waiting"] == 0
            and last["kv_blocks_free"] == last["kv_blocks_total"]
        ), last
        bad = [(n, r) for n, r in results if r != ("length", n)]
        assert not bad, f"{len(bad)} of {len(results)} streams did not complete in full: {bad[:5]}"
        status = router.status.remote().result()
        assert status["live"] == [survivor] and victim not in status["workers"], status
        # (c) The pool of one serves new requests.
        for i in range(3):
            assert _stream_tokens(client, "alpha", f"after {i}", 20) == ("length", 20)
        # (d) ... and ends with every KV block free.
        t = time.monotonic() + 10
        while (s := ray.get(workers[survivor].stats.remote()))[
            "kv_blocks_free"
        ] < 512 and time.monotonic() < t:
            time.sleep(0.2)
        assert (
            s["kv_blocks_free"] == s["kv_blocks_total"] == 512 and s["num_running"] == s["num_waiting"] == 0
        ), s
    finally:
        serve.delete("drain")
        serve.delete("drain-decode")


def test_status_says_where_the_time_to_first_token_goes(client, server):
    from serving import get_json

    get_json(f"{server}/sunray/status?reset_stages=1")
    for i in range(3):
        client.completions.create(model="alpha", prompt=f"stages {i}", max_tokens=2)
    for i in range(3):  # streamed: also the time to the first chunk leaving the ingress
        list(client.completions.create(model="alpha", prompt=f"streamed {i}", max_tokens=2, stream=True))
    status = get_json(f"{server}/sunray/status")
    stages = status["prefill_stages"]
    assert {"ingress", "handle", "queue", "engine", "send", "first_chunk"} <= set(stages), stages
    assert stages["first_chunk"]["n"] == 3 and stages["engine"]["n"] == 6, stages
    assert all(
        s["n"] >= 3 and 0 <= s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
        for k, s in stages.items()
        if k != "handle"
    )
    assert status["prefill_batch_mean"] >= 1
