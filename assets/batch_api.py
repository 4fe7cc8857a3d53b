"""The provider's batch API, through the official openai client: upload a JSONL file of embedding
requests, create its batch (or find the one already made from it), poll it, and read its output
and error files. Free of Dagster; assets/batch_fill.py decides what goes in and where it goes.

One line asks for one text (custom_id: its text hash in hex), so a failing line is one text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import openai

from .providers.base import ProviderError, check_vectors
from .providers.openai_compatible import make_client, provider_error, without_key
from .spec_sections import ProviderSpec

ENDPOINT = "/v1/embeddings"
# OpenAI's limits for one batch: 50,000 requests and a 200 MB input file (kept under it).
MAX_LINES = 50_000
MAX_FILE_BYTES = 190 * 1024 * 1024
# The batch's statuses after which nothing more happens to it.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class BatchState:
    id: str
    status: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    errors: str  # the batch-level errors the provider gave, if any

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Results:
    """What a batch's files hold, by custom_id: the vectors and billed tokens of lines that
    succeeded, and the error of each line that did not (or whose answer was unusable)."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class BatchAPI:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.client = make_client(spec)

    def line(self, custom_id: str, text: str) -> bytes:
        """One request of the input file."""
        body: dict[str, Any] = {"model": self.spec.model, "input": text, "encoding_format": "base64"}
        if self.spec.send_dimensions:
            body["dimensions"] = self.spec.dimensions
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}).encode() + b"\n"

    def upload(self, file: IO[bytes], name: str) -> str:
        """Upload an input file; returns its id."""
        return self._call(lambda: self.client.files.create(file=(name, file, "application/jsonl"), purpose="batch")).id

    def find(self, input_file_id: str, since: float) -> str | None:
        """The batch already made from this input file, if any: a run killed after creating it,
        before it could record its id, must not create (and pay for) a second one. Batches are
        listed newest first; the search ends at those made an hour before `since` (epoch
        seconds, when the file's job was recorded)."""

        def search() -> str | None:
            for batch in self.client.batches.list(limit=100):  # pages on by itself
                if batch.input_file_id == input_file_id:
                    return batch.id
                if batch.created_at < since - 3600:
                    return None
            return None

        return self._call(search)

    def create(self, input_file_id: str, metadata: dict[str, str]) -> str:
        return self._call(lambda: self.client.batches.create(
            input_file_id=input_file_id, endpoint=ENDPOINT, completion_window="24h", metadata=metadata)).id

    def retrieve(self, batch_id: str) -> BatchState:
        b = self._call(lambda: self.client.batches.retrieve(batch_id))
        errors = "; ".join(f"{e.code}: {e.message}" for e in (b.errors.data or [])) if b.errors else ""
        return BatchState(b.id, b.status, b.input_file_id, b.output_file_id, b.error_file_id, errors)

    def results(self, state: BatchState) -> Results:
        """Download and read the output and error files (an expired or cancelled batch keeps the
        outputs of the lines it finished)."""
        results = Results()
        for file_id in (state.output_file_id, state.error_file_id):
            if file_id:
                for line in _lines(self._call(lambda f=file_id: self.client.files.content(f).read())):
                    self._read_line(line, results)
        return results

    def close(self) -> None:
        self.client.close()

    def _read_line(self, line: dict[str, Any], results: Results) -> None:
        custom_id = str(line.get("custom_id"))
        response = line.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") != 200:
            error = line.get("error") or body.get("error") or {}
            status = response.get("status_code")
            results.errors[custom_id] = (f"batch line failed{f' (HTTP {status})' if status else ''}: "
                                         f"{error.get('code') or ''} {error.get('message') or 'no message'}".strip())
            return
        try:
            (item,) = body["data"]
            raw = item["embedding"]
            vector = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else raw
            vectors = check_vectors(np.asarray([vector], dtype=np.float32), 1, self.spec.dimensions)
            tokens = int((body.get("usage") or {}).get("prompt_tokens") or 0)
        except ProviderError as exc:
            results.errors[custom_id] = f"batch line unusable: {exc}"
            return
        except (KeyError, TypeError, ValueError) as exc:
            results.errors[custom_id] = f"batch line unreadable: {exc!r}"
            return
        results.vectors[custom_id] = vectors[0]
        results.tokens[custom_id] = tokens

    def _call(self, call):  # type: ignore[no-untyped-def]
        try:
            return call()
        except openai.OpenAIError as exc:
            raise without_key(provider_error(exc, self.spec.timeout_seconds), self.client.api_key) from None


def _lines(content: bytes) -> Iterator[dict[str, Any]]:
    for raw in content.splitlines():
        if raw.strip():
            yield json.loads(raw)
