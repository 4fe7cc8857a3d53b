"""The files and batches endpoints of the test server (tests/openai_server.py), standard library only.

    POST /v1/files                 multipart upload (purpose "batch"): a JSONL file of requests
    GET  /v1/files/{id}            the file object
    GET  /v1/files/{id}/content    its bytes (inputs, outputs and error files alike)
    POST /v1/batches               create a batch of /v1/embeddings requests (24h window)
    GET  /v1/batches/{id}          the batch, moved on one status per poll: validating ->
                                   in_progress -> completed (or the outcome the test chose)
    GET  /v1/batches               the list, newest first, paged by `after` and `limit`
    POST /v1/batches/{id}/cancel   cancelled at its next poll

Faults a test sets on the desk: `hold` keeps every batch in_progress until cleared; `outcome` ends
the next batches "failed", "expired" (after `expire_after_lines` lines were done: their outputs
are kept, as the real API keeps them) or "cancelled"; `line_fails(text)` fails a line (HTTP 500
in the error file); the server's poison predicate fails a line with HTTP 400; `hold_create` makes
POST /v1/batches wait, after the batch was made, until the event is set (a client killed then
never learns the batch's id); `refuse_uploads` answers the next uploads with HTTP 400. The vectors of a line are the embeddings endpoint's own.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qs, urlsplit

ENDPOINT = "/v1/embeddings"
_ids = itertools.count(1)


class BatchDesk:
    def __init__(
        self, embeddings: Callable[[list[str], str, Any, bool], dict[str, Any]], stopping: threading.Event,
        poison: Callable[[str], bool],
    ) -> None:
        self._embeddings = embeddings
        self._stopping = stopping
        self._poison = poison
        self._lock = threading.RLock()  # _finish adds files while it holds it
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.hold = False
        self.outcome = "completed"
        self.expire_after_lines = 0
        self.line_fails: Callable[[str], bool] | None = None
        self.hold_create: threading.Event | None = None
        self.refuse_uploads = 0  # the next uploads answered HTTP 400
        self.lines_embedded = 0  # inputs embedded through batches, for assertions

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches"))

    def created(self) -> list[dict[str, Any]]:
        """Every batch created, oldest first."""
        with self._lock:
            return sorted(self.batches.values(), key=lambda b: b["created_at"])

    def answer(self, method: str, target: str, content_type: str, raw: bytes) -> tuple[int, bytes, dict[str, str]] | None:
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")[1:]  # drop "v1"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if parts[0] == "files":
            if method == "POST" and len(parts) == 1:
                return self._upload(content_type, raw)
            file = self.files.get(parts[1]) if len(parts) > 1 else None
            if file is None:
                return _error(404, "no such file")
            if len(parts) == 3 and parts[2] == "content":
                return 200, file["content"], {"Content-Type": "application/octet-stream"}
            return _json(_public(file))
        if method == "POST" and len(parts) == 1:
            return self._create(raw)
        if method == "GET" and len(parts) == 1:
            return self._list(query)
        with self._lock:
            batch = self.batches.get(parts[1])
            if batch is None:
                return _error(404, "no such batch")
            if method == "POST" and parts[2:] == ["cancel"]:
                batch["_cancel"] = True
                if batch["status"] in ("validating", "in_progress"):
                    batch["status"] = "cancelling"
            elif method == "GET":
                self._advance(batch)
            return _json(_public(batch))

    # ---------------------------------------------------------------------------------------------

    def _upload(self, content_type: str, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            if self.refuse_uploads > 0:
                self.refuse_uploads -= 1
                return _error(400, "injected upload refusal")
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields: dict[str, Any] = {}
        filename = "upload"
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True)
            if name == "file":
                filename = part.get_filename() or filename
        if fields.get("purpose") != b"batch" or "file" not in fields:
            return _error(400, "a file and purpose 'batch' are required")
        return _json(_public(self._file(fields["file"], filename, "batch")))

    def _file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file = {"id": f"file-{next(_ids)}", "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "content": content}
        with self._lock:
            self.files[file["id"]] = file
        return file

    def _create(self, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
        body = json.loads(raw or b"{}")
        if body.get("endpoint") != ENDPOINT or body.get("completion_window") != "24h":
            return _error(400, f"only endpoint {ENDPOINT} with a 24h window is served")
        if body.get("input_file_id") not in self.files:
            return _error(400, "no such input file")
        batch = {
            "id": f"batch_{next(_ids)}", "object": "batch", "endpoint": ENDPOINT, "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": time.time(),
            "metadata": body.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        with self._lock:
            self.batches[batch["id"]] = batch
        if self.hold_create is not None:
            # The batch exists now; the client is kept waiting for its id (and may be killed).
            while not self.hold_create.wait(0.05):
                if self._stopping.is_set():
                    return _error(503, "server stopping")
        return _json(_public(batch))

    def _list(self, query: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            ordered = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
            if "after" in query:
                ids = [b["id"] for b in ordered]
                ordered = ordered[ids.index(query["after"]) + 1:] if query["after"] in ids else []
            limit = int(query.get("limit", 20))
            page = [_public(b) for b in ordered[:limit]]
            more = len(ordered) > limit
        return _json({"object": "list", "data": page, "has_more": more,
                      "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})

    def _advance(self, batch: dict[str, Any]) -> None:
        """One step per poll, so a client sees every status on its way (under the desk's lock)."""
        status = batch["status"]
        if status == "validating":
            batch["status"] = "in_progress"
        elif status == "cancelling":
            self._finish(batch, "cancelled", 0)
        elif status == "in_progress" and not self.hold:
            if self.outcome == "failed":
                batch["status"] = "failed"
                batch["errors"] = {"object": "list", "data": [{"code": "injected", "message": "injected failure"}]}
            elif self.outcome == "expired":
                self._finish(batch, "expired", self.expire_after_lines)
            elif self.outcome == "cancelled":
                self._finish(batch, "cancelled", 0)
            else:
                self._finish(batch, "completed", None)

    def _finish(self, batch: dict[str, Any], status: str, done_lines: int | None) -> None:
        """Run the batch's lines (the first `done_lines` of them; None: all) into its files."""
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["content"].splitlines() if x.strip()]
        outputs, errors = [], []
        for i, line in enumerate(lines):
            custom_id = line["custom_id"]
            body = line.get("body") or {}
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
            if done_lines is not None and i >= done_lines:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                errors.append(_line(custom_id, None, {"code": code, "message": f"this request was not run: {status}"}))
            elif any(self._poison(t) for t in inputs):
                errors.append(_line(custom_id, _failed(400, "an input was rejected"), None))
            elif self.line_fails is not None and any(self.line_fails(t) for t in inputs):
                errors.append(_line(custom_id, _failed(500, "injected line failure"), None))
            else:
                payload = self._embeddings(inputs, str(body.get("model", "")), None,
                                           body.get("encoding_format") == "base64")
                self.lines_embedded += len(inputs)
                outputs.append(_line(custom_id, {"status_code": 200, "request_id": f"req_{next(_ids)}", "body": payload},
                                     None))
        if outputs:
            batch["output_file_id"] = self._file(_jsonl(outputs), "output.jsonl", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._file(_jsonl(errors), "errors.jsonl", "batch_output")["id"]
        batch["status"] = status
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}


def _line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": f"batch_req_{next(_ids)}", "custom_id": custom_id, "response": response, "error": error}


def _failed(status: int, message: str) -> dict[str, Any]:
    return {"status_code": status, "request_id": f"req_{next(_ids)}",
            "body": {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A file or batch as the API shows it: no content, no private marks, whole-second times."""
    return {k: (int(v) if k == "created_at" else v) for k, v in record.items()
            if not k.startswith("_") and k != "content"}


def _json(payload: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
    return 200, json.dumps(payload).encode(), {}


def _error(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
    error = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return status, json.dumps(error).encode(), {}
