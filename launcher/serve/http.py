"""The OpenAI-compatible routes (FastAPI), on rank 0's event loop. Nothing here runs the model: a
request is validated and tokenized, handed to the engine thread, and its events are awaited.

    POST /v1/completions, POST /v1/chat/completions   (stream: SSE chunks, then `data: [DONE]`)
    GET /v1/models   GET /health (no API key; 503 unless ready)   GET /metrics (Prometheus)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from launcher.serve import api
from launcher.serve.api import ApiError
from launcher.serve.batcher import Engine, Refused
from launcher.serve.sequence import Sequence

COMPLETIONS_DEFAULT_MAX = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


def make_app(engine: Engine, base: str, adapters: dict[str, str], api_key: str | None) -> FastAPI:
    app = FastAPI(title="labs serve", docs_url=None, redoc_url=None, openapi_url=None)
    models = [base, *adapters]
    created = int(time.time())

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                resp: Response = _error(ApiError(401, "missing or wrong API key: send the header "
                                                      "'Authorization: Bearer KEY'", None, "invalid_api_key"))
                engine.metrics.http.labels(request.url.path, "401").inc()
                return resp
        resp = await call_next(request)
        engine.metrics.http.labels(request.url.path, str(resp.status_code)).inc()
        return resp

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                               "not_found" if exc.status_code == 404 else "invalid_request"))

    @app.get("/health")
    async def health():
        ok = engine.state == "ready"
        return JSONResponse({"status": engine.state, **({"error": engine.error} if engine.error else {})},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": base, "object": "model", "created": created, "owned_by": "labs", "root": base, "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "labs", "root": p, "parent": base}
                 for n, p in adapters.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, engine, models, base, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, engine, models, base, chat=True)

    return app


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _body(request: Request) -> dict:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type {ctype or '(none)'!r}: send the body as JSON with "
                            f"'Content-Type: application/json'", None, "unsupported_media_type")
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None


async def _prepare(request: Request, engine: Engine, models: list[str], base: str, chat: bool):
    if engine.state != "ready":
        raise ApiError(503, f"the server is {engine.state}" + (f": {engine.error}" if engine.error else ""),
                       None, "unavailable")
    body = await _body(request)
    params = api.common(body, models)
    loaded = engine.loaded
    if chat:
        messages = api.messages_of(body)
        ids = await run_in_threadpool(lambda: loaded.http_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        prompt = api.prompt_of(body, loaded.vocab)
        ids = prompt if isinstance(prompt, list) else await run_in_threadpool(
            lambda: loaded.http_tokenizer(prompt)["input_ids"])
    ids = list(ids)
    max_tokens = api.check_length(len(ids), params.max_tokens, loaded.context, None if chat else COMPLETIONS_DEFAULT_MAX)
    seq = Sequence(ids, max_tokens, params.temperature, params.top_p, params.stop, params.seed,
                   None if params.model == base else params.model, loaded.eos,
                   asyncio.get_running_loop(), asyncio.Queue())
    return params, seq


async def _generate(request: Request, engine: Engine, models: list[str], base: str, chat: bool) -> Response:
    try:
        params, seq = await _prepare(request, engine, models, base, chat)
        engine.submit(seq)
    except ApiError as e:
        return _error(e)
    except Refused as e:
        return _error(ApiError(e.status, e.message, None, "rate_limited" if e.status == 429 else "unavailable"))
    rid = api.new_id("chatcmpl" if chat else "cmpl")
    if params.stream:
        return StreamingResponse(_sse(seq, chat, rid, params), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(seq.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    seq.cancelled = True
                    return Response(status_code=499)
                continue
            if ev[0] == "delta":
                text.append(ev[1])
            elif ev[0] == "error":
                return _error(ApiError(ev[1], ev[2], None, "unavailable"))
            else:
                make = api.chat_body if chat else api.completion_body
                return JSONResponse(make(rid, params.model, "".join(text), ev[1], ev[2]))
    finally:
        if not seq.done:
            seq.cancelled = True


async def _sse(seq: Sequence, chat: bool, rid: str, params: api.Params) -> AsyncIterator[str]:
    """Chunks as OpenAI sends them; a client that goes away cancels the task here: generation stops."""
    def data(obj: dict) -> str:
        if params.include_usage and obj.get("choices"):
            obj["usage"] = None
        return f"data: {json.dumps(obj)}\n\n"

    try:
        if chat:
            yield data(api.chunk(True, rid, params.model, None, None, first=True))
        while True:
            ev = await seq.events.get()
            if ev[0] == "delta":
                yield data(api.chunk(chat, rid, params.model, ev[1], None))
            elif ev[0] == "error":
                yield data(ApiError(ev[1], ev[2], None, "unavailable").body())
                break
            else:
                yield data(api.chunk(chat, rid, params.model, None, ev[1]))
                if params.include_usage:
                    yield f"data: {json.dumps(api.usage_chunk(chat, rid, params.model, ev[2]))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not seq.done:
            seq.cancelled = True
