"""pt-serve's HTTP API (FastAPI): the routes, and the guard in front of them.

The guard (an ASGI middleware, outermost) gives every request the same treatment whatever
happens inside: a body larger than its limit is refused with 413 before it is read whole, a
body that does not arrive within the read timeout gets 408, an unexpected exception becomes a
500 in the API's error shape on a connection that stays usable, and every response is counted
in /metrics by route and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import protocol
from .batching import QueueFull, Row, Stopped
from .registry import NAME_RULE, valid_name
from .service import ServeConfig, ServeError, Service
from .stops import sendable
from .store import StoreUnavailable

log = logging.getLogger("prefixkit.server")
UPLOAD_PATH = "/v1/prefixes"


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return protocol.ErrorResponse(error=protocol.ErrorBody(message=message, type=kind, param=param)).model_dump()


class Guard:
    """Body limits, the body read timeout, a catch-all for unexpected errors, and the request
    counter (see the module's docstring)."""

    def __init__(self, app, config: ServeConfig, state: dict):
        self.app, self.config, self.state = app, config, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, tuple):  # refused: (status, message)
                await self._answer(counted_send, *body)
            else:
                await self.app(scope, self._replay(body, receive), counted_send)
        except Exception:  # noqa: BLE001 - a bug answers this request, never the connection
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not status["started"]:
                await self._answer(counted_send, 500, "the server failed on this request; it has been logged.",
                                   "server_error")
        finally:
            service = self.state.get("service")
            if service is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                service.metrics.requests.labels(route, str(status["code"])).inc()

    async def _read_body(self, scope, receive) -> bytes | tuple:
        """The whole body, or (status, message) when it is too large or too slow."""
        limit = (self.config.max_upload_mb << 20) if scope["path"] == UPLOAD_PATH else (self.config.max_request_kb << 10)
        what = "an uploaded prefix" if scope["path"] == UPLOAD_PATH else "a request body"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return 413, f"{what} may have at most {limit} bytes; this one declares {int(declared)}."
        chunks, size = [], 0
        deadline = time.monotonic() + self.config.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return 408, f"the request body did not arrive within {self.config.read_timeout:g} s."
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return 413, f"{what} may have at most {limit} bytes."
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return replay

    @staticmethod
    async def _answer(send, status: int, message: str, kind: str = "invalid_request_error"):
        payload = json.dumps(error_body(message, kind)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def create_app(config: ServeConfig, service: Service | None = None):
    """The ASGI application: FastAPI's routes behind the guard. The service (the loaded export,
    prefixes and batcher) is made at start-up unless one is given."""
    state: dict[str, Service] = {} if service is None else {"service": service}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["service"] = service if service is not None else await asyncio.to_thread(Service, config)
        service_ = state["service"]
        yield
        service_.closing = True
        await asyncio.to_thread(service_.batcher.close)

    app = FastAPI(title="prefixkit", lifespan=lifespan)
    _errors(app)
    _routes(app, state)
    _prefix_routes(app, state)
    return Guard(app, config, state)


def _errors(app: FastAPI) -> None:
    def error(status: int, message: str, kind: str, headers=None, param=None):
        return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return error(e.status, e.message, e.kind, e.headers, e.param)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, e: StoreUnavailable):
        return error(503, str(e), "server_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            message = str(item.get("msg")).removeprefix("Value error, ").rstrip(".")
            problems.append(f"{where}: {message}" if where else message)
        return error(400, "invalid request: " + "; ".join(problems)[:2000] + ".", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(e.status_code, str(e.detail), kind, getattr(e, "headers", None))


def _routes(app: FastAPI, state: dict) -> None:
    """Health, metrics, the models and completions."""

    @app.get("/health", response_model=protocol.Health)
    async def health():
        service = state["service"]
        status, problem = "ok", None
        if service.closing:
            status = "shutting down"
        elif not service.batcher.alive:
            status, problem = "decode loop stopped", service.batcher.failure
        body = protocol.Health(status=status, backbone=service.base_name, prefixes=service.registry.in_memory,
                               queue_depth=service.batcher.queue_depth, active_rows=service.batcher.active_rows,
                               problem=problem)
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state["service"].metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def models(authorization: str | None = Header(None), after: str | None = None,
                     limit: int = Query(protocol.MODELS_PAGE, ge=1, le=protocol.MODELS_PAGE_MAX)):
        """The models this key may use, a page at a time: the backbone, then its prefixes in name
        order; `after` is the last id of the previous page."""
        service = state["service"]
        key = service.key_of(authorization)
        service.require(key)
        names, stored, more = await asyncio.to_thread(service.models_page, key, after, limit)
        return protocol.ModelList(data=[_card(service, name, stored.get(name)) for name in names],
                                  has_more=more, last_id=names[-1] if names else after)

    @app.post("/v1/completions", response_model=protocol.CompletionResponse)
    async def completions(body: protocol.CompletionRequest, request: Request,
                          authorization: str | None = Header(None)):
        service = state["service"]
        if service.closing:
            raise ServeError(503, "the server is shutting down.", "server_error")
        service.require(service.key_of(authorization), model=body.model)
        rows, prompt_tokens, entry = await asyncio.to_thread(service.rows_for, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            row.on_done = lambda r, i=index: loop.call_soon_threadsafe(events.put_nowait, ("done", i))
            if body.stream:
                row.on_token = lambda r, i=index: loop.call_soon_threadsafe(events.put_nowait, ("token", i))
        started = time.perf_counter()
        try:
            service.submit(body.model, rows, entry)
        except QueueFull as e:
            raise ServeError(429, f"the server is busy: {e} Retry shortly.", "rate_limit_error",
                             headers={"Retry-After": "1"}) from None
        except Stopped as e:
            raise ServeError(503, str(e), "server_error") from None
        if body.stream:
            return StreamingResponse(_stream(service, body, rows, events, started),
                                     media_type="text/event-stream")
        return await _answer(service, body, rows, prompt_tokens, events, started, request)


def _prefix_routes(app: FastAPI, state: dict) -> None:
    """Managing prefixes (admin keys only)."""

    @app.post(UPLOAD_PATH, response_model=protocol.PrefixUploaded)
    async def upload(request: Request, name: str, authorization: str | None = Header(None)):
        service = state["service"]
        service.require(service.key_of(authorization), admin=True)
        if not valid_name(name):
            raise ServeError(400, f"{name!r} is not a usable prefix name: {NAME_RULE}.", param="name")
        if name == service.base_name:
            raise ServeError(400, f"'{name}' is the backbone's own name; choose another.", param="name")
        data = await request.body()
        if not data:
            raise ServeError(400, "the request body is empty; send the .npz file as the body.", param="file")
        entry, replaced = await asyncio.to_thread(service.upload, name, data)
        return protocol.PrefixUploaded(id=name, prefix_len=entry.prefix.prefix_len, replaced=replaced)

    @app.delete("/v1/prefixes/{name}", response_model=protocol.Deleted)
    async def delete(name: str, authorization: str | None = Header(None)):
        service = state["service"]
        service.require(service.key_of(authorization), admin=True)
        if not await asyncio.to_thread(service.delete, name):
            raise ServeError(404, f"no prefix named '{name}' on this server.", "not_found_error")
        return protocol.Deleted(id=name)

    @app.post("/v1/prefixes/reload", response_model=protocol.ReloadResult)
    async def reload(authorization: str | None = Header(None)):
        """Check every prefix in memory against the store now, rather than at its next recheck."""
        service = state["service"]
        service.require(service.key_of(authorization), admin=True)
        return protocol.ReloadResult(**await asyncio.to_thread(service.registry.recheck))


def _card(service: Service, name: str, stored=None) -> protocol.ModelCard:
    """A model's card: its training summary when the prefix is in memory, else its name and date."""
    entry = service.registry.cached(name)
    if name == service.base_name:
        return protocol.ModelCard(id=name, created=int(service.exported.folder.stat().st_mtime))
    if entry is None:
        return protocol.ModelCard(id=name, created=int(stored.modified) if stored is not None else 0,
                                  parent=service.base_name)
    meta = entry.prefix.meta
    training = {k: meta[k] for k in ("method", "backbone", "steps", "seconds", "data", "template") if k in meta}
    if "losses" in meta:
        training["losses"] = {k: v for k, v in meta["losses"].items() if k != "history"}
    return protocol.ModelCard(id=name, created=entry.created, parent=service.base_name,
                              prefix_len=entry.prefix.prefix_len, training=training or None)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: what comes next is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(service: Service, body, rows: list[Row], prompt_tokens: list[int], events: asyncio.Queue,
                  started: float, request: Request) -> protocol.CompletionResponse:
    """Wait for every row; a client that hangs up meanwhile takes its rows out of the batch."""
    gone = asyncio.create_task(_until_disconnected(request))
    finished = 0
    try:
        while finished < len(rows):
            waiting = asyncio.create_task(events.get())
            done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                for row in rows:
                    row.cancelled.set()
                return Response(status_code=499)
            finished += waiting.result()[0] == "done"
    except asyncio.CancelledError:
        for row in rows:
            row.cancelled.set()
        raise
    finally:
        gone.cancel()
    failed = [r for r in rows if r.finish_reason == "error"]
    if failed:
        raise ServeError(500, f"generation failed: {failed[0].error}", "server_error")
    choices = []
    for index, row in enumerate(rows):
        text, reason = service.text_of(row)
        choices.append(protocol.CompletionChoice(index=index, text=text, finish_reason=reason))
    completion_tokens = sum(len(r.token_ids) for r in rows)
    service.metrics.latency.observe(time.perf_counter() - started)
    return protocol.CompletionResponse(
        model=body.model, choices=choices,
        usage=protocol.Usage(prompt_tokens=sum(prompt_tokens), completion_tokens=completion_tokens,
                             total_tokens=sum(prompt_tokens) + completion_tokens),
    )


async def _stream(service: Service, body, rows: list[Row], events: asyncio.Queue,
                  started: float) -> AsyncIterator[str]:
    sent = [""] * len(rows)
    done = [False] * len(rows)
    response_id = protocol.CompletionResponse(model=body.model, choices=[]).id
    created = int(time.time())

    def chunk(index: int, text: str, reason: str | None) -> str:
        payload = protocol.CompletionResponse(
            id=response_id, created=created, model=body.model,
            choices=[protocol.CompletionChoice(index=index, text=text, finish_reason=reason)])
        return f"data: {payload.model_dump_json()}\n\n"

    try:
        while not all(done):
            kind, index = await events.get()
            row = rows[index]
            if done[index]:
                continue
            if kind == "token":
                text = sendable(service.generator.text(row.token_ids), row.stops)
                if len(text) > len(sent[index]) and text.startswith(sent[index]):
                    delta, sent[index] = text[len(sent[index]):], text
                    yield chunk(index, delta, None)
                continue
            if row.finish_reason == "error":
                failed = protocol.ErrorResponse(error=protocol.ErrorBody(message=f"generation failed: {row.error}",
                                                                         type="server_error"))
                yield f"data: {failed.model_dump_json()}\n\n"
                done[index] = True
                continue
            text, reason = service.text_of(row)
            delta = text[len(sent[index]):] if text.startswith(sent[index]) else ""
            yield chunk(index, delta, reason)
            done[index] = True
        service.metrics.latency.observe(time.perf_counter() - started)
        yield "data: [DONE]\n\n"
    finally:
        if not all(done):  # the client went away: its rows leave the batch
            for row in rows:
                row.cancelled.set()
