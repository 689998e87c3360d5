"""The OpenAI-compatible request and response shapes, and OpenAI-style errors.

Validation lives here so that every bad input becomes a 4xx OpenAI error JSON before any engine sees it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sunray.engine.sequence import SamplingParams


class APIError(Exception):
    """An error the client caused or should see, with its HTTP status and OpenAI error type."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


def unavailable(message: str, retry_after: float, code: str = "unavailable") -> APIError:
    """503 with Retry-After: the server cannot take the request now; the same request may succeed later."""
    return APIError(503, message, type="server_overloaded", code=code, retry_after=retry_after)


def internal(message: str) -> APIError:
    """500: a fault of the server, not of the request (logged with its traceback where it happened)."""
    return APIError(500, message, type="server_error", code="internal_error")


# OpenAI parameters this server does not implement. Each is refused (400) unless left out or set to its no-op
# value: silently ignoring `logprobs: true` or a penalty would return something other than what was asked for.
NOT_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
}


def check_not_supported(body: dict[str, Any]) -> None:
    """Raise APIError(400) for the first OpenAI parameter in `body` that this server does not implement."""
    for name, no_op in NOT_SUPPORTED.items():
        if name in body and not any(_same(body[name], v) for v in no_op):
            raise APIError(
                400,
                f"{name} is not supported by this server (got {body[name]!r}); leave it out",
                param=name,
                code="unsupported_parameter",
            )


def _same(value: Any, no_op: Any) -> bool:
    """JSON equality that keeps booleans apart from numbers (False == 0 in Python, not in JSON)."""
    if isinstance(value, bool) or isinstance(no_op, bool):
        return type(value) is type(no_op) and value == no_op
    return value == no_op


class StreamOptions(BaseModel):
    include_usage: bool = True


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    # Types only: the ranges are SamplingParams' (sunray.engine.sequence), checked once when it is built.
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False
    user: str | None = None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """Raises SamplingError (a ValueError naming the parameter) for a value out of its range."""
        asked = self.asked_max_tokens
        return SamplingParams(
            max_tokens=default_max_tokens if asked is None else asked,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list):
            if len(v) == 1 and isinstance(v[0], str):
                return v[0]
            if not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                raise ValueError(
                    "prompt must be a string, a list with one string, or a non-empty list of token ids"
                )
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    rid: str, model: str, text: str, finish: str | None, n_prompt: int, n_out: int, chat: bool
) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(n_prompt, n_out),
    }


def stream_chunk(
    rid: str, model: str, text: str | None, finish: str | None, chat: bool, first: bool = False
) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(rid: str, model: str, n_prompt: int, n_out: int, chat: bool) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(n_prompt, n_out),
    }
