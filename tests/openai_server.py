"""A small OpenAI-compatible embeddings server for tests, standard library and numpy only.

It answers POST /v1/embeddings (and /embeddings) like api.openai.com does, with vectors that
depend only on the text, so tests can predict them. It also keeps files and batches
(openai_batches.py): upload a JSONL file, create a batch of embedding requests, poll it through
validating, in_progress and completed (or failed, expired, cancelled), and read its output and
error files, with faults of its own (a failing line, a failed or expired batch, a batch held in
progress until the test lets it finish, a create call that hangs after the batch was made). Every request is recorded for assertions,
and faults can be queued for the next requests (an HTTP status with or without Retry-After, a
delay that outlasts the client's timeout, a malformed body, a wrong number of vectors, a wrong
dimension, NaN) or attached to inputs (a "poison" predicate: any request carrying a matching
input gets HTTP 400, the way one over-long or rejected input fails a whole batch).

    with OpenAIServer(dimensions=8) as server:
        server.fail_next(Fault(status=429, retry_after="1"))
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import numpy as np
from openai_batches import BatchDesk

EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings"})


@dataclass(frozen=True)
class Fault:
    """What to do wrong with one request. Fields combine: a delay followed by a status, say.

    status: answer with this HTTP status and an OpenAI-style error body instead of vectors.
    retry_after / retry_after_ms: values for the Retry-After / retry-after-ms headers.
    delay: seconds to wait before answering, to outlast the client's timeout.
    malformed: send a body that is not JSON (with a JSON content type, as a broken proxy would).
    vector_count_delta: send this many vectors more (positive) or fewer (negative) than inputs.
    dimensions: send vectors of this many dimensions instead of the server's.
    nan: put a NaN in the first vector.
    reverse_order: list the vectors last-first, each keeping its right `index` (the API does not
        promise order, so a client must sort by index).
    floats_only: answer lists of floats even when base64 was asked for, as some compatible
        servers do.
    """

    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    delay: float = 0.0
    malformed: bool = False
    vector_count_delta: int = 0
    dimensions: int | None = None
    nan: bool = False
    reverse_order: bool = False
    floats_only: bool = False
    message: str = "injected fault"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; HTTP header names are case-insensitive
    body: Any  # the parsed JSON body, or None when it was not JSON
    received_at: float  # time.monotonic(), to measure the client's waits between retries
    fault: Fault | None  # the queued fault this request consumed, if any

    @property
    def inputs(self) -> list[str]:
        raw = self.body.get("input") if isinstance(self.body, dict) else None
        if isinstance(raw, str):
            return [raw]
        return list(raw) if isinstance(raw, list) else []


def vector_for(text: str, dimensions: int) -> np.ndarray:
    """The unit vector the server returns for `text`: a pure function of the text, so tests can
    compute the expected answer and catch vectors returned in the wrong order."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    vector = np.random.default_rng(seed).standard_normal(dimensions)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class _Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so stop() returns only once every request
    # has finished: no thread outlives the test that started the server.
    daemon_threads = False
    block_on_close = True
    owner: OpenAIServer


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the client can keep its connection alive, as it does against the real API;
    # every answer therefore carries a Content-Length.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
        pass  # keep pytest's output clean; the recorded requests say what happened

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.server.owner._handle(self)

    def do_GET(self) -> None:  # noqa: N802
        self.server.owner._handle(self)


class OpenAIServer:
    """An OpenAI-compatible embeddings server on 127.0.0.1, on a free port, in a background thread."""

    def __init__(
        self,
        dimensions: int = 8,
        *,
        latency: float = 0.0,
        poison: Callable[[str], bool] | None = None,
        model: str | None = None,
    ) -> None:
        self.dimensions = dimensions
        self.latency = latency  # added to every request, as a slow but healthy provider would
        self.poison = poison
        self.model = model  # None echoes the model the request named
        self._faults: deque[Fault] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        self._max_in_flight = 0
        # Set by stop(): delayed handlers wait on it, so a test that injected a long delay does
        # not make shutdown wait for the delay to run out.
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        # Files and batches, answered with the same vectors as the embeddings endpoint.
        self.batches = BatchDesk(self._embeddings, self._stopping, poison=lambda t: bool(self.poison and self.poison(t)))

    # Lifecycle ------------------------------------------------------------------------------------

    def start(self) -> OpenAIServer:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free port
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-test-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        httpd.shutdown()  # ends serve_forever; handler threads still run
        # Handlers of kept-alive connections block reading the next request; closing their
        # sockets wakes them so server_close() can join them instead of hanging.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client
        httpd.server_close()  # closes the listening socket and joins the handler threads
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # Programming faults and reading what happened --------------------------------------------------

    def fail_next(self, *faults: Fault | Iterable[Fault]) -> None:
        """Queue faults: each request takes the next one; once the queue is empty, requests succeed."""
        with self._lock:
            for item in faults:
                self._faults.extend([item] if isinstance(item, Fault) else item)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy, so a test can read it while the client is still sending."""
        with self._lock:
            return list(self._requests)

    @property
    def max_in_flight(self) -> int:
        """The most requests the server was answering at once: what a client kept concurrent."""
        with self._lock:
            return self._max_in_flight

    def vector_for(self, text: str) -> np.ndarray:
        return vector_for(text, self.dimensions)

    # Serving --------------------------------------------------------------------------------------

    def _track(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _handle(self, handler: _Handler) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            self._answer_request(handler)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer_request(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        received_at = time.monotonic()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = handler.path.split("?", 1)[0]
        if self.batches.handles(path):
            with self._lock:
                self._requests.append(RecordedRequest(
                    handler.command, path, {k.lower(): v for k, v in handler.headers.items()}, body, received_at, None))
            answer = self.batches.answer(handler.command, handler.path, handler.headers.get("Content-Type", ""), raw)
            if answer is not None:
                self._send(handler, *answer)
            return
        # Only embedding calls consume a fault, so a stray request cannot eat one meant for them.
        with self._lock:
            fault = self._faults.popleft() if path in EMBEDDING_PATHS and self._faults else None
            record = RecordedRequest(
                method=handler.command,
                path=path,
                headers={k.lower(): v for k, v in handler.headers.items()},
                body=body,
                received_at=received_at,
                fault=fault,
            )
            self._requests.append(record)

        status, payload, headers = self._answer(path, body, record.inputs, fault)
        # The latency counts from the moment the request was read and includes the work of
        # answering it, as a remote provider's does: a slow answer is not made slower still.
        wait = record.received_at + self.latency + (fault.delay if fault else 0.0) - time.monotonic()
        if wait > 0 and self._stopping.wait(wait):
            return  # stopping: drop the answer, the client gave up or the test is over
        self._send(handler, status, payload, headers)

    def _answer(
        self, path: str, body: Any, inputs: list[str], fault: Fault | None
    ) -> tuple[int, bytes, dict[str, str]]:
        if path not in EMBEDDING_PATHS:
            return self._error(404, f"no route for {path}")
        if not isinstance(body, dict) or not inputs or not all(isinstance(t, str) for t in inputs):
            return self._error(400, "'input' must be a string or a non-empty list of strings")
        if fault is not None and fault.status is not None:
            return self._error(fault.status, fault.message, fault)
        if self.poison is not None and any(self.poison(t) for t in inputs):
            return self._error(400, "an input was rejected")
        if fault is not None and fault.malformed:
            return 200, b'{"object": "list", "data": [{"embedding": [0.1,', {}
        as_base64 = body.get("encoding_format") == "base64" and not (fault is not None and fault.floats_only)
        payload = self._embeddings(inputs, str(body.get("model", "")), fault, as_base64)
        return 200, json.dumps(payload).encode("utf-8"), {}

    def _embeddings(self, inputs: list[str], model: str, fault: Fault | None, as_base64: bool) -> dict[str, Any]:
        dimensions = fault.dimensions if fault and fault.dimensions is not None else self.dimensions
        count = max(0, len(inputs) + (fault.vector_count_delta if fault else 0))
        # Extra vectors repeat the inputs cyclically, so they are valid vectors of the wrong count.
        vectors = [vector_for(inputs[i % len(inputs)], dimensions) for i in range(count)]
        if fault is not None and fault.nan and vectors:
            vectors[0] = vectors[0].copy()
            vectors[0][0] = np.nan  # json.dumps writes NaN, which Python's json reads back
        # base64 carries the little-endian float32 bytes, as api.openai.com sends them.
        encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if as_base64 else v.tolist()
                   for v in vectors]
        # Whitespace-split words stand in for tokens: deterministic, and never zero for a real text.
        tokens = sum(max(1, len(t.split())) for t in inputs)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encoded)]
        if fault is not None and fault.reverse_order:
            data.reverse()
        return {
            "object": "list",
            "data": data,
            "model": self.model or model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _error(self, status: int, message: str, fault: Fault | None = None) -> tuple[int, bytes, dict[str, str]]:
        headers: dict[str, str] = {}
        if fault is not None and fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        if fault is not None and fault.retry_after_ms is not None:
            headers["retry-after-ms"] = fault.retry_after_ms
        error = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return status, json.dumps(error).encode("utf-8"), headers

    def _send(self, handler: _Handler, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            handler.send_response(status)
            if "Content-Type" not in headers:
                handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up; nothing is listening for this answer
