"""Finding and calling the warm search service (assets/search_service.py) from another process.

`vectorsync serve` writes where it listens to `<VECTORSYNC_HOME>/search-service.json` once its
models are loaded, and removes the file when it stops. A client uses the service only when that
file names a live process serving the same database (VECTORSYNC_SEARCH_URL overrides the file);
otherwise `find_service` returns None and the caller loads the model itself. A service that
does not know the table, or knows another declaration of it, answers 404 or 409, and the client
falls back too, so a stale service never gives answers from the wrong model.

The standard library's http.client, not httpx: importing it costs nothing, and the CLI answering
in milliseconds is the point of the service.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .search import SearchError, SearchHit

STATE_FILE = "search-service.json"
# The service answers in milliseconds, or in the seconds a remote provider takes to embed the
# query. One that accepted the connection and has not answered in this long is stuck (stopped,
# swapping, deadlocked): the caller then searches without it, as when none runs, and says so.
# Connecting to a closed port on 127.0.0.1 fails at once.
TIMEOUT_SECONDS = 15.0
log = logging.getLogger(__name__)


def default_home() -> Path:
    # The same default as orchestration.database.vectorsync_home, which assets/ cannot import.
    return Path(os.environ.get("VECTORSYNC_HOME", Path(__file__).resolve().parent.parent / ".vectorsync"))


def database_identity() -> str:
    """Which database this process would search, without connecting (which for the embedded server
    means starting it): a digest of DATABASE_URL, which never leaves the machine in clear, or the
    embedded server of the state directory the service file sits in."""
    url = os.environ.get("DATABASE_URL")
    return "sha256:" + hashlib.sha256(url.encode()).hexdigest()[:16] if url else "embedded"


def find_service(home: Path | None = None) -> SearchClient | None:
    """The running search service for this process's database, or None."""
    explicit = os.environ.get("VECTORSYNC_SEARCH_URL")
    if explicit:
        return SearchClient(explicit)
    try:
        state = json.loads((home or default_home()).joinpath(STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)  # a service killed with SIGKILL leaves its file behind
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if state.get("database") != database_identity():
        return None
    return SearchClient(state["url"])


class SearchClient:
    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON). Raises OSError when nothing listens."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body, default=str).encode()
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def search(
        self, table: str, fingerprint: str | None, query: str, k: int = 5, hybrid: bool = False,
        where: Mapping[str, Any] | None = None, **fusion: Any,
    ) -> list[SearchHit] | None:
        """The service's hits, with rows as JSON gives them (dates and decimals as text), or None
        when it cannot answer for this table (not running, unknown table, another declaration)."""
        body = {"table": table, "fingerprint": fingerprint, "query": query, "k": k, "hybrid": hybrid,
                "where": dict(where or {}), **fusion}
        answer = self._call("/search", body)
        if answer is None:
            return None
        return [
            SearchHit(tuple(h["key"]), h["score"], h["chunk"], h["row"], h["vector_rank"], h["text_rank"],
                      h["vector_distance"], h["text_score"], h.get("model"))
            for h in answer["hits"]
        ]

    def embed(self, table: str, fingerprint: str | None, query: str) -> np.ndarray | None:
        """The query's vector by the table's model, or None when the service cannot give it."""
        answer = self._call("/embed", {"table": table, "fingerprint": fingerprint, "query": query})
        return None if answer is None else np.asarray(answer["vector"], dtype=np.float32)

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            status, answer = self.request("POST", path, body)
        except ConnectionError:
            return None
        except TimeoutError:
            log.warning(f"search service at {self.url} did not answer within {self.timeout:.0f} s; "
                        f"searching without it")
            return None
        if status in (404, 409):
            return None
        if status == 400:
            raise SearchError(answer.get("table", body["table"]), answer.get("field", ""),
                              answer.get("message", answer["error"]))
        if status != 200:
            raise RuntimeError(f"search service at {self.url}: HTTP {status}: {answer}")
        return answer
