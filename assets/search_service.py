"""The warm search service: an HTTP JSON API over the declared tables that keeps each table's query
model loaded and a few database connections open, so a search costs the query's embedding and the
SQL, not the seconds of loading a model. `vectorsync serve` runs it (orchestration/cli.py); this
module is the Dagster-free ASGI app (Starlette, served by uvicorn: the stack Dagster's webserver
already installs), and assets/search_client.py is how other processes find and call it.

    POST /search  {"table", "query", "k": 5, "hybrid": false, "where": {}, "fingerprint",
                   "rrf_k", "candidates", "text_match", "vector_weight", "text_weight", "absent_rank"}
               -> {"hits": [{"key", "score", "chunk", "row", "vector_rank", "text_rank",
                             "vector_distance", "text_score"}], "ms": {"embed", "sql"}}
    POST /embed   {"table", "query", "fingerprint"} -> {"vector": [...]}
    GET  /health  -> {"status": "ok", "tables": [...], "pid", "query_embedding": {table: "direct"}}

A request naming a table the service does not declare answers 404; one whose `fingerprint` (the
caller's declaration of the table) differs from the service's answers 409: the caller then embeds
with its own model instead of getting vectors from another one. A bad request answers 400 with the
table and field at fault, as assets.search.SearchError names them.

It listens on 127.0.0.1 only: it answers anyone who can connect, with the rights of its database
role, so it is for this machine's users, like the embedded database it usually serves.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .catalog import ResolvedTable, resolve
from .providers import provider_for
from .query_embedding import QueryEmbedder
from .search import Fusion, SearchError, VersionSwitched, run_search
from .search_client import STATE_FILE, database_identity
from .spec import TableSpec
from .versions import installed_spec

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
FUSION_FIELDS = ("rrf_k", "candidates", "text_match", "vector_weight", "text_weight", "absent_rank")


class RequestError(Exception):
    def __init__(self, status: int, message: str, table: str = "", field: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.table, self.field = status, message, table, field


class SearchService:
    """The declared tables, their providers and a connection pool; one per process."""

    def __init__(self, specs: list[tuple[TableSpec, str]], url: str, connections: int = 4) -> None:
        self.specs = {spec.name: (spec, origin) for spec, origin in specs}
        # register_vector once per connection, not per query: it looks the type up in the catalog.
        self.pool = ConnectionPool(url, min_size=1, max_size=connections, open=True,
                                   kwargs={"autocommit": True}, configure=register_vector)
        self._resolved: dict[str, ResolvedTable] = {}
        # Each table's active model version, as the database had it when last looked at; looked
        # at again when a search finds it switched (VersionSwitched), not on every query.
        self._active: dict[str, ResolvedTable] = {}
        self._embedders: dict[Any, QueryEmbedder] = {}
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Load every table's model and run it once (torch's first call is slow), before the
        service says it is ready."""
        for spec, _ in self.specs.values():
            self._embedder(spec).embed("warm up")  # the declared model: the next active one
            self.table({"table": spec.name})[1].embed("warm up")  # the active one

    def _embedder(self, spec: TableSpec) -> QueryEmbedder:
        with self._lock:  # one per model: tables that share a model share its embedder
            if spec.provider not in self._embedders:
                self._embedders[spec.provider] = QueryEmbedder(provider_for(spec.provider))
            return self._embedders[spec.provider]

    def close(self) -> None:
        self.pool.close()

    def table(self, body: dict[str, Any], refresh: bool = False) -> tuple[ResolvedTable, QueryEmbedder]:
        """The table's active version and the embedder of its model."""
        name = body.get("table")
        if not isinstance(name, str) or name not in self.specs:
            raise RequestError(404, f"no table named {name!r} is declared here", str(name), "table")
        spec, origin = self.specs[name]
        with self._lock:
            if name not in self._resolved:
                # Resolved once: the catalog lookups would otherwise cost more than the search.
                with self.pool.connection() as conn:
                    self._resolved[name] = resolve(conn, spec, origin)
            if refresh or name not in self._active:
                with self.pool.connection() as conn:
                    declared = self._resolved[name]
                    self._active[name] = replace(declared, spec=installed_spec(conn, declared.spec))
            active = self._active[name]
        fingerprint = body.get("fingerprint")
        if fingerprint is not None and fingerprint != active.spec.fingerprint and not refresh:
            return self.table(body, refresh=True)  # the caller may have seen a switch first
        if fingerprint is not None and fingerprint != active.spec.fingerprint:
            raise RequestError(409, f"the active version embeds with {active.spec.fingerprint}, the caller "
                               f"with {fingerprint}", name, "fingerprint")
        return active, self._embedder(active.spec)

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        table, embedder = self.table(body)
        name = table.spec.name
        query = _field(body, "query", str, name)
        k = _field(body, "k", int, name, 5)
        where = _field(body, "where", dict, name, None)
        hybrid = _field(body, "hybrid", bool, name, False)
        fusion = Fusion(**{f: body[f] for f in FUSION_FIELDS if body.get(f) is not None})
        for attempt in range(3):
            started = time.perf_counter()
            vector = embedder.embed(query)
            embedded = time.perf_counter()
            try:
                with self.pool.connection() as conn:
                    hits = run_search(conn, table, vector, query if hybrid else None, k, where, fusion,
                                      typed_rows=False, fingerprint=table.spec.fingerprint)
                break
            except VersionSwitched:  # promoted or rolled back since: embed with the new active model
                if attempt == 2:
                    raise
                table, embedder = self.table({"table": name}, refresh=True)
        done = time.perf_counter()
        return {
            "hits": [
                {"key": list(h.key), "score": h.score, "chunk": h.chunk, "row": h.row,
                 "vector_rank": h.vector_rank, "text_rank": h.text_rank,
                 "vector_distance": h.vector_distance, "text_score": h.text_score, "model": h.model}
                for h in hits
            ],
            "ms": {"embed": (embedded - started) * 1000, "sql": (done - embedded) * 1000},
        }

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        table, embedder = self.table(body)
        query = _field(body, "query", str, table.spec.name)
        return {"vector": embedder.embed(query).tolist()}


def _field(body: dict[str, Any], field: str, kind: type, table: str, default: Any = ...) -> Any:
    value = body.get(field, default)
    if value is ...:
        raise RequestError(400, "is required", table, field)
    # bool is an int in Python: k=true must not pass as 1.
    if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise RequestError(400, f"must be {kind.__name__}, not {type(value).__name__}", table, field)
    return value


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        # Dates, decimals and UUIDs of source rows go as text, as SearchHit.row shows them.
        return json.dumps(content, default=str, ensure_ascii=False).encode()


def create_app(service: SearchService) -> Starlette:
    def endpoint(action: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable:
        async def handle(request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                return _JSON({"error": "the body must be a JSON object"}, status_code=400)
            if not isinstance(body, dict):
                return _JSON({"error": "the body must be a JSON object"}, status_code=400)
            try:
                # The model and psycopg block: run them off the event loop.
                return _JSON(await run_in_threadpool(action, body))
            except RequestError as exc:
                return _error(exc.status, exc.table, exc.field, exc.message)
            except (SearchError, TypeError) as exc:
                if isinstance(exc, TypeError):  # an unknown fusion field
                    return _error(400, str(body.get("table")), "", str(exc))
                return _error(400, exc.table, exc.field, exc.message)

        return handle

    async def health(request: Request) -> Response:
        # "direct": the query model runs without encode()'s batching (see assets/query_embedding.py)
        embedding = {name: "direct" if service._embedder(spec).direct else "provider"
                     for name, (spec, _) in service.specs.items()}
        return _JSON({"status": "ok", "tables": sorted(service.specs), "pid": os.getpid(),
                      "query_embedding": embedding})

    return Starlette(routes=[
        Route("/search", endpoint(service.search), methods=["POST"]),
        Route("/embed", endpoint(service.embed), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


def _error(status: int, table: str, field: str, message: str) -> Response:
    text = f"table {table}: {field}: {message}" if field else f"table {table}: {message}"
    return _JSON({"error": text, "table": table, "field": field, "message": message}, status_code=status)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(specs: list[tuple[TableSpec, str]], url: str, home: Path, port: int = DEFAULT_PORT) -> None:
    """Load the models, listen on 127.0.0.1:`port` (0: any free port), announce the address in
    `home`/search-service.json for clients to find, and serve until SIGINT or SIGTERM."""
    import uvicorn

    service = SearchService(specs, url)
    state = home / STATE_FILE
    try:
        service.warm()
        # Bound here rather than by uvicorn, so that port 0 is known before the file is written;
        # connections that arrive before uvicorn accepts wait in the backlog.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
        address = f"http://{HOST}:{sock.getsockname()[1]}"
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": address, "pid": os.getpid(), "database": database_identity(),
                                   "tables": sorted(service.specs)}))
        tmp.replace(state)  # atomic: a client never reads half a file
        print(f"search service on {address} for {', '.join(sorted(service.specs)) or 'no table'}", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
        # uvicorn shuts down on SIGINT or SIGTERM and then raises the signal again under the handler
        # it found; with Python's default for SIGTERM the process would die before the clean-up below.
        signal.signal(signal.SIGTERM, _exit)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
    finally:
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass
        service.close()
