"""Bursts on `make serve`'s own config (deployments/default.yaml: the embedded SmolLM2 as the shared decode module on
two CPU decode workers, three LoRA-SUN task models), through `sunray prepare` as `make serve` runs it: 40, 100 and
200 concurrent requests with the official AsyncOpenAI client (max_tokens 8, as the report of issue 12 sent them),
chat and completions, streaming and not, spread over the three models. Every request must complete or be refused
with 429/503 carrying Retry-After and an OpenAI error body; nothing else.

Only the training steps are cut (2 instead of 24-32, so the modules train in seconds): the modules are real
LoRA-SUN adapters, served by the same deployments, engine settings and placement as `make serve`.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import openai
import pytest
import yaml
from ray import serve

from sunray.cli import prepare
from sunray.serve.app import build_app, build_decode_app

pytestmark = [pytest.mark.serve, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
KINDS = ("chat", "chat-stream", "completion", "completion-stream")


@pytest.fixture(scope="module")
def default_server(ray_cluster, tmp_path_factory):
    config = yaml.safe_load((REPO / "deployments" / "default.yaml").read_text())
    decode_app, app = config["applications"]
    for model in app["args"]["models"]:
        model["prefill_module"]["train"].update(
            steps=2, batch_size=2, warmup_steps=0, num_train=16, val_examples=2
        )
    tmp = tmp_path_factory.mktemp("burst")
    (tmp / "default.yaml").write_text(yaml.safe_dump(config))
    prepared = yaml.safe_load(prepare(tmp / "default.yaml", tmp / "prepared.yaml", threads=2).read_text())
    decode_app, app = prepared["applications"]
    app["args"]["decode_app"] = "burst-decode"
    serve.run(build_decode_app(decode_app["args"]), name="burst-decode", route_prefix=None)
    serve.run(build_app(app["args"]), name="burst", route_prefix="/burst")
    yield f"{ray_cluster.url}/burst", [m["name"] for m in app["args"]["models"]]
    serve.delete("burst")
    serve.delete("burst-decode")


async def _one(client: openai.AsyncOpenAI, model: str, kind: str, i: int) -> str:
    messages = [{"role": "user", "content": f"Request {i}: say something short."}]
    try:
        if kind.startswith("chat"):
            r = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=8, stream=kind.endswith("stream")
            )
        else:
            r = await client.completions.create(
                model=model, prompt=f"def f{i}(x):", max_tokens=8, stream=kind.endswith("stream")
            )
        if kind.endswith("stream"):
            finishes = [
                c.choices[0].finish_reason async for c in r if c.choices and c.choices[0].finish_reason
            ]
            return "ok" if len(finishes) == 1 else f"stream ended without one finish reason: {finishes}"
        return (
            "ok"
            if r.choices[0].finish_reason in ("stop", "length")
            else f"finish {r.choices[0].finish_reason}"
        )
    except openai.APIStatusError as e:
        refused = e.status_code in (429, 503) and e.response.headers.get("retry-after") and e.body
        return f"refused {e.status_code}" if refused else f"status {e.status_code}: {e.message[:200]}"
    except Exception as e:  # connection errors, timeouts, error events in a stream
        return f"{type(e).__name__}: {str(e)[:200]}"


@pytest.mark.parametrize("n", [40, 100, 200])
def test_burst_on_the_default_config(default_server, n):
    url, models = default_server

    async def burst():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(_one(client, models[i % 3], KINDS[i // 3 % 4], i) for i in range(n)))

    outcomes = collections.Counter(asyncio.run(burst()))
    print(f"\nBURST {n}: {dict(outcomes)}")
    bad = {k: v for k, v in outcomes.items() if k != "ok" and not k.startswith("refused")}
    assert not bad, bad
    assert outcomes["ok"] >= n // 2  # refusals are allowed, a server that only refuses is not
