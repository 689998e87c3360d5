"""A small fake OpenAI-compatible server (aiohttp) for tests and dry runs of the load generator.

It streams `max_tokens` tokens (capped) with a fixed first-token delay and a fixed delay between tokens, answers
HTTP 429 to every `refuse_every`-th request, 500 to every `error_every`-th, and 400 to a bad request (unknown
model, missing prompt, bad max_tokens). Binds 127.0.0.1 by default.

**Capacity model** (`step_base_ms` or `step_per_seq_ms` > 0): instead of a fixed delay between tokens, one
continuous-batching "engine" serves every stream. Each step takes `step_base_ms + step_per_seq_ms x running`
and gives every running request its next token; a request's first token comes `ttft_s` after it arrives (its
"prefill"), then it joins the batch at the next step boundary (at most `max_batch` running; the others wait).
TPOT therefore grows with concurrency as a batch-size-dependent step time does, so a server of known capacity
exists for testing `loadgen capacity`: with n output tokens and arrivals at rate L, the batch is B = L (n - 1)
TPOT and TPOT = base / (1 - L (n - 1) per_seq), so TPOT <= S holds up to L* = (1 - base / S) / ((n - 1) per_seq)
(constant arrivals; Poisson ones fluctuate around it).

    python -m loadgen fake-server --port 8100 --ttft-ms 20 --tpot-ms 5
    python -m loadgen fake-server --port 8100 --ttft-ms 10 --step-base-ms 5 --step-per-seq-ms 1
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import time

from aiohttp import web

STATS = web.AppKey("stats", dict)  # counts of requests, refused (429), bad (400), streamed


@dataclasses.dataclass
class FakeConfig:
    models: tuple[str, ...] = ("model-0", "model-1", "model-2")
    ttft_s: float = 0.02
    tpot_s: float = 0.005
    max_tokens_cap: int = 64
    refuse_every: int = 0  # 0: never; k: requests number k, 2k, ... (1-based) get 429
    error_every: int = 0  # likewise, HTTP 500 (a failure that is not a refusal)
    step_base_ms: float = 0.0  # capacity model (module docstring): > 0 or step_per_seq_ms > 0 turns it on
    step_per_seq_ms: float = 0.0
    max_batch: int = 0  # capacity model: at most this many running (0: no limit)

    @property
    def batching(self) -> bool:
        return self.step_base_ms > 0 or self.step_per_seq_ms > 0

    def step_s(self, running: int) -> float:
        return (self.step_base_ms + self.step_per_seq_ms * running) / 1e3


class Batcher:
    """The capacity model's engine: one step loop for every stream (module docstring)."""

    def __init__(self, cfg: FakeConfig, stats: dict) -> None:
        self.cfg, self.stats = cfg, stats
        self.waiting: collections.deque[list] = collections.deque()  # [queue, tokens left]
        self.running: list[list] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    def join(self, tokens: int) -> asyncio.Queue:
        """Decode `tokens` more tokens; the queue gets one item per token, then None."""
        q: asyncio.Queue = asyncio.Queue()
        self.waiting.append([q, tokens])
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.wake.set()
        return q

    def leave(self, q: asyncio.Queue) -> None:
        """A client went away: drop its request wherever it is."""
        self.waiting = collections.deque(e for e in self.waiting if e[0] is not q)
        self.running = [e for e in self.running if e[0] is not q]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time()
        while True:
            cap = self.cfg.max_batch or 1 << 30
            while self.waiting and len(self.running) < cap:
                self.running.append(self.waiting.popleft())
            if not self.running:
                self.wake.clear()
                await self.wake.wait()
                end = loop.time()
                continue
            n = len(self.running)
            self.stats["steps"] += 1
            self.stats["peak_batch"] = max(self.stats["peak_batch"], n)
            end = max(end, loop.time() - 0.05) + self.cfg.step_s(n)  # a late loop catches up a little only
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            still = []
            for e in self.running:  # the requests that left during the step are gone from this list
                e[1] -= 1
                e[0].put_nowait(1)
                if e[1] > 0:
                    still.append(e)
                else:
                    e[0].put_nowait(None)
            self.running = still

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def build_app(cfg: FakeConfig) -> web.Application:
    counter = itertools.count(1)
    app = web.Application()
    app[STATS] = stats = {
        "requests": 0,
        "refused": 0,
        "errors": 0,
        "bad": 0,
        "streamed": 0,
        "disconnected": 0,
        "steps": 0,
        "peak_batch": 0,
    }
    batcher = Batcher(cfg, stats) if cfg.batching else None
    if batcher is not None:
        app.on_cleanup.append(lambda _app: batcher.close())

    def bad(message: str) -> web.Response:
        stats["bad"] += 1
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "code": 400}}, status=400
        )

    async def completions(request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        n = next(counter)
        stats["requests"] += 1
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return bad("body is not JSON")
        model = body.get("model")
        if model not in cfg.models:
            return bad(f"unknown model {model!r}")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return bad("messages must be a non-empty list")
            prompt = " ".join(str(m.get("content", "")) for m in msgs)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return bad("prompt must be a string")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return bad(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if cfg.refuse_every and n % cfg.refuse_every == 0:
            stats["refused"] += 1
            return web.json_response({"error": {"message": "server overloaded", "code": 429}}, status=429)
        if cfg.error_every and n % cfg.error_every == 0:
            stats["errors"] += 1
            return web.json_response({"error": {"message": "internal error", "code": 500}}, status=500)

        n_out = min(max_tokens, cfg.max_tokens_cap)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
        except ConnectionError:  # the client went away before the stream started
            stats["disconnected"] += 1
            return resp
        rid, created = f"cmpl-{n}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def emit(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await resp.write(f"data: {data}\n\n".encode())

        async def emit_token(i: int) -> None:
            finish = "length" if i == n_out - 1 else None
            text = f" t{i}"
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await emit(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [{**choice, "finish_reason": finish}],
                }
            )

        if chat:  # the role-only first chunk real servers send; carries no text
            await emit(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
            )
        await asyncio.sleep(cfg.ttft_s)
        queue = batcher.join(n_out - 1) if batcher is not None and n_out > 1 else None
        try:
            for i in range(n_out):
                if i and queue is not None:
                    await queue.get()
                elif i:
                    await asyncio.sleep(cfg.tpot_s)
                await emit_token(i)
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": n_out,
                "total_tokens": len(prompt.split()) + n_out,
            }
            await emit(
                {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            )
            await emit("[DONE]")
            stats["streamed"] += 1
            await resp.write_eof()
        except ConnectionError:  # the client went away (a load generator cancelling what it no longer needs)
            stats["disconnected"] += 1
            return resp
        finally:
            if queue is not None:
                batcher.leave(queue)
        return resp

    async def models(_request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in cfg.models]}
        )

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


async def start(cfg: FakeConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Start serving; returns (runner, base URL). Port 0 picks a free port. Stop with `await runner.cleanup()`."""
    runner = web.AppRunner(build_app(cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{host}:{bound}"


def serve_forever(cfg: FakeConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    web.run_app(build_app(cfg), host=host, port=port, access_log=None)
