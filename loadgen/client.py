"""The HTTP client: one streaming request to an OpenAI-compatible server, recorded into a `RequestRecord`.

Talks only HTTP (`/v1/completions` or `/v1/chat/completions` with `stream: true`), so any server that speaks the
OpenAI API can be measured the same way. Each `data: {...}` chunk whose text is not empty counts as a token
arrival; the usage chunk (asked for with `stream_options.include_usage`) gives the exact token counts; `data:
[DONE]` ends the stream. HTTP 429 and 503 count as refused, every other failure as an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import aiohttp

from loadgen.metrics import RequestRecord
from loadgen.workload import RequestSpec, prompt_for

ENDPOINTS = ("completions", "chat")
REFUSED_STATUSES = (429, 503)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    url: str  # server root (http://127.0.0.1:8000), .../v1, or the full endpoint URL
    endpoint: str = "completions"  # completions | chat
    api_key: str | None = None
    timeout_s: float = 600.0  # per request, total
    ignore_eos: bool = True  # ask for exactly max_tokens (vLLM/SGLang/sunray extension field)
    temperature: float = 0.0
    prompt_seed: int = 0
    extra_body: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; choose from {', '.join(ENDPOINTS)}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"URL must start with http:// or https://, got {self.url!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"request timeout must be positive, got {self.timeout_s}")

    @property
    def endpoint_url(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/completions"):
            return url
        if not url.endswith("/v1"):
            url += "/v1"
        return url + ("/chat/completions" if self.endpoint == "chat" else "/completions")


def build_payload(spec: RequestSpec, cfg: ClientConfig) -> dict:
    body: dict = {
        "model": spec.model,
        "max_tokens": spec.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    prompt = prompt_for(spec, cfg.prompt_seed)
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(dict(cfg.extra_body))
    return body


def _chunk_text(choice: dict, endpoint: str) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _error_text(body: str, limit: int = 300) -> str:
    try:
        err = json.loads(body)
        if isinstance(err, dict):
            e = err.get("error", err)
            body = e.get("message", str(e)) if isinstance(e, dict) else str(e)
    except (ValueError, TypeError):
        pass
    return body.strip()[:limit]


async def send(
    session: aiohttp.ClientSession, spec: RequestSpec, cfg: ClientConfig, t0: float, rec: RequestRecord
) -> RequestRecord:
    """Send `spec` and fill `rec` in place (times relative to `t0`, a `time.perf_counter()` value). If the task is
    cancelled, `rec` keeps what was seen so far and its status stays 'cancelled'."""
    payload = build_payload(spec, cfg)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    rec.prompt_len, rec.max_tokens = spec.prompt_len, spec.output_len
    rec.sent_s = time.perf_counter() - t0
    try:
        async with session.post(
            cfg.endpoint_url,
            json=payload,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
        ) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                body = await resp.text(errors="replace")
                rec.status = "refused" if resp.status in REFUSED_STATUSES else "error"
                rec.error = f"HTTP {resp.status}: {_error_text(body)}"
                rec.end_s = time.perf_counter() - t0
                return rec
            done = False
            async for raw in resp.content:
                now = time.perf_counter() - t0
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ': keep-alive' comments, 'event:' lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    rec.status, rec.error = "error", f"bad SSE chunk: {data[:200]!r}"
                    rec.end_s = now
                    return rec
                if "error" in chunk or chunk.get("object") == "error":
                    rec.status, rec.error = "error", f"error in stream: {_error_text(data)}"
                    rec.end_s = now
                    return rec
                if rec.first_chunk_s is None and chunk.get("choices"):
                    rec.first_chunk_s = now
                for choice in chunk.get("choices") or []:
                    if _chunk_text(choice, cfg.endpoint):
                        if rec.first_token_s is None:
                            rec.first_token_s = now
                        rec.chunk_s.append(now)
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.completion_tokens = usage.get("completion_tokens")
            rec.end_s = time.perf_counter() - t0
            if done:
                rec.status = "ok"
            else:
                rec.status, rec.error = "error", "stream ended without 'data: [DONE]'"
    except asyncio.TimeoutError:
        rec.status, rec.error = "error", f"timeout after {cfg.timeout_s:g} s"
        rec.end_s = time.perf_counter() - t0
    except aiohttp.ClientError as e:
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
        rec.end_s = time.perf_counter() - t0
    return rec
