"""The OpenAI-compatible HTTP front: validates, tokenizes, sends the prompt to the task model's prefill
deployment, asks the router for a decode worker, and streams tokens back (SSE when `stream: true`).

Every client error becomes an OpenAI error JSON with a 4xx status before any engine is touched; overload is a
503 with Retry-After; a decode worker that dies mid-stream costs a re-prefill onto another worker, not the request.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from sunray.engine.decode_engine import KVCapacityError
from sunray.engine.prefill_engine import PromptError
from sunray.engine.sequence import RequestOutput, SamplingParams
from sunray.kv.transport import KVTransportError
from sunray.serve import openai_protocol as oai
from sunray.serve.config import AppArgs
from sunray.serve.decode_worker import OverloadedError
from sunray.serve.openai_protocol import APIError
from sunray.serve.streams import DecodeStreams

log = logging.getLogger("sunray.ingress")
app = FastAPI(title="sunray", description="OpenAI-compatible multi-LLM serving with SUN")
MAX_DECODE_ATTEMPTS = 3


def _context_and_tokenizer(args: AppArgs):
    from sunray.engine.config import EngineConfig
    from sunray.models.config import ModelConfig
    from sunray.models.loader import load_tokenizer, resolve_model_dir

    if args.dummy_shape:
        from sunray.models.presets import SHAPES

        config, tok_dir = SHAPES[args.dummy_shape], resolve_model_dir(args.tokenizer)
    else:
        tok_dir = resolve_model_dir(args.decode_module)
        config = ModelConfig.from_pretrained(tok_dir)
    engine: EngineConfig = args.engine.engine_config()
    return load_tokenizer(tok_dir), engine.context_length(config), config.vocab_size


def _first_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    return APIError(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param)


# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress:
    def __init__(self, args: dict, prefill: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.prefill = prefill  # model name -> DeploymentHandle of its PrefillServer
        self.router = serve.get_deployment_handle("Router", app_name=self.args.decode_app)
        self.descriptions = {m.name: m for m in self.args.models}
        self.tokenizer, self.max_model_len, self.vocab_size = _context_and_tokenizer(self.args)
        self.in_flight = 0
        self.created = int(time.time())
        self.streams = DecodeStreams()

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "sunray",
                "max_model_len": self.max_model_len,
                "description": m.description,
                "prefill_module": m.prefill_module,
            }
            for name, m in self.descriptions.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/sunray/status")
    async def status(self) -> dict:
        return {"in_flight": self.in_flight, "router": await self.router.status.remote()}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # -- one request ------------------------------------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        try:
            req = await self._parse(request, chat)
            ids = self._tokenize(req, chat)
            sampling = self._sampling(req, len(ids))
            if self.in_flight >= self.args.max_ongoing_requests:
                raise APIError(
                    503, "the server is at capacity; retry shortly", type="server_overloaded", retry_after=1
                )
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
        rid = oai.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            include_usage = req.stream_options.include_usage if req.stream_options else True
            return StreamingResponse(
                self._sse(rid, req.model, ids, sampling, chat, include_usage), media_type="text/event-stream"
            )
        text, n_out, finish = [], 0, None
        try:
            async for out in self._generate(rid, req.model, ids, sampling):
                text.append(out.new_text)
                n_out, finish = out.num_output_tokens, out.finish_reason
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
        return oai.completion_response(rid, req.model, "".join(text), finish, len(ids), n_out, chat)

    async def _parse(self, request: Request, chat: bool):
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e.msg} at position {e.pos}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = (oai.ChatCompletionRequest if chat else oai.CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise _first_error(e) from None
        if req.model not in self.prefill:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist; available: {', '.join(self.prefill)}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return req

    def _tokenize(self, req, chat: bool) -> list[int]:
        if chat:
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            except ValueError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            except Exception as e:  # a template that raises on this conversation (e.g. roles out of order)
                raise APIError(
                    400, f"messages cannot be rendered with the chat template: {e}", param="messages"
                ) from None
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
                    param="prompt",
                )
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages")
        if len(ids) >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(ids)} tokens and leaves no room for output",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        return list(ids)

    def _sampling(self, req, n_prompt: int) -> SamplingParams:
        room = self.max_model_len - n_prompt
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{n_prompt} tokens, so max_tokens can be at most {room} (got {asked})",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            return req.sampling(min(self.args.default_max_tokens, room))
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _generate(
        self, rid: str, model: str, ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Prefill, place, decode; on a decode worker's death (or a lost KV hand-off), re-prefill what was produced
        onto another worker."""
        from sunray.serve.metrics import ingress_metrics

        m, tags = ingress_metrics(), {"model": model}
        self.in_flight += 1
        start, first_at, status = time.perf_counter(), None, "error"
        generated: list[int] = []  # every token the client has been sent, across re-prefills
        attempts, worker, finished = 0, None, False
        try:
            while True:
                params = {**sampling.to_dict(), "max_tokens": sampling.max_tokens - len(generated)}
                try:
                    res = await self.prefill[model].prefill.remote(rid, ids + generated, params)
                except PromptError as e:
                    raise APIError(400, str(e)) from None
                out: RequestOutput = res["output"]
                generated += out.new_token_ids
                first_at = first_at or time.perf_counter()
                yield self._rebase(out, len(ids), len(generated))
                if out.finished:
                    finished = True
                    break
                try:
                    worker_id, worker = await self.router.place.remote(model)
                except Exception as e:
                    raise APIError(
                        503,
                        f"no decode worker can take the request: {e}",
                        type="server_overloaded",
                        retry_after=2,
                    ) from None
                try:
                    outputs = await self.streams.submit(worker_id, worker, res["handoff"], rid)
                    self.prefill[model].release.remote(rid)  # the worker holds the KV now
                    while not finished:
                        out = await outputs.get()
                        if isinstance(out, BaseException):  # the worker's stream failed (it died)
                            raise out
                        generated += out.new_token_ids
                        finished = out.finished
                        yield self._rebase(out, len(ids), len(generated))
                    break
                except (
                    ray.exceptions.RayActorError,
                    ConnectionError,
                ) as e:  # ConnectionError: its stream closed
                    log.warning(
                        "%s: decode worker %s died (%s); re-prefilling %d tokens",
                        rid,
                        worker_id,
                        type(e).__name__,
                        len(ids) + len(generated),
                    )
                    await self.router.remove.remote(worker_id)
                    worker, attempts = None, attempts + 1
                    if attempts >= MAX_DECODE_ATTEMPTS:
                        raise APIError(
                            503, "decode workers failed repeatedly", type="server_error", retry_after=2
                        ) from None
                    if len(ids) + len(generated) >= self.max_model_len:
                        raise APIError(
                            503, "decode worker failed at the context limit", type="server_error"
                        ) from None
                except KVTransportError as e:  # the KV was lost on its way (nccl: a peer died or timed out)
                    log.warning("%s: KV hand-off to %s failed (%s); re-prefilling", rid, worker_id, e)
                    worker, attempts = None, attempts + 1
                    if attempts >= MAX_DECODE_ATTEMPTS:
                        raise APIError(
                            503, "the KV hand-off failed repeatedly", type="server_error", retry_after=2
                        ) from None
                except OverloadedError as e:
                    raise APIError(
                        503, str(e.args[0] if e.args else e), type="server_overloaded", retry_after=1
                    ) from None
                except KVCapacityError as e:
                    raise APIError(
                        400, f"the request does not fit a decode worker's KV cache: {e}", param="max_tokens"
                    ) from None
                except ray.exceptions.RayTaskError as e:
                    raise APIError(
                        500, f"decode failed: {getattr(e, 'cause', e)}", type="server_error"
                    ) from None
            status = "ok"
        finally:
            self.in_flight -= 1
            if not finished and worker is not None:
                self.streams.forget(worker_id, rid)
                worker.abort.remote(rid)  # client gone or error: free the KV now
                status = "aborted"
            elapsed = time.perf_counter() - start
            m["requests"].inc(1, {"model": model, "status": status})
            m["prompt_tokens"].inc(len(ids), tags)
            produced = len(generated)
            if produced:
                m["output_tokens"].inc(produced, tags)
                m["e2e"].observe(elapsed, tags)
            if first_at is not None:
                m["ttft"].observe(first_at - start, tags)
                if produced > 1:
                    m["tpot"].observe((time.perf_counter() - first_at) / (produced - 1), tags)
            log.info(
                "%s model=%s prompt=%d out=%d status=%s %.3fs",
                rid,
                model,
                len(ids),
                produced,
                status,
                elapsed,
            )

    @staticmethod
    def _rebase(out: RequestOutput, n_prompt: int, produced: int) -> RequestOutput:
        """Counts as the client sees them, across re-prefills."""
        out.num_prompt_tokens, out.num_output_tokens = n_prompt, produced
        return out

    async def _sse(self, rid, model, ids, sampling, chat, include_usage) -> AsyncIterator[str]:
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        first, n_out = True, 0
        try:
            async for out in self._generate(rid, model, ids, sampling):
                n_out = out.num_output_tokens
                if out.new_text or first:
                    yield event(oai.stream_chunk(rid, model, out.new_text, None, chat, first=first))
                    first = False
                if out.finished:
                    yield event(oai.stream_chunk(rid, model, None, out.finish_reason, chat))
            if include_usage:
                yield event(oai.usage_chunk(rid, model, len(ids), n_out, chat))
        except APIError as e:
            yield event(e.body())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a stream hanging without a word
            log.exception("%s: stream failed", rid)
            yield event(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
        yield "data: [DONE]\n\n"
