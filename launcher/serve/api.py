"""Request validation and response bodies of the OpenAI-compatible API.

Every rejected request gets an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`,
whose message names the field, the value and what would be accepted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

UNSUPPORTED = {"echo": False, "best_of": 1, "logprobs": None, "top_logprobs": None, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
               "response_format": None}
"""Fields accepted only at their default value (anything else is refused, not silently ignored)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(400, f"{name} = {v!r}: it must be a number in {span}", name)
    return float(v)


def common(body: Any, models: list[str]) -> Params:
    """The fields completions and chat share, checked; `model` must be one of `models`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model = {model!r}: name the model to use ({', '.join(models)})", "model")
    if model not in models:
        raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists: {', '.join(models)}",
                       "model", "model_not_found")
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise ApiError(400, f"n = {body.get('n')!r}: this server returns one choice per request (n = 1)", "n")
    for name, default in UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v is not False and v != default:
            raise ApiError(400, f"{name} = {v!r} is not supported by this server (leave it out)", name,
                           "unsupported")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, f"max_tokens = {max_tokens!r}: it must be an integer >= 1", "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop = {body.get('stop')!r}: a non-empty string or a list of up to 4 of them", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ApiError(400, f"seed = {seed!r}: an integer in [0, 2**63)", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise ApiError(400, f"stream = {stream!r}: true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, f"stream_options = {body.get('stream_options')!r}: {{\"include_usage\": true|false}}",
                       "stream_options")
    return Params(model, max_tokens, _num(body, "temperature", 1.0, 0.0, 2.0), _num(body, "top_p", 1.0, 0.0, 1.0, True),
                  stop, seed, bool(stream), bool(opts.get("include_usage", False)))


def prompt_of(body: dict, vocab: int) -> str | list[int]:
    """A completion's prompt: a non-empty string (or a list of one), or token ids inside the vocabulary."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "prompt is empty: give at least one character or token id", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
        return p
    if isinstance(p, list) and not p:
        raise ApiError(400, "prompt is an empty list: give a string or token ids", "prompt")
    raise ApiError(400, f"prompt of type {type(p).__name__}: a string or a list of token ids (one prompt per "
                        f"request)", "prompt")


def messages_of(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] = {m!r}: each message needs a role (system, user, assistant) "
                                f"and a string content", f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"] for m in out):
        raise ApiError(400, "messages: every content is empty", "messages")
    return out


def check_length(n_prompt: int, max_tokens: int | None, context: int, default: int | None) -> int:
    """max_tokens to use, or an error when the prompt or prompt + max_tokens pass the context."""
    if n_prompt >= context:
        raise ApiError(400, f"the prompt has {n_prompt} tokens and the model's context is {context}: shorten it "
                            f"below {context} tokens", "prompt", "context_length_exceeded")
    room = context - n_prompt
    if max_tokens is None:
        return min(default, room) if default else room
    if max_tokens > context:
        raise ApiError(400, f"max_tokens = {max_tokens} is larger than the model's whole context ({context})",
                       "max_tokens", "context_length_exceeded")
    if max_tokens > room:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                            f"passes the model's context of {context}: max_tokens <= {room}", "max_tokens",
                       "context_length_exceeded")
    return max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": usage}


def chat_body(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": usage}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def usage_chunk(chat: bool, rid: str, model: str, usage: dict) -> dict:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage}
