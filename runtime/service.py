"""What pt-serve's routes share, built once per server: the backbone and its generator, the
prefixes, the keys, the metrics and the batcher; and the two conversions between a request
and the batcher's rows."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .batching import Batcher, BatchStats, Row
from .generate import Generation
from .keys import Keys
from .loader import load
from .metrics import Metrics, PrefixCounts
from .prefix import PrefixFileError
from .registry import Entry, FixedPrefix, PrefixRegistry, UnknownPrefix, valid_name
from .store import MemoryStore, StoreUnavailable, open_store

log = logging.getLogger("prefixkit.server")


class ServeError(Exception):
    """An expected problem with a request: HTTP status, OpenAI error type, one sentence."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers, param


@dataclasses.dataclass
class ServeConfig:
    backbone: Path
    prefixes: dict[str, Path] = dataclasses.field(default_factory=dict)
    prefix_dir: str | Path | None = None  # a folder, or s3://BUCKET/PATH
    keys: Path | None = None
    batching: bool = True
    window_ms: float = 10.0
    max_batch_rows: int = 32
    max_queue: int = 256
    max_tokens_cap: int = 256
    threads: int | None = None
    prefix_cache_mb: int = 1024  # prefixes read from the store and kept in memory, at most
    prefix_recheck: float = 1.0  # seconds a prefix in memory is served before its version is checked again
    metrics_prefixes: int = 100  # prefixes named in the per-prefix metrics; the rest are "other"
    providers: tuple[str, ...] | None = None  # None: $PREFIXKIT_PROVIDERS, else the CPU
    prefill_chunk: int = 256  # prompt tokens prefilled in one go at most; longer ones go in chunks
    max_request_kb: int = 1024  # a completion request's body
    max_upload_mb: int = 64  # an uploaded prefix file
    read_timeout: float = 30.0  # seconds to receive a request's headers, and its body


class Service:
    """Everything the routes share, built once per server."""

    def __init__(self, config: ServeConfig):
        self.config = config
        # decoder-only or encoder-decoder: the generator for the export's graphs
        self.generator = load(config.backbone, providers=config.providers, threads=config.threads)
        self.exported = self.generator.exported
        self.base_name = Path(config.backbone).resolve().name
        store = open_store(config.prefix_dir, valid_name) if config.prefix_dir is not None else MemoryStore()
        self.per_prefix = PrefixCounts(labels=config.metrics_prefixes)
        self.registry = PrefixRegistry(self.exported.manifest, store, max_bytes=config.prefix_cache_mb << 20,
                                       recheck_s=config.prefix_recheck,
                                       on_load=lambda name: self.per_prefix.count(name, loads=1))
        for name, path in config.prefixes.items():
            self.registry.add_fixed(name, path)
        self.keys = Keys.load(config.keys) if config.keys else None
        self.metrics = Metrics()
        self.batcher = Batcher(
            self.generator, max_rows=config.max_batch_rows, window_s=config.window_ms / 1000,
            max_queue=config.max_queue, batching=config.batching, prefill_chunk=config.prefill_chunk,
            stats=BatchStats(on_batch=self.metrics.observe_batch, on_tokens=self.metrics.tokens.inc),
        )
        self.metrics.watch(lambda: self.batcher.queue_depth, lambda: self.batcher.active_rows,
                           lambda: self.registry.in_memory, lambda: float(self.batcher.alive))
        self.metrics.watch_prefixes(self.per_prefix, self.registry)
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

    def models_page(self, key: str | None, after: str | None, limit: int) -> tuple[list[str], dict, bool]:
        """One page of the model names this key may use, in order: the backbone's own name and the
        --prefix files on the first page, then the store's names after `after`. Returns the names,
        the store's entry for each name from the store, and whether more follow."""
        first = [] if after is not None else [self.base_name, *self.registry.fixed_names()]
        stored = self.registry.page(after, limit + 1)
        more = len(stored) > limit
        stored = [s for s in stored[:limit] if s.name not in first]
        names = first + [s.name for s in stored]
        if self.keys is not None:
            names = [n for n in names if self.keys.may_use(key, n)]
        return names, {s.name: s for s in stored}, more

    def prefix(self, name: str) -> Entry:
        """The prefix a request names, as the API's errors: 404 unknown, 422 a bad file in the store,
        503 the store cannot be read."""
        try:
            return self.registry.get(name)
        except UnknownPrefix:
            raise ServeError(404, f"no prefix named '{name}' on this server.", "not_found_error",
                             param="model") from None
        except PrefixFileError as e:
            raise ServeError(422, f"the prefix '{name}' cannot be used: {e}", param="model") from None
        except StoreUnavailable as e:
            raise ServeError(503, f"the prefix '{name}' cannot be read now: {e}", "server_error") from None

    def upload(self, name: str, data: bytes) -> tuple[Entry, bool]:
        try:
            return self.registry.upload(name, data)
        except (PrefixFileError, FixedPrefix) as e:
            raise ServeError(400, str(e), param="file" if isinstance(e, PrefixFileError) else "name") from None

    def delete(self, name: str) -> bool:
        try:
            return self.registry.delete(name)
        except FixedPrefix as e:
            raise ServeError(400, str(e), param="name") from None

    # requests
    def rows_for(self, request) -> tuple[list[Row], list[int], Entry | None]:
        """The batcher's rows for a completion request, each prompt's token count and the prefix's
        entry. Reads the prefix from the store on its first request and tokenises: the routes call
        it off the event loop, so a cold load never holds up the decode loop."""
        try:
            settings = request.to_settings(self.config.max_tokens_cap)
        except ValueError as e:
            raise ServeError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None
        entry = None if request.model == self.base_name else self.prefix(request.model)
        prefix = None if entry is None else entry.prefix
        rows, prompt_tokens = [], []
        for text in request.prompts():
            try:
                prompt = self.generator.prepare(prefix, text, request.max_tokens, request.stops())
            except ValueError as e:
                raise ServeError(400, str(e), param="prompt") from None
            rows.append(Row(prefix, prompt.ids, settings, prompt.stops))
            prompt_tokens.append(len(prompt.ids))
        return rows, prompt_tokens, entry

    def submit(self, model: str, rows: list[Row], entry: Entry | None) -> None:
        """Queue a request's rows. Its prefix stays in memory until the last row is done, and the
        per-prefix metrics count the request and its tokens. Raises the batcher's refusals."""
        if entry is not None:
            self.registry.pin(entry, len(rows))
        for row in rows:
            row.on_done = self._done_callback(model, entry, row.on_done)
        try:
            self.batcher.submit(rows)
        except BaseException:
            if entry is not None:
                for _ in rows:
                    self.registry.unpin(entry)
            raise
        self.per_prefix.count(model, requests=1)

    def _done_callback(self, model: str, entry: Entry | None, then):
        def done(row: Row) -> None:
            try:
                if entry is not None:
                    self.registry.unpin(entry)
                self.per_prefix.count(model, tokens=len(row.token_ids))
            finally:
                if then is not None:
                    then(row)
        return done

    def text_of(self, row: Row) -> tuple[str, str]:
        """The row's text, cut at its stop strings, and OpenAI's finish_reason for it."""
        done = self.generator.completion(Generation(row.token_ids), row.stops, None, len(row.prompt_ids))
        return done.text, "length" if done.finish_reason == "length" else "stop"
