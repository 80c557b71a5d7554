"""pt-serve: one exported backbone, many users' prefixes, batched together (paper, section 8).

The command line. The wire format lives in `protocol.py`, the routes in `app.py`, what they
share in `service.py`, the prefixes in `store.py` and `registry.py`, the keys in `keys.py`, the metrics in
`metrics.py` and the batching in `batching.py`.
"""

from __future__ import annotations

from pathlib import Path

import click

from .app import create_app
from .cli_options import Renamed
from .keys import Keys, KeysError
from .prefix import PrefixFileError
from .registry import NAME_RULE, valid_name
from .manifest import ManifestError
from .service import ServeConfig, Service
from .store import StoreUnavailable


def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP/1.1 protocol (h11) with a limit on receiving a request's headers: a
    connection that sends none, or part of them, within `seconds` is closed. uvicorn itself
    only times out idle keep-alive connections after a response."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in; the body has the app's read timeout

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def _prefix_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        path, name = value, Path(value).stem
    return name, Path(path)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--export", "backbone", cls=Renamed, old=("--backbone",),
              type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="An export folder made by pt-export; its folder name is the model name for no prefix.")
@click.option("--prefix", "prefixes", multiple=True, metavar="[NAME=]FILE",
              help="A prefix to serve (repeatable); NAME defaults to the file name without .npz.")
@click.option("--prefix-dir", default=None, metavar="DIR|s3://BUCKET/PATH",
              help="The prefix store, a folder or an S3 location: NAME.npz is read on NAME's first request; "
                   "uploads are kept here.")
@click.option("--prefix-cache-mb", type=click.IntRange(1), default=1024,
              help="Memory for prefixes read from --prefix-dir; the least recently used go first.")
@click.option("--prefix-recheck", "prefix_recheck", cls=Renamed, old=("--reload-interval",),
              type=click.FloatRange(0), default=1.0,
              help="Seconds a prefix in memory is served before its file's version is checked again.")
@click.option("--metrics-prefixes", type=click.IntRange(0), default=100,
              help="Prefixes named in the per-prefix metrics (the busiest); the rest count as 'other'.")
@click.option("--keys", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="API keys JSON: which prefixes each key may use, and admin keys (see the README).")
@click.option("--host", default="127.0.0.1")
@click.option("--port", type=int, default=8000)
@click.option("--batch-window-ms", type=click.FloatRange(0), default=10.0, help="How long a new batch waits for more requests.")
@click.option("--max-batch-rows", type=click.IntRange(1), default=32, help="Rows decoded together at most.")
@click.option("--max-queue", type=click.IntRange(1), default=256, help="Rows waiting at most; beyond it requests get 429.")
@click.option("--max-tokens-cap", type=click.IntRange(1), default=256, help="The largest max_tokens a request may ask for.")
@click.option("--prefill-chunk", type=click.IntRange(2), default=256,
              help="Prompt tokens prefilled in one go at most; a longer prompt goes in chunks between decode steps.")
@click.option("--max-request-kb", type=click.IntRange(1), default=1024, help="The largest completion request body.")
@click.option("--max-upload-mb", type=click.IntRange(1), default=64, help="The largest prefix file an admin may upload.")
@click.option("--read-timeout", type=click.FloatRange(0.1), default=30.0,
              help="Seconds a client has to send a request's headers, and again its body.")
@click.option("--no-batching", is_flag=True, help="One request at a time (for comparison).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads [default: all cores].")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run --replicas replicas on Ray Serve, routed by prefix ($RAY_ADDRESS: an existing cluster).")
@click.option("--replicas", type=click.IntRange(1), default=2, help="With --ray: how many replicas.")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider, in order of preference (repeatable; default: "
                   "$PREFIXKIT_PROVIDERS, else CPUExecutionProvider). CUDA and TensorRT need prefixkit[gpu].")
def main(backbone, prefixes, prefix_dir, prefix_cache_mb, prefix_recheck, metrics_prefixes, keys, host, port, batch_window_ms, max_batch_rows, max_queue,
         max_tokens_cap, prefill_chunk, max_request_kb, max_upload_mb, read_timeout, no_batching, threads,
         on_ray, replicas, providers):
    """Serve generation with many users' prefixes over one exported backbone (OpenAI-compatible).

    \b
    pt-serve --export exports/smollm2-135m --prefix user42.npz --prefix-dir prefixes/
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "user42", "prompt": "name : Aromi | Type : pub", "max_tokens": 40, "temperature": 0}'
    """
    import uvicorn

    named = dict(_prefix_arg(p) for p in prefixes)
    if prefix_dir is not None and not prefix_dir.startswith("s3://"):
        if Path(prefix_dir).exists() and not Path(prefix_dir).is_dir():
            raise click.BadParameter(f"{prefix_dir} is a file; give a folder or s3://BUCKET/PATH.",
                                     param_hint="--prefix-dir")
        Path(prefix_dir).mkdir(parents=True, exist_ok=True)
    config = ServeConfig(
        backbone=backbone, prefixes=named, prefix_dir=prefix_dir, keys=keys, batching=not no_batching,
        window_ms=batch_window_ms, max_batch_rows=max_batch_rows, max_queue=max_queue,
        max_tokens_cap=max_tokens_cap, threads=threads, prefix_cache_mb=prefix_cache_mb,
        prefix_recheck=prefix_recheck, metrics_prefixes=metrics_prefixes,
        providers=tuple(providers) or None, prefill_chunk=prefill_chunk, max_request_kb=max_request_kb,
        max_upload_mb=max_upload_mb, read_timeout=read_timeout,
    )
    _check(config)
    if on_ray:
        try:
            import ray.serve  # noqa: F401
        except ImportError:
            raise click.ClickException("--ray needs Ray Serve: pip install 'prefixkit[ray]'.") from None
        from .ray_serve import run

        return run(config, replicas, host, port)
    try:  # the export loads before the port is bound: a damaged one is one sentence, not a traceback
        service = Service(config)
    except (PrefixFileError, ManifestError, KeysError, StoreUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pt-serve: {backbone.resolve().name} with {len(named)} prefix(es)"
               f"{' and the store ' + str(prefix_dir) if prefix_dir else ''} on http://{host}:{port}", err=True)
    uvicorn.run(create_app(config, service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60,
                http=header_timeout_protocol(read_timeout))


def _check(config: ServeConfig) -> None:
    """Refuse to start, in one sentence and before the export is loaded, on a bad keys file or
    --prefix name (the prefixes themselves are read once, by the service)."""
    for name, path in config.prefixes.items():
        if not valid_name(name):
            raise click.UsageError(f"--prefix {name}={path}: a name has {NAME_RULE}.")
    if config.keys:
        try:
            Keys.load(config.keys)
        except KeysError as e:
            raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
