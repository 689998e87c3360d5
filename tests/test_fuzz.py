"""An HTTP fuzzer against the running server: 1,000 generated bad or odd requests (wrong types, huge or nested
JSON, odd unicode, extreme sampling values, stop lists, long prompts, unknown fields, wrong content types,
oversized bodies) over every route. No answer may be a 5xx, a streamed answer ends with `[DONE]` and never with a
server error, the server still serves afterwards, and its processes' memory does not grow.

Limits the fuzzer meets (docs/architecture.md, "Limits"): the body at most `max_request_bytes` (413 beyond),
JSON nested at most ~1000 deep (400 beyond), a prompt within the context (400), `max_tokens` within what is left of
the context (400), at most 16 stop strings, `n` 1, the sampling ranges of SamplingParams (400 outside them).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from serving import ENGINE, ON_DECODE_NODE, ON_PREFILL_NODE, decode_actor, replica_actors, router_status
from tiny_models import make_tiny_model_dir

from sunray.serve.app import build_app, build_decode_app

pytestmark = pytest.mark.serve
APP, DECODE_APP, ROUTE = "fuzz", "fuzz-decode", "/fuzz"
MODELS = ("alpha", "beta")
BODY_LIMIT = 32 << 10
EXAMPLES = 1000


@pytest.fixture(scope="module")
def url(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-models")
    base = str(make_tiny_model_dir(root, "llama", seed=0, name="base", max_position_embeddings=512))
    decode = {
        "decode_module": base,
        "decode_workers": 1,
        "engine": ENGINE,
        "decode_worker_options": ON_DECODE_NODE,
    }
    serve.run(build_decode_app(decode), name=DECODE_APP, route_prefix=None)
    models = [{"name": n, "prefill_module": base, "ray_actor_options": ON_PREFILL_NODE} for n in MODELS]
    args = {
        "decode_module": base,
        "decode_app": DECODE_APP,
        "models": models,
        "engine": ENGINE,
        "default_max_tokens": 8,
        "max_request_bytes": BODY_LIMIT,
        "ingress_options": ON_PREFILL_NODE,
    }
    serve.run(build_app(args), name=APP, route_prefix=ROUTE)
    yield f"{ray_cluster.url}{ROUTE}"
    serve.delete(APP)
    serve.delete(DECODE_APP)


# -- what the fuzzer sends ----------------------------------------------------------------------------------------
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),  # any code point UTF-8 can carry
    st.sampled_from(
        ["", " ", "\x00", "\u202e", "\ufeff", "🦙" * 50, "a\u0301" * 30, "\r\n" * 20, "<|endofturn|>"]
    ),
    st.text(alphabet="ab ", min_size=500, max_size=3000),  # long prompts, some over the context
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
small_ints = st.one_of(
    st.integers(min_value=-3, max_value=300), st.sampled_from([0, 1, 2**31, 2**63, -(2**63)])
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), small_ints, st.sampled_from([0, 1, 2, 1e-9])
)
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard", ""]) | json_scalars},
            optional={"content": odd_text | json_values | st.just([{"type": "text", "text": "hi"}])},
        ),
        max_size=4,
    )
    | json_values
)
fields = {  # each field: plausible values mixed with wrong types and extremes
    "model": st.sampled_from(MODELS) | json_scalars,
    "prompt": odd_text | st.lists(st.integers(min_value=-5, max_value=300), max_size=20) | json_values,
    "messages": messages,
    "max_tokens": small_ints | numbers | json_scalars,
    "max_completion_tokens": small_ints | json_scalars,
    "temperature": numbers | json_scalars,
    "top_p": numbers,
    "top_k": small_ints | numbers,
    "seed": small_ints | numbers,
    "stop": odd_text | st.lists(odd_text, max_size=20) | json_values,
    "stream": st.booleans() | json_scalars,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_scalars}) | json_values,
    "n": small_ints,
    "ignore_eos": st.booleans() | json_scalars,
    "echo": st.booleans() | json_scalars,
    "logprobs": st.none() | st.booleans() | small_ints,
    "presence_penalty": numbers,
    "tools": json_values,
    "user": odd_text,
}
unknown_fields = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda k: k not in fields), json_values, max_size=3
)


@st.composite
def requests(draw):
    """(path, body bytes, content type)."""
    path = draw(
        st.sampled_from(["/v1/completions", "/v1/chat/completions"] * 4 + ["/v1/models", "/v1/x", "/"])
    )
    shape = draw(st.sampled_from(["near_valid"] * 4 + ["fields"] * 3 + ["json", "bytes", "nested", "huge"]))
    if shape == "near_valid":  # a valid request with up to two fields fuzzed: reaches the engines
        chat = path.endswith("chat/completions")
        text = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60))
        body = {"model": draw(st.sampled_from(MODELS)), "max_tokens": draw(st.integers(1, 8))}
        body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        for k in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=2)):
            body[k] = draw(fields[k])
        raw = json.dumps(body, allow_nan=True).encode()
    elif shape == "fields":
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=8))
        body = {k: draw(fields[k]) for k in chosen} | draw(unknown_fields)
        raw = json.dumps(body, allow_nan=True).encode()
    elif shape == "json":
        raw = json.dumps(draw(json_values), allow_nan=True).encode()
    elif shape == "bytes":
        raw = draw(st.binary(max_size=300))
    elif shape == "nested":
        depth = draw(st.integers(min_value=500, max_value=5000))
        raw = b'{"model": "alpha", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    else:  # oversized: over the body limit
        raw = b'{"model": "alpha", "prompt": "' + b"x" * draw(st.integers(BODY_LIMIT, 2 * BODY_LIMIT)) + b'"}'
    ctype = draw(
        st.sampled_from(["application/json"] * 6 + ["", "text/plain", "multipart/form-data", "a/b+json"])
    )
    return path, raw, ctype


def _send(url: str, path: str, raw: bytes, ctype: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url + path, data=raw, method="POST", headers={"Content-Type": ctype} if ctype else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _server_pids(url: str) -> dict[str, int]:
    pids = {"decode": ray.get(decode_actor(router_status(url)["live"][0]).info.remote())["pid"]}
    for deployment in ("Ingress", "Prefill-alpha"):
        (actor,) = replica_actors(APP, deployment)
        pids[deployment] = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    return pids


def test_fuzz_no_5xx_and_still_serving(url):
    seen: dict[int, int] = {}
    memory: list[dict[str, float]] = []
    pids = _server_pids(url)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(request):
        path, raw, ctype = request
        status, body = _send(url, path, raw, ctype)
        seen[status] = seen.get(status, 0) + 1
        if sum(seen.values()) in (EXAMPLES // 4, EXAMPLES):
            memory.append({k: _rss_mb(p) for k, p in pids.items()})
        assert status < 500, (status, path, raw[:300], body[:300])
        if status == 200 and body.startswith(b"data:"):
            events = [e for e in body.decode().split("\n\n") if e]
            assert events[-1] == "data: [DONE]", events[-3:]
            assert b'"server_error"' not in body, body[-500:]
        elif status != 200 or path.endswith("completions"):
            parsed = json.loads(body)
            assert (
                ("error" in parsed and parsed["error"]["message"]) if status >= 400 else "choices" in parsed
            )

    one()
    print(
        f"\nFUZZ {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}; memory (MB) {memory}"
    )
    assert sum(seen.values()) >= EXAMPLES and seen.get(200, 0) > 0
    # Still serving: a plain request completes.
    status, body = _send(
        url, "/v1/completions", b'{"model": "alpha", "prompt": "ok", "max_tokens": 3}', "application/json"
    )
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
    # Memory flat: between the first quarter of the run and its end, no process grew by more than 64 MB.
    early, late = memory
    grown = {k: round(late[k] - early[k], 1) for k in early}
    assert all(g < 64 for g in grown.values()), grown
