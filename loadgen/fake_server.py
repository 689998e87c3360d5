"""A small fake OpenAI-compatible server (aiohttp) for tests and dry runs of the load generator.

It streams `max_tokens` tokens (capped) with a fixed first-token delay and a fixed delay between tokens, answers
HTTP 429 to every `refuse_every`-th request, and 400 to a bad request (unknown model, missing prompt, bad
max_tokens). Binds 127.0.0.1 by default.

    python -m loadgen fake-server --port 8100 --ttft-ms 20 --tpot-ms 5
"""

from __future__ import annotations

import asyncio
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


def build_app(cfg: FakeConfig) -> web.Application:
    counter = itertools.count(1)
    app = web.Application()
    app[STATS] = stats = {"requests": 0, "refused": 0, "bad": 0, "streamed": 0}

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

        n_out = min(max_tokens, cfg.max_tokens_cap)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rid, created = f"cmpl-{n}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def emit(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await resp.write(f"data: {data}\n\n".encode())

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
        for i in range(n_out):
            if i:
                await asyncio.sleep(cfg.tpot_s)
            text = f" t{i}"
            finish = "length" if i == n_out - 1 else None
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
