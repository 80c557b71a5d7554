"""pt-serve on Ray Serve: N replicas of the whole server, requests routed by prefix.

Two deployments:

- `Replica` (N of them) each runs pt-serve's own application (`app.create_app`): its export,
  its prefix cache over the shared store, its batcher, keys and metrics, exactly as one
  `pt-serve` process. Requests reach it as ASGI calls, and the response comes back in pieces
  (status and headers with the first piece of the body, then the rest), so streams stay streams.
- `Front` (the HTTP ingress) reads a request's body, takes the prefix name from its `model`
  field and calls a replica through Ray Serve's model multiplexing keyed by that name: Ray
  routes a name to a replica that already holds it (each replica registers the names it served
  through a `@serve.multiplexed` loader) and otherwise to the replica holding the fewest. A
  replica that dies before answering is retried on another (twice); then the client gets 503
  with Retry-After; one that dies part-way through a stream cuts that stream. Every answer
  names its replica (`x-prefixkit-replica`) and how many were tried (`x-prefixkit-tries`).

Ray's own routing and replica management do the work; nothing here decides placement.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from typing import Any, AsyncIterator

from .service import ServeConfig

log = logging.getLogger("prefixkit.ray")
RETRIES = 2  # more tries on other replicas when one dies before it answers
REPLICA_HEADER = "x-prefixkit-replica"  # which replica answered
TRIES_HEADER = "x-prefixkit-tries"  # on how many replicas it was tried
SHUTDOWN_S = 60.0  # the longest a stop waits for the replicas to drain


def _deployments(config: ServeConfig, replicas: int, names_per_replica: int):
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class Replica:
        def __init__(self):
            from .app import create_app
            from .service import Service

            self.service = Service(config)
            self.app = create_app(config, self.service)
            self.name = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=names_per_replica)
        async def holds(self, name: str) -> str:
            """Tells Ray's router this replica serves `name` (the prefix itself is in the
            service's cache, which bounds the memory)."""
            return name

        async def forward(self, request: dict) -> AsyncIterator[Any]:
            """Runs one HTTP request through the application; yields (status, headers, the first
            piece of the body), then the body's other pieces."""
            name = serve.get_multiplexed_model_id()
            if name:
                await self.holds(name)
            async for item in _call_asgi(self.app, request, self.name):
                yield item

        def __del__(self):
            self.service.batcher.close(timeout=10)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress()
    class Front:
        def __init__(self, replica):
            self.replica = replica

        def __serve_build_asgi_app__(self):
            return _FrontApp(self.replica)

    return Replica, Front


class _FrontApp:
    """The front's ASGI application: every HTTP request goes to a replica, chosen by prefix."""

    def __init__(self, replica):
        self.replica = replica

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = {"method": scope["method"], "path": scope["path"], "query": scope.get("query_string", b""),
                   "headers": list(scope.get("headers", [])), "body": body}
        await _relay(self.replica, request, _model_of(scope["path"], body), send)


def _model_of(path: str, body: bytes) -> str:
    """The prefix a completion names ("" for other routes, or a body that is not JSON)."""
    if path != "/v1/completions":
        return ""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""
    return model if isinstance(model, str) and 0 < len(model) <= 64 else ""


async def _relay(replica, request: dict, model: str, send) -> None:
    """Calls a replica (another one when the one called dies before answering) and sends its
    answer on; 503 with Retry-After when none answers."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    handle = replica.options(stream=True, multiplexed_model_id=model, method_name="forward")
    for attempt in range(RETRIES + 1):
        started = False
        try:
            async for item in handle.remote(request):
                if not started:
                    status, headers, body = item
                    headers = [*headers, (TRIES_HEADER.encode(), str(attempt + 1).encode())]
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    started = True
                    item = body
                await send({"type": "http.response.body", "body": item, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        except (RayActorError, ActorUnavailableError):
            if started:  # part of the answer went out: the client sees the connection end
                raise
            log.warning("a replica died before answering %s; %s", request["path"],
                        "trying another" if attempt < RETRIES else "giving up")
    payload = json.dumps({"error": {"message": "no replica could answer; retry shortly.", "type": "server_error",
                                    "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _call_asgi(app, request: dict, replica: str) -> AsyncIterator[Any]:
    """One request through an ASGI application, in this process: yields (status, headers, the first
    piece of the body) and then each other piece as the application sends it."""
    messages: asyncio.Queue = asyncio.Queue()
    delivered = False
    never = asyncio.Event()

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await never.wait()  # the client's connection is the front's; it does not hang up here
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"],
             "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query"], "root_path": "", "headers": request["headers"],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}

    async def run():
        try:
            await app(scope, receive, messages.put)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    start = None  # held back until the first piece of the body: the two travel as one item, so a
    # replica that dies between them has sent nothing, and the front can try another
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                start = message["status"], [*message.get("headers", []), (REPLICA_HEADER.encode(), replica.encode())]
            elif message["type"] == "http.response.body" and (message.get("body") or not message.get("more_body")):
                if start is not None:
                    yield (*start, message.get("body", b""))
                    start = None
                elif message.get("body"):
                    yield message["body"]
        if start is not None:
            yield (*start, b"")
        await task
    finally:
        if not task.done():
            task.cancel()


def run(config: ServeConfig, replicas: int, host: str, port: int, names_per_replica: int = 10_000) -> None:
    """Start Ray Serve (joining the cluster at $RAY_ADDRESS, else a local one) with `replicas`
    replicas behind one HTTP front on host:port, and wait for SIGTERM or Ctrl-C."""
    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    Replica, Front = _deployments(config, replicas, names_per_replica)
    serve.run(Front.bind(Replica.bind()), name="prefixkit", route_prefix="/")
    print(f"pt-serve: {replicas} replica(s) on Ray Serve at http://{host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # Ray Serve drains the replicas (each lets its accepted requests finish); a drain that does
    # not end within the bound is cut short by stopping Ray itself.
    drained = threading.Thread(target=serve.shutdown, daemon=True)
    drained.start()
    drained.join(SHUTDOWN_S)
    ray.shutdown()
