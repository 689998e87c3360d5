"""The ingress's `stream_interval`: tokens per SSE chunk at most, the first token at once, nothing lost (also when
the request fails midway). Runs the ingress's SSE generator over a stubbed `_generate`, without Ray."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from sunray.engine.sequence import RequestOutput
from sunray.serve.ingress import Ingress
from sunray.serve.metrics import RecentTimes
from sunray.serve.openai_protocol import APIError

WORDS = [f" w{i}" for i in range(10)]


def _ingress(interval: int, fail_after: int | None = None):
    """What Ingress._sse reads of its replica (a stand-in: Serve's ingress class is not built outside Serve)."""
    ing = SimpleNamespace(args=SimpleNamespace(stream_interval=interval), prefill_stages=RecentTimes())
    ing.stream_events = ing.stream_tokens = 0

    async def generate(rid, model, ids, sampling, received):
        for i, word in enumerate(WORDS):
            if fail_after is not None and i == fail_after:
                raise APIError(503, "the decode worker went away")
            last = i == len(WORDS) - 1
            yield RequestOutput(rid, model, [i], word, last, "length" if last else None, 3, i + 1)

    ing._generate = generate
    return ing


def _events(ing, chat: bool = False) -> list:
    async def collect():
        return [e async for e in Ingress.func_or_class._sse(ing, "cmpl-1", "m", [1, 2, 3], None, chat, True)]

    raw = asyncio.run(collect())
    assert raw[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in raw[:-1]]


def _texts(events, chat=False) -> list[str]:
    key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
    return [key(e["choices"][0]) for e in events if "choices" in e and e["choices"]]


@pytest.mark.parametrize("interval", [1, 3, 4, 100])
@pytest.mark.parametrize("chat", [False, True])
def test_chunks_carry_at_most_the_interval_and_the_text_is_whole(interval, chat):
    events = _events(_ingress(interval), chat)
    texts = [t for t in _texts(events, chat) if t]
    assert "".join(texts) == "".join(WORDS)
    assert texts[0] == WORDS[0]  # the first token goes at once: TTFT does not wait for a chunk
    assert all(len(t.split()) <= interval for t in texts)
    assert len(texts) == 1 + -(-(len(WORDS) - 1) // interval)
    finish = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == len(WORDS)


def test_a_failure_midway_sends_the_held_text_before_the_error():
    events = _events(_ingress(4, fail_after=6))
    assert "".join(_texts(events)) == "".join(WORDS[:6])  # generated before the failure: nothing lost
    assert events[-1]["error"]["message"] == "the decode worker went away"
