"""The OpenAI HTTP protocol as pure functions: request bodies checked field by field, response and chunk objects.

    params = completion_params(body, chat=False, defaults)   # ApiError(400, ..., param="max_tokens") on bad input
    completion_response(...), completion_chunk(...)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, which the official client raises as
BadRequestError (400), AuthenticationError (401), NotFoundError (404), ... with the message intact.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_STOP = 4  # OpenAI's bound on stop sequences
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "suffix": (None, ""), "tools": (None, []), "response_format": (None,)}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style JSON body naming the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
                    self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """What a completion request asks of the engine."""

    max_tokens: int | None  # None: up to the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def sampling_params(body: dict, chat: bool) -> Sampling:
    """The sampling fields of a (chat) completion body, each checked; unsupported options with a non-default value
    are refused by name."""
    for name, neutral in UNSUPPORTED.items():
        if body.get(name, None) not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if body.get("n", 1) not in (1, None) or isinstance(body.get("n"), bool):
        raise ApiError(400, f"'n' must be 1 (one choice per prompt), got {body.get('n')!r}", "n")
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_name, None if chat else 16, 1, 1 << 30, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP} strings, got {stop!r}", "stop")
    if any(s == "" for s in stop):
        raise ApiError(400, "'stop' strings must not be empty", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    return Sampling(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                    top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
                    top_k=int(_number(body, "top_k", 0, 0, 1 << 30, integer=True)), seed=seed,
                    stop=stop, stream=stream, include_usage=bool(options.get("include_usage", False)))


def prompts_of(body: dict) -> list[str | list[int]]:
    """The prompts of a completions body: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)) for p in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids (non-empty), got "
                   f"{type(prompt).__name__}", "prompt")


def messages_of(body: dict) -> list[dict]:
    """The messages of a chat body, as {role, content} with text content (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a 'role' among {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise ApiError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                               "supported", f"messages[{i}].content")
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, chat: bool, choices: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    """The non-streamed answer; choices: (text, finish_reason) per prompt."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason} for i, (text, reason) in enumerate(choices)]
    else:
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": items, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, chat: bool, index: int, text: str | None, finish_reason: str | None,
                     role: bool = False) -> dict:
    """One streamed event: a piece of text, the opening role (chat), or the finish reason."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


__all__ = ["ApiError", "Sampling", "completion_chunk", "completion_response", "messages_of", "new_id", "prompts_of",
           "sampling_params", "usage", "usage_chunk"]
