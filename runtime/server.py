"""pt-serve: one exported backbone, many users' prefixes, batched together (paper, section 8).

FastAPI + uvicorn. The wire format lives in `protocol.py`, the batching in `batching.py`; this
module holds the prefix registry, API keys, metrics, the HTTP routes and the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import click
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import protocol
from .batching import Batcher, BatchStats, QueueFull, Row
from .files import atomic_write
from .generate import Generation, GenerationSettings
from .prefix import Prefix, PrefixFileError, load_prefix
from .seq2seq import open_backbone
from .session import ExportedBackbone
from .template import apply_template

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeError(Exception):
    """An expected problem with a request: HTTP status, OpenAI error type, one sentence."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers, param


# -- prefixes ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Entry:
    prefix: Prefix
    path: Path | None
    mtime: float | None
    from_dir: bool
    created: int


class PrefixRegistry:
    """Named prefixes checked against the backbone: from --prefix files, a --prefix-dir that is
    rescanned, and uploads (kept in the directory when there is one)."""

    def __init__(self, exported: ExportedBackbone, directory: Path | None = None):
        self.manifest = exported.manifest
        self.directory = directory
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def load(self, name: str, path: Path, from_dir: bool = False) -> Entry:
        if not NAME.match(name):
            raise PrefixFileError(f"{path}: '{name}' is not a usable prefix name (letters, digits, . _ -).")
        prefix = load_prefix(path, architecture=self.manifest.architecture, fingerprint=self.manifest.fingerprint)
        stat = path.stat()
        entry = Entry(prefix, path, stat.st_mtime, from_dir, _created(prefix, stat.st_mtime))
        with self._lock:
            self._entries[name] = entry
        return entry

    def reload(self) -> dict[str, Any]:
        """Rescan the directory: new files appear, changed ones are reloaded, removed ones go."""
        result: dict[str, Any] = {"added": [], "removed": [], "updated": [], "failed": {}}
        if self.directory is None:
            return result
        found = {p.stem: p for p in sorted(self.directory.glob("*.npz")) if not p.name.startswith(".")}
        with self._lock:
            current = {n: e for n, e in self._entries.items() if e.from_dir}
        for name, path in found.items():
            entry = current.get(name)
            try:
                if entry is None:
                    if self.get(name) is None:  # a --prefix of the same name wins
                        self.load(name, path, from_dir=True)
                        result["added"].append(name)
                elif path.stat().st_mtime != entry.mtime:
                    self.load(name, path, from_dir=True)
                    result["updated"].append(name)
            except (PrefixFileError, OSError) as e:
                result["failed"][name] = str(e)
        with self._lock:
            for name in current:
                if name not in found:
                    del self._entries[name]
                    result["removed"].append(name)
        return result

    def upload(self, name: str, data: bytes) -> tuple[Entry, bool]:
        if not NAME.match(name):
            raise ServeError(400, f"'{name}' is not a usable prefix name: 1-64 letters, digits, '.', '_' or '-'.",
                             param="name")
        replaced = self.get(name) is not None
        folder = self.directory or Path(tempfile.gettempdir())
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                load_prefix(tmp, architecture=self.manifest.architecture, fingerprint=self.manifest.fingerprint)
            except PrefixFileError as e:
                raise ServeError(400, str(e).replace(tmp, "the uploaded file"), param="file") from None
            if self.directory is None:
                entry = self.load(name, Path(tmp))
                entry.path = None  # held in memory only; the temporary file goes
                return entry, replaced
            target = self.directory / f"{name}.npz"
            with atomic_write(target) as f:
                f.write(data)
            return self.load(name, target, from_dir=True), replaced
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def delete(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        if entry.from_dir and entry.path is not None:
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
        return True


def _created(prefix: Prefix, mtime: float) -> int:
    import datetime

    try:
        return int(datetime.datetime.fromisoformat(prefix.meta["created"]).timestamp())
    except (KeyError, TypeError, ValueError):
        return int(mtime)


# -- access --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Keys:
    """API keys from a JSON file: {"keys": [{"key": "...", "prefixes": ["user42", ...]},
    {"key": "...", "admin": true}]}. "*" in prefixes covers every prefix and the base model;
    an admin key may use everything and manage prefixes."""

    allowed: dict[str, set[str]]
    admins: set[str]

    @classmethod
    def load(cls, path: Path) -> "Keys":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            allowed, admins = {}, set()
            for item in data["keys"]:
                key = str(item["key"])
                if len(key) < 8:
                    raise ValueError("every key needs at least 8 characters")
                allowed[key] = set(item.get("prefixes", []))
                if item.get("admin"):
                    admins.add(key)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.UsageError(
                f"--keys {path}: expected JSON like {{\"keys\": [{{\"key\": \"...\", \"prefixes\": [\"user42\"]}}, "
                f"{{\"key\": \"...\", \"admin\": true}}]}} ({e})."
            ) from None
        return cls(allowed, admins)

    def may_use(self, key: str | None, model: str) -> bool:
        if key in self.admins:
            return True
        names = self.allowed.get(key or "")
        return names is not None and ("*" in names or model in names)


# -- metrics -------------------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("prefixkit_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.batch_rows = Histogram("prefixkit_batch_rows", "Rows in each forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_prefixes = Histogram("prefixkit_batch_prefixes",
                                        "Different prefixes (users) in each forward pass, the bare backbone as one",
                                        buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.latency = Histogram("prefixkit_request_latency_seconds", "Completion latency, end to end",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.tokens = Counter("prefixkit_tokens_generated", "Tokens generated", registry=self.registry)
        self.queue_depth = Gauge("prefixkit_queue_depth", "Rows waiting to start", registry=self.registry)
        self.active_rows = Gauge("prefixkit_active_rows", "Rows being decoded", registry=self.registry)
        self.prefixes = Gauge("prefixkit_prefixes", "Prefixes loaded", registry=self.registry)

    def observe_batch(self, rows: int, prefixes: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_prefixes.observe(prefixes)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- the application -----------------------------------------------------------------------------
@dataclasses.dataclass
class ServeConfig:
    backbone: Path
    prefixes: dict[str, Path] = dataclasses.field(default_factory=dict)
    prefix_dir: Path | None = None
    keys: Path | None = None
    batching: bool = True
    window_ms: float = 10.0
    max_batch_rows: int = 32
    max_queue: int = 256
    max_tokens_cap: int = 256
    threads: int | None = None
    reload_interval: float = 5.0
    providers: tuple[str, ...] | None = None  # None: $PREFIXKIT_PROVIDERS, else the CPU


class Service:
    """Everything the routes share, built once per server."""

    def __init__(self, config: ServeConfig):
        self.config = config
        # decoder-only or encoder-decoder: the generator for the export's graphs
        self.exported, self.generator = open_backbone(config.backbone, providers=config.providers,
                                                      threads=config.threads)
        self.base_name = Path(config.backbone).resolve().name
        self.registry = PrefixRegistry(self.exported, config.prefix_dir)
        for name, path in config.prefixes.items():
            self.registry.load(name, path)
        if config.prefix_dir is not None:
            failed = self.registry.reload()["failed"]
            for name, problem in failed.items():
                print(f"pt-serve: skipped {name}: {problem}", flush=True)
        self.keys = Keys.load(config.keys) if config.keys else None
        self.metrics = Metrics()
        self.metrics.queue_depth.set_function(lambda: self.batcher.queue_depth)
        self.metrics.active_rows.set_function(lambda: self.batcher.active_rows)
        self.metrics.prefixes.set_function(lambda: len(self.registry.names()))
        self.batcher = Batcher(
            self.generator, max_rows=config.max_batch_rows, window_s=config.window_ms / 1000,
            max_queue=config.max_queue, batching=config.batching,
            stats=BatchStats(on_batch=self.metrics.observe_batch, on_tokens=self.metrics.tokens.inc),
        )
        self.closing = False

    # access
    def key_of(self, authorization: str | None) -> str | None:
        if authorization and authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        return None

    def require(self, key: str | None, model: str | None = None, admin: bool = False) -> None:
        if self.keys is None:
            return
        if key is None or (key not in self.keys.allowed):
            raise ServeError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'.",
                             "authentication_error")
        if admin and key not in self.keys.admins:
            raise ServeError(403, "this key may not manage prefixes; use an admin key.", "permission_error")
        if model is not None and not self.keys.may_use(key, model):
            raise ServeError(403, f"this key may not use model '{model}'.", "permission_error", param="model")

    def visible(self, key: str | None) -> list[str]:
        names = [self.base_name] + self.registry.names()
        if self.keys is None:
            return names
        return [n for n in names if self.keys.may_use(key, n)]

    # requests
    def rows_for(self, request) -> tuple[list[Row], list[int]]:
        config = self.config
        if request.n != 1:
            raise ServeError(400, "n must be 1: ask for several prompts in a list instead.", param="n")
        if request.max_tokens > config.max_tokens_cap:
            raise ServeError(400, f"max_tokens is {request.max_tokens}; this server allows at most "
                                  f"{config.max_tokens_cap}.", param="max_tokens")
        if request.stream and request.num_beams > 1:
            raise ServeError(400, "stream works with greedy and sampling; set num_beams to 1 or stream false.",
                             param="stream")
        prefix = None
        if request.model != self.base_name:
            entry = self.registry.get(request.model)
            if entry is None:
                raise ServeError(404, f"no prefix named '{request.model}' on this server.", "not_found_error",
                                 param="model")
            prefix = entry.prefix
        meta = prefix.meta if prefix is not None else {}
        sample = request.temperature > 0 and request.num_beams == 1
        try:
            settings = GenerationSettings(
                max_new_tokens=request.max_tokens, min_new_tokens=min(request.min_tokens, request.max_tokens),
                num_beams=request.num_beams, length_penalty=request.length_penalty,
                no_repeat_ngram_size=request.no_repeat_ngram_size, do_sample=sample,
                temperature=request.temperature if sample else 1.0, top_p=request.top_p if sample else 1.0,
                seed=request.seed,
            ).check()
        except ValueError as e:
            raise ServeError(400, str(e)) from None
        stops = tuple(s for s in request.stops() + tuple(meta.get("stop", ())) if s)
        rows, prompt_tokens = [], []
        for text in request.prompts():
            ids = self.generator.tokenizer.encode(apply_template(meta.get("template"), text)).ids
            try:
                self.generator.check_length(0 if prefix is None else prefix.prefix_len, len(ids), request.max_tokens)
            except ValueError as e:
                raise ServeError(400, str(e), param="prompt") from None
            rows.append(Row(prefix, ids, settings, stops))
            prompt_tokens.append(len(ids))
        if not rows:
            raise ServeError(400, "prompt is an empty list.", param="prompt")
        return rows, prompt_tokens

    def text_of(self, row: Row) -> tuple[str, str]:
        """The row's text, cut at its stop strings, and OpenAI's finish_reason for it."""
        done = self.generator.completion(Generation(row.token_ids), row.stops, None, len(row.prompt_ids))
        return done.text, "length" if done.finish_reason == "length" else "stop"


def create_app(config: ServeConfig):
    state: dict[str, Service] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service = Service(config)
        state["service"] = service
        watcher = None
        if config.prefix_dir is not None and config.reload_interval > 0:
            watcher = asyncio.create_task(_watch(service))
        yield
        service.closing = True
        if watcher is not None:
            watcher.cancel()
        await asyncio.to_thread(service.batcher.close)

    async def _watch(service: Service):
        while True:
            await asyncio.sleep(config.reload_interval)
            await asyncio.to_thread(service.registry.reload)

    app = FastAPI(title="prefixkit", lifespan=lifespan)

    def error(status: int, message: str, kind: str, headers=None, param=None):
        body = protocol.ErrorResponse(error=protocol.ErrorBody(message=message, type=kind, param=param))
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return error(e.status, e.message, e.kind, e.headers, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return error(400, "invalid request: " + "; ".join(problems) + ".", "invalid_request_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        service = state.get("service")
        if service is not None:
            service.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        service = state["service"]
        status = "shutting down" if service.closing else "ok"
        return JSONResponse({"status": status, "backbone": service.base_name,
                             "prefixes": len(service.registry.names()),
                             "queue_depth": service.batcher.queue_depth},
                            status_code=503 if service.closing else 200)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state["service"].metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def models(authorization: str | None = Header(None)):
        service = state["service"]
        key = service.key_of(authorization)
        service.require(key)
        cards = []
        for name in service.visible(key):
            entry = service.registry.get(name)
            if name == service.base_name or entry is None:
                cards.append(protocol.ModelCard(id=name, created=int(service.exported.folder.stat().st_mtime)))
                continue
            meta = entry.prefix.meta
            training = {k: meta[k] for k in ("method", "backbone", "steps", "seconds", "data", "template")
                        if k in meta}
            if "losses" in meta:
                training["losses"] = {k: v for k, v in meta["losses"].items() if k != "history"}
            cards.append(protocol.ModelCard(id=name, created=entry.created, prefix_len=entry.prefix.prefix_len,
                                            training=training or None))
        return protocol.ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request,
                          authorization: str | None = Header(None)):
        service = state["service"]
        if service.closing:
            raise ServeError(503, "the server is shutting down.", "server_error")
        service.require(service.key_of(authorization), model=body.model)
        rows, prompt_tokens = service.rows_for(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            row.on_done = lambda r, i=index: loop.call_soon_threadsafe(events.put_nowait, ("done", i))
            if body.stream:
                row.on_token = lambda r, i=index: loop.call_soon_threadsafe(events.put_nowait, ("token", i))
        started = time.perf_counter()
        try:
            service.batcher.submit(rows)
        except QueueFull as e:
            raise ServeError(429, f"the server is busy: {e} Retry shortly.", "rate_limit_error",
                             headers={"Retry-After": "1"}) from None
        if body.stream:
            return StreamingResponse(_stream(service, body, rows, events, started, request),
                                     media_type="text/event-stream")
        finished = 0
        try:
            while finished < len(rows):
                try:
                    kind, _ = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        for row in rows:
                            row.cancelled.set()
                        return Response(status_code=499)
                    continue
                finished += kind == "done"
        except asyncio.CancelledError:
            for row in rows:
                row.cancelled.set()
            raise
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

    async def _stream(service: Service, body, rows: list[Row], events: asyncio.Queue, started: float,
                      request: Request) -> AsyncIterator[str]:
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
                    text = _safe_prefix(service.generator.tokenizer.decode(list(row.token_ids),
                                                                           skip_special_tokens=True), row.stops)
                    if len(text) > len(sent[index]) and text.startswith(sent[index]):
                        delta, sent[index] = text[len(sent[index]):], text
                        yield chunk(index, delta, None)
                    continue
                if row.finish_reason == "error":
                    yield f"data: {json.dumps({'error': {'message': row.error, 'type': 'server_error'}})}\n\n"
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

    @app.post("/v1/prefixes", response_model=protocol.PrefixUploaded)
    async def upload(request: Request, name: str, authorization: str | None = Header(None)):
        service = state["service"]
        service.require(service.key_of(authorization), admin=True)
        if name == service.base_name:
            raise ServeError(400, f"'{name}' is the backbone's own name; choose another.", param="name")
        data = await request.body()
        if not data:
            raise ServeError(400, "the request body is empty; send the .npz file as the body.", param="file")
        entry, replaced = await asyncio.to_thread(service.registry.upload, name, data)
        return protocol.PrefixUploaded(id=name, prefix_len=entry.prefix.prefix_len, replaced=replaced)

    @app.delete("/v1/prefixes/{name}")
    async def delete(name: str, authorization: str | None = Header(None)):
        service = state["service"]
        service.require(service.key_of(authorization), admin=True)
        if not service.registry.delete(name):
            raise ServeError(404, f"no prefix named '{name}' on this server.", "not_found_error")
        return {"id": name, "deleted": True}

    @app.post("/v1/prefixes/reload", response_model=protocol.ReloadResult)
    async def reload(authorization: str | None = Header(None)):
        service = state["service"]
        service.require(service.key_of(authorization), admin=True)
        if service.config.prefix_dir is None:
            raise ServeError(400, "this server has no --prefix-dir to reload from.")
        return protocol.ReloadResult(**await asyncio.to_thread(service.registry.reload))

    return app


def _safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of the text so far that can be sent: before any stop string, without a trailing
    incomplete character, and holding back an ending that may grow into a stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        return text[:cut]
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


# -- command line --------------------------------------------------------------------------------
def _prefix_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        path, name = value, Path(value).stem
    return name, Path(path)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--backbone", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="An export folder made by pt-export; its folder name is the model name for no prefix.")
@click.option("--prefix", "prefixes", multiple=True, metavar="[NAME=]FILE",
              help="A prefix to serve (repeatable); NAME defaults to the file name without .npz.")
@click.option("--prefix-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Serve every .npz here; rescanned, and where uploads are kept.")
@click.option("--keys", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="API keys JSON: which prefixes each key may use, and admin keys (see the README).")
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=int, default=8000)
@click.option("--batch-window-ms", type=float, default=10.0, help="How long a new batch waits for more requests.")
@click.option("--max-batch-rows", type=int, default=32, help="Rows decoded together at most.")
@click.option("--max-queue", type=int, default=256, help="Rows waiting at most; beyond it requests get 429.")
@click.option("--max-tokens-cap", type=int, default=256, help="The largest max_tokens a request may ask for.")
@click.option("--no-batching", is_flag=True, help="One request at a time (for comparison).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: all cores].")
@click.option("--reload-interval", type=float, default=5.0, help="Seconds between --prefix-dir rescans (0: only on request).")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider, in order of preference (repeatable; default: "
                   "$PREFIXKIT_PROVIDERS, else CPUExecutionProvider). CUDA and TensorRT need prefixkit[gpu].")
def main(backbone, prefixes, prefix_dir, keys, host, port, batch_window_ms, max_batch_rows, max_queue,
         max_tokens_cap, no_batching, threads, reload_interval, providers):
    """Serve generation with many users' prefixes over one exported backbone (OpenAI-compatible).

    \b
    pt-serve --backbone exports/smollm2-135m --prefix user42.npz --prefix-dir prefixes/
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "user42", "prompt": "name : Aromi | Type : pub", "max_tokens": 40, "temperature": 0}'
    """
    import uvicorn

    named = dict(_prefix_arg(p) for p in prefixes)
    if prefix_dir is not None:
        prefix_dir.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(
        backbone=backbone, prefixes=named, prefix_dir=prefix_dir, keys=keys, batching=not no_batching,
        window_ms=batch_window_ms, max_batch_rows=max_batch_rows, max_queue=max_queue,
        max_tokens_cap=max_tokens_cap, threads=threads, reload_interval=reload_interval, providers=tuple(providers) or None,
    )
    from .manifest import ManifestError, load_manifest

    try:  # fail before binding the port, in one sentence
        Keys.load(keys) if keys else None
        manifest = load_manifest(backbone)
        for name, path in named.items():
            if not NAME.match(name):
                raise click.UsageError(f"--prefix {name}={path}: a name has 1-64 letters, digits, '.', '_' or '-'.")
            load_prefix(path, architecture=manifest.architecture, fingerprint=manifest.fingerprint)
    except (PrefixFileError, ManifestError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pt-serve: {backbone.resolve().name} with {len(named)} prefix(es)"
               f"{' and ' + str(prefix_dir) if prefix_dir else ''} on http://{host}:{port}", err=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


if __name__ == "__main__":
    main()
