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
from .metrics import Metrics
from .registry import PrefixRegistry
from .loader import load

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
        self.registry = PrefixRegistry(self.exported.manifest, config.prefix_dir)
        for name, path in config.prefixes.items():
            self.registry.load(name, path)
        if config.prefix_dir is not None:
            for name, problem in self.registry.reload()["failed"].items():
                print(f"pt-serve: skipped {name}: {problem}", flush=True)
        self.keys = Keys.load(config.keys) if config.keys else None
        self.metrics = Metrics()
        self.batcher = Batcher(
            self.generator, max_rows=config.max_batch_rows, window_s=config.window_ms / 1000,
            max_queue=config.max_queue, batching=config.batching, prefill_chunk=config.prefill_chunk,
            stats=BatchStats(on_batch=self.metrics.observe_batch, on_tokens=self.metrics.tokens.inc),
        )
        self.metrics.watch(lambda: self.batcher.queue_depth, lambda: self.batcher.active_rows,
                           lambda: len(self.registry.names()), lambda: float(self.batcher.alive))
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
        """The batcher's rows for a completion request, and each prompt's token count. CPU work
        (tokenising): the routes call it off the event loop."""
        try:
            settings = request.to_settings(self.config.max_tokens_cap)
        except ValueError as e:
            raise ServeError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None
        prefix = None
        if request.model != self.base_name:
            entry = self.registry.get(request.model)
            if entry is None:
                raise ServeError(404, f"no prefix named '{request.model}' on this server.", "not_found_error",
                                 param="model")
            prefix = entry.prefix
        rows, prompt_tokens = [], []
        for text in request.prompts():
            try:
                prompt = self.generator.prepare(prefix, text, request.max_tokens, request.stops())
            except ValueError as e:
                raise ServeError(400, str(e), param="prompt") from None
            rows.append(Row(prefix, prompt.ids, settings, prompt.stops))
            prompt_tokens.append(len(prompt.ids))
        return rows, prompt_tokens

    def text_of(self, row: Row) -> tuple[str, str]:
        """The row's text, cut at its stop strings, and OpenAI's finish_reason for it."""
        done = self.generator.completion(Generation(row.token_ids), row.stops, None, len(row.prompt_ids))
        return done.text, "length" if done.finish_reason == "length" else "stop"
