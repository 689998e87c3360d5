"""The OpenAI-compatible HTTP front: validates, tokenizes, sends the prompt to the task model's prefill
deployment, asks the router for a decode worker, and streams tokens back (SSE when `stream: true`).

What a client can rely on (tests/test_serve.py, tests/test_faults.py, tests/test_fuzz.py):
- every request ends as a completion or an OpenAI error JSON: 4xx for what the request got wrong (before any
  engine is touched), 401 without the API key when one is set, 503 with Retry-After while the server cannot take
  it (a model still loading, every decode worker busy or gone), 500 only for a fault of the server;
- a streamed request whose trouble starts after the first byte ends with an error event, then `[DONE]`;
- a decode worker that dies or stalls, a prefill replica that dies, or KV lost on its way costs a re-prefill (up
  to MAX_ATTEMPTS in all), not the request; no stage waits without a bound (`prefill_timeout_s`,
  `decode_stall_timeout_s`).
"""

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from sunray.engine.decode_engine import KVCapacityError
from sunray.engine.prefill_engine import PromptError, validate_prompt
from sunray.engine.sequence import RequestOutput, SamplingError, SamplingParams
from sunray.kv.transport import KVTransportError
from sunray.serve import openai_protocol as oai
from sunray.serve.config import AppArgs
from sunray.serve.decode_worker import OverloadedError
from sunray.serve.metrics import RecentTimes
from sunray.serve.openai_protocol import APIError
from sunray.serve.prefill import PendingReleases
from sunray.serve.router import NoWorkerError
from sunray.serve.streams import DecodeStalledError, DecodeStreams

log = logging.getLogger("sunray.ingress")
app = FastAPI(title="sunray", description="OpenAI-compatible multi-LLM serving with SUN")
MAX_ATTEMPTS = 3  # prefill + decode tries per request, across replica deaths, lost KV and stalled workers
ROUTER_CALL_TIMEOUT_S = 2.0  # one placement call; a router that does not answer is asked again
PLACE_WAIT_S = 30.0  # how long a placement waits for the router (or a live worker) to come back
FLUSH_RELEASES_S = 1.0  # a model's hand-off releases wait at most about this long for a prefill call to ride
JSON_TYPES = ("application/json", "text/json")
# A prefill replica that died: its in-flight calls fail with one of these, and Serve starts a new replica.
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods get OpenAI error JSON too, not FastAPI's {"detail": ...}."""
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
        exc.status_code, "invalid_request_error"
    )
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error_response(APIError(exc.status_code, message, type=kind))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The last line: a bug becomes a logged traceback and an OpenAI 500, never a bare text page."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(oai.internal(f"internal error: {type(exc).__name__}"))


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


def _has_lone_surrogate(body) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _key_digest(key: str | None) -> bytes | None:
    return hashlib.sha256(key.encode()).digest() if key else None


# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress:
    async def __init__(self, args: dict, prefill: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.prefill = prefill  # model name -> DeploymentHandle of its PrefillServer
        self.releases = {m: PendingReleases() for m in prefill}  # hand-offs read, to tell their owner replica
        self.router = serve.get_deployment_handle("Router", app_name=self.args.decode_app)
        self.worker_handles: dict[str, object] = {}  # decode worker id -> actor handle (ids are never reused)
        self.placements = {"with_prefill": 0, "by_ingress": 0}  # where each request's placement came from
        self.descriptions = {m.name: m for m in self.args.models}
        self.tokenizer, self.max_model_len, self.vocab_size = _context_and_tokenizer(self.args)
        self.in_flight = 0
        self.created = int(time.time())
        self.streams = DecodeStreams(stall_timeout_s=self.args.decode_stall_timeout_s)
        self.prefill_stages = RecentTimes()  # where TTFT goes, per stage (/sunray/status)
        self.prefill_batches: collections.deque[int] = collections.deque(maxlen=2000)  # requests per batch
        self.stream_events = self.stream_tokens = (
            0  # token events streamed, tokens they carried (/sunray/status)
        )
        # Only a digest is kept; compared in constant time (hmac.compare_digest) against the presented key's.
        self._key = _key_digest(os.environ.get(self.args.api_key_env)) if self.args.api_key_env else None
        # A model is loading until its prefill deployment first answers: its replicas may still be loading (or,
        # on a GPU, capturing graphs) long after this ingress is up, and a request must not wait on them unbounded.
        self.loading = set(prefill)
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._await_ready(m)) for m in prefill]
        self._flusher = loop.create_task(self._flush_releases())

    async def _await_ready(self, model: str) -> None:
        while True:
            try:
                await self.prefill[model].info.remote()
                self.loading.discard(model)
                log.info("model %s is ready", model)
                return
            except Exception as e:  # a replica that failed to start: Serve retries it, so do we
                log.warning("model %s is not ready yet: %s", model, e)
                await asyncio.sleep(2)

    async def _flush_releases(self) -> None:
        """Releases normally ride along with prefill calls; a model without traffic for a second gets its pending
        ones sent in one call of their own (to any replica, as rides go), so that idle replicas free their
        hand-offs too."""
        while True:
            await asyncio.sleep(FLUSH_RELEASES_S)
            for model, pending in self.releases.items():
                if pending and time.monotonic() - pending.taken_at > FLUSH_RELEASES_S:
                    try:
                        await self.prefill[model].release_many.remote(pending.take())
                    except Exception as e:  # a replica restarting: HOLD_S frees what it held
                        log.info("releases of model %s not sent: %s", model, type(e).__name__)

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "sunray",
                "max_model_len": self.max_model_len,
                "description": m.description,
                "prefill_module": m.prefill_module,
                "ready": name not in self.loading,
            }
            for name, m in self.descriptions.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(self):
        """200 once every model has answered and some decode worker is live; 503 (with what is missing) before.
        Open without the API key, for load balancers and `sunray serve`'s wait."""
        try:
            live = (await asyncio.wait_for(self.router.status.remote(), 5))["live"]
        except Exception:  # the router is restarting
            live = []
        if self.loading or not live:
            missing = {"loading_models": sorted(self.loading), "live_decode_workers": len(live)}
            return JSONResponse(
                {"status": "starting", **missing}, status_code=503, headers={"Retry-After": "5"}
            )
        return {"status": "ok", "models": sorted(self.prefill), "live_decode_workers": len(live)}

    @app.get("/sunray/status")
    async def status(self, request: Request):
        """The router's view of the decode workers, and where TTFT went over the last requests (`?reset_stages=1`
        starts that window afresh after answering, so a load step can be read on its own)."""
        if (denied := self._denied(request)) is not None:
            return denied
        status = {
            "in_flight": self.in_flight,
            "loading": sorted(self.loading),
            "prefill_stages": self.prefill_stages.summary(),
            "prefill_batch_mean": round(sum(self.prefill_batches) / max(1, len(self.prefill_batches)), 2),
            "stream_events": self.stream_events,
            "stream_tokens": self.stream_tokens,
            "placements": self.placements,
            "router": await self.router.status.remote(),
        }
        if request.query_params.get("reset_stages") in ("1", "true"):
            self.prefill_stages, self.prefill_batches = RecentTimes(), collections.deque(maxlen=2000)
        return status

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # -- admission ----------------------------------------------------------------------------------------------
    def _denied(self, request: Request) -> JSONResponse | None:
        if self._key is None:
            return None
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            _key_digest(presented.strip()) or b"", self._key
        )
        if ok:
            return None
        message = "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'"
        return _error_response(APIError(401, message, code="invalid_api_key"))

    async def _read_body(self, request: Request) -> bytes:
        limit = self.args.max_request_bytes
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
            raise APIError(
                415, f"Content-Type must be application/json, got {ctype!r}", code="unsupported_media_type"
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(
                413, f"the request body has {declared} bytes; the limit is {limit}", code="body_too_large"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(
                    413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large"
                )
        return bytes(body)

    async def _parse(self, request: Request, chat: bool):
        raw = await self._read_body(request)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e.msg} at position {e.pos}") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if b"\\u" in raw and _has_lone_surrogate(body):  # JSON may escape what UTF-8 cannot carry
            raise APIError(400, "the request body contains a lone UTF-16 surrogate (\\ud800-\\udfff)")
        oai.check_not_supported(body)
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
        if req.model in self.loading:
            raise oai.unavailable(
                f"model {req.model} is still loading; retry shortly", 5, code="model_loading"
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
            ids = req.prompt
        ids = list(ids)
        try:  # the engine's own rules, applied here so that nothing reaches an engine that it would refuse
            validate_prompt(ids, self.vocab_size, self.max_model_len)
        except PromptError as e:
            code = "context_length_exceeded" if e.too_long else None
            raise APIError(400, str(e), param="messages" if chat else "prompt", code=code) from None
        return ids

    def _sampling(self, req, n_prompt: int) -> SamplingParams:
        room = self.max_model_len - n_prompt
        asked = req.asked_max_tokens
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
        except SamplingError as e:
            raise APIError(400, str(e), param=e.param) from None

    # -- one request ------------------------------------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        received = time.perf_counter()
        try:
            if (denied := self._denied(request)) is not None:
                return denied
            req = await self._parse(request, chat)
            ids = self._tokenize(req, chat)
            sampling = self._sampling(req, len(ids))
            if self.in_flight >= self.args.max_ongoing_requests:
                raise oai.unavailable("the server is at capacity; retry shortly", 1, code="at_capacity")
        except APIError as e:
            return _error_response(e)
        rid = oai.new_id("chatcmpl" if chat else "cmpl")
        echo = self._echo_text(req, ids) if not chat and req.echo else ""
        if req.stream:
            include_usage = req.stream_options.include_usage if req.stream_options else True
            events = self._sse(rid, req.model, ids, sampling, chat, include_usage, echo, received)
            return StreamingResponse(events, media_type="text/event-stream")
        text, n_out, finish = [echo], 0, None
        try:
            async for out in self._generate(rid, req.model, ids, sampling, received):
                text.append(out.new_text)
                n_out, finish = out.num_output_tokens, out.finish_reason
        except APIError as e:
            return _error_response(e)
        return oai.completion_response(rid, req.model, "".join(text), finish, len(ids), n_out, chat)

    def _echo_text(self, req, ids: list[int]) -> str:
        return req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(ids)

    async def _generate(
        self, rid: str, model: str, ids: list[int], sampling: SamplingParams, received: float | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Prefill, place, decode. A transient failure of any stage re-prefills what was produced so far (prompt +
        tokens already sent) onto another worker, at most MAX_ATTEMPTS times in all; every other failure becomes
        an APIError."""
        from sunray.serve.metrics import ingress_metrics

        m, tags = ingress_metrics(), {"model": model}
        self.in_flight += 1
        start, first_at, status = time.perf_counter(), None, "error"
        generated: list[int] = []  # every token the client has been sent, across re-prefills
        attempts, worker, worker_id, finished = 0, None, None, False
        try:
            while not finished:
                attempts += 1
                worker = None
                try:
                    left = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - len(generated))
                    res = await self._prefill(
                        rid, model, ids + generated, left, received if attempts == 1 else None
                    )
                    out: RequestOutput = res["output"]
                    generated += out.new_token_ids
                    first_at = first_at or time.perf_counter()
                    finished = out.finished
                    yield self._rebase(out, len(ids), len(generated))
                    if finished:
                        break
                    worker_id, worker = await self._place(model, res.get("placement"))
                    outputs = await self._submit(worker_id, worker, res["handoff"], rid, model)
                    while not finished:
                        out = await outputs.get()
                        if isinstance(out, BaseException):  # the worker's stream failed (it died or stalled)
                            raise out
                        generated += out.new_token_ids
                        finished = out.finished
                        yield self._rebase(out, len(ids), len(generated))
                except (
                    *REPLICA_GONE,
                    ConnectionError,
                    DecodeStalledError,
                ) as e:  # ConnectionError: stream closed
                    if worker is not None:  # a decode worker died or stalled: no placement goes there now
                        await self._forget_worker(rid, worker_id, worker, e)
                    self._retry_or_give_up(rid, e, attempts, len(ids) + len(generated))
                except (KVTransportError, ray.exceptions.ObjectLostError) as e:  # KV lost on its way
                    self._retry_or_give_up(rid, e, attempts, len(ids) + len(generated))
            status = "ok"
        finally:
            self.in_flight -= 1
            if not finished and worker is not None:
                self.streams.forget(worker_id, rid)
                worker.abort.remote(rid)  # client gone or error: free the KV now
                status = "aborted"
            self._record(m, tags, model, status, len(ids), len(generated), start, first_at)

    async def _prefill(
        self, rid: str, model: str, ids: list[int], sampling: SamplingParams, received: float | None = None
    ) -> dict:
        timeout = self.args.prefill_timeout_s
        called = time.perf_counter()
        try:
            call = self.prefill[model].prefill.remote(rid, ids, sampling, self.releases[model].take())
            res = await asyncio.wait_for(call, timeout)
            self._record_stages(model, res, called, received)
            return res
        except PromptError as e:
            raise APIError(400, str(e)) from None
        except asyncio.TimeoutError:
            raise oai.unavailable(
                f"model {model} did not prefill within {timeout:.0f} s", 5, "prefill_timeout"
            ) from None

    async def _place(self, model: str, placed: str | None = None):
        """The router's placement: the one the prefill replica got for its batch (`placed`, a worker id), else
        one asked for here. A router replica that dies is replaced by Serve, and the workers register with the new
        one at their next report (0.25 s): placement waits that out, up to PLACE_WAIT_S."""
        if placed is not None and (handle := await self._worker_handle(placed)) is not None:
            self.placements["with_prefill"] += 1
            return placed, handle
        self.placements["by_ingress"] += 1
        deadline = time.monotonic() + PLACE_WAIT_S
        while True:
            try:
                # bounded: a router replica that hangs is replaced by Serve after its health checks fail
                return await asyncio.wait_for(self.router.place.remote(model), ROUTER_CALL_TIMEOUT_S)
            except (*REPLICA_GONE, NoWorkerError, asyncio.TimeoutError) as e:
                if time.monotonic() >= deadline:
                    message = f"no decode worker can take the request: {type(e).__name__}: {e}"
                    raise oai.unavailable(message, 2, "no_decode_worker") from None
                await asyncio.sleep(0.25)
            except Exception as e:
                raise oai.unavailable(
                    f"the router failed: {type(e).__name__}", 2, "no_decode_worker"
                ) from None

    async def _worker_handle(self, worker_id: str):
        """A decode worker's actor handle, from the router once per worker (None if the router has removed it)."""
        handle = self.worker_handles.get(worker_id)
        if handle is None:
            try:
                handle = await asyncio.wait_for(
                    self.router.worker_handle.remote(worker_id), ROUTER_CALL_TIMEOUT_S
                )
            except Exception as e:  # the router restarting: the ingress places the request itself
                log.info("no handle for decode worker %s: %s", worker_id, type(e).__name__)
                return None
            if handle is not None:
                self.worker_handles[worker_id] = handle
        return handle

    async def _submit(self, worker_id: str, worker, handoff, rid: str, model: str) -> asyncio.Queue:
        try:
            outputs = await self.streams.submit(worker_id, worker, handoff, rid)
        except OverloadedError as e:
            raise oai.unavailable(str(e.args[0] if e.args else e), 1, "decode_overloaded") from None
        except KVCapacityError as e:
            raise APIError(
                400, f"the request does not fit a decode worker's KV cache: {e}", param="max_tokens"
            ) from None
        except (*REPLICA_GONE, KVTransportError, ray.exceptions.ObjectLostError):
            raise
        except ray.exceptions.RayTaskError as e:
            log.error("%s: decode worker %s refused the hand-off: %s", rid, worker_id, e)
            raise oai.internal(f"decode failed: {getattr(e, 'cause', e)}") from None
        self.releases[model].add(rid)  # the worker holds the KV now: tell the owner on the next prefill calls
        return outputs

    async def _forget_worker(self, rid: str, worker_id: str, worker, e: BaseException) -> None:
        log.warning("%s: decode worker %s failed (%s)", rid, worker_id, type(e).__name__)
        self.worker_handles.pop(worker_id, None)
        self.streams.forget(worker_id, rid)
        worker.abort.remote(rid)  # a stalled worker may still hold the request's KV
        try:
            await asyncio.wait_for(self.router.remove.remote(worker_id), 5)
        except Exception as err:  # the router restarting: it forgets every worker anyway
            log.warning("could not tell the router that %s failed: %s", worker_id, err)

    def _record_stages(self, model: str, res: dict, called: float, received: float | None) -> None:
        """Where this request's time to first token went (the prefill replica timed its own stages)."""
        from sunray.serve.metrics import ingress_metrics

        stages = dict(res.get("stages", {}))
        stages["handle"] = time.perf_counter() - called - sum(stages.values())
        if received is not None:
            stages["ingress"] = called - received
        m = ingress_metrics()["prefill_stage"]
        for stage, seconds in stages.items():
            self.prefill_stages.add(stage, seconds)
            m.observe(max(0.0, seconds), {"model": model, "stage": stage})
        self.prefill_batches.append(res.get("batch", 0))

    def _retry_or_give_up(self, rid: str, e: BaseException, attempts: int, context: int) -> None:
        if attempts >= MAX_ATTEMPTS:
            raise oai.unavailable(
                f"the request failed {attempts} times ({type(e).__name__})", 2, "retries_exhausted"
            )
        if context >= self.max_model_len:
            raise oai.unavailable("a decode worker failed at the context limit", 2, "retries_exhausted")
        log.warning("%s: attempt %d failed (%s: %s); prefilling again", rid, attempts, type(e).__name__, e)

    def _record(self, m, tags, model, status, n_prompt, produced, start, first_at) -> None:
        elapsed = time.perf_counter() - start
        m["requests"].inc(1, {"model": model, "status": status})
        m["prompt_tokens"].inc(n_prompt, tags)
        if produced:
            m["output_tokens"].inc(produced, tags)
            m["e2e"].observe(elapsed, tags)
        if first_at is not None:
            m["ttft"].observe(first_at - start, tags)
            if produced > 1:
                m["tpot"].observe((time.perf_counter() - first_at) / (produced - 1), tags)
        log.info("model=%s prompt=%d out=%d status=%s %.3fs", model, n_prompt, produced, status, elapsed)

    @staticmethod
    def _rebase(out: RequestOutput, n_prompt: int, produced: int) -> RequestOutput:
        """Counts as the client sees them, across re-prefills."""
        out.num_prompt_tokens, out.num_output_tokens = n_prompt, produced
        return out

    async def _sse(
        self, rid, model, ids, sampling, chat, include_usage, echo: str = "", received: float | None = None
    ) -> AsyncIterator[str]:
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        first, n_out = True, 0
        held: list[str] = []  # text of tokens not yet sent (stream_interval)
        held_tokens, interval = 0, self.args.stream_interval
        try:
            if echo:
                yield event(oai.stream_chunk(rid, model, echo, None, chat))
            async for out in self._generate(rid, model, ids, sampling, received):
                self.stream_tokens += out.num_output_tokens - n_out
                held_tokens += out.num_output_tokens - n_out
                n_out = out.num_output_tokens
                held.append(out.new_text)
                if not (first or out.finished or held_tokens >= interval):
                    continue
                text, held, held_tokens = "".join(held), [], 0
                if text or first:
                    self.stream_events += 1
                    if first and received is not None:
                        # the whole of TTFT inside this replica; a client's TTFT beyond it is the proxy's
                        self.prefill_stages.add("first_chunk", time.perf_counter() - received)
                    yield event(oai.stream_chunk(rid, model, text, None, chat, first=first))
                    first = False
                if out.finished:
                    yield event(oai.stream_chunk(rid, model, None, out.finish_reason, chat))
            if include_usage:
                yield event(oai.usage_chunk(rid, model, len(ids), n_out, chat))
        except APIError as e:
            if text := "".join(held):  # what was generated before the failure reaches the client first
                yield event(oai.stream_chunk(rid, model, text, None, chat, first=first))
            yield event(e.body())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a stream hanging without a word
            log.exception("%s: stream failed", rid)
            yield event(oai.internal(f"internal error: {type(e).__name__}").body())
        yield "data: [DONE]\n\n"
