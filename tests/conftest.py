"""Shared fixtures: one embedded PostgreSQL with pgvector for the session, the real local model,
and helpers that declare and install a fresh table for each test."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

# Before anything imports orchestration.database: the tests get their own embedded server.
_HOME = Path(tempfile.mkdtemp(prefix="vs-test-"))
os.environ["VECTORSYNC_HOME"] = str(_HOME)
os.environ.pop("DATABASE_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psycopg  # noqa: E402

from assets.catalog import ResolvedTable, resolve  # noqa: E402
from assets.engine import EmbeddingEngine, SyncStats  # noqa: E402
from assets.install import install  # noqa: E402
from assets.providers.base import DelegatingProvider, EmbeddingProvider, Embeddings  # noqa: E402
from assets.spec import TableSpec, parse_spec  # noqa: E402
from assets.status import change_backlog  # noqa: E402
from assets.wal_capture import drop_slot_and_publication  # noqa: E402
from orchestration.database import connect, database_url, ensure_server_settings  # noqa: E402

_counter = itertools.count()


@pytest.fixture(scope="session")
def db_url() -> str:
    url = database_url()
    # `capture: logical` tables decode the WAL; the session's own server is restarted with it once.
    assert ensure_server_settings(url, {"wal_level": "logical"})
    return url


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with connect(db_url) as c:
        yield c


@pytest.fixture(scope="session")
def local_provider() -> EmbeddingProvider:
    from assets.providers import provider_for
    from assets.spec_sections import ProviderSpec

    return provider_for(ProviderSpec())


class RecordingProvider(DelegatingProvider):
    """The real local model, recording every input it is asked to embed (and able to run a hook
    during a request, to change rows while their old text is being embedded)."""

    def __init__(self, inner: EmbeddingProvider) -> None:
        super().__init__(inner)
        self.inputs: list[str] = []
        self.during_request = None

    def embed(self, texts: Sequence[str]) -> Embeddings:
        self.inputs.extend(texts)
        if self.during_request is not None:
            hook, self.during_request = self.during_request, None
            hook()
        return self.inner.embed(texts)


@pytest.fixture
def recording(local_provider: EmbeddingProvider) -> RecordingProvider:
    return RecordingProvider(local_provider)


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


class TableFixture:
    """A source table created for one test, declared, installed, with an engine to sync it."""

    def __init__(self, conn: psycopg.Connection, provider: EmbeddingProvider, spec: TableSpec) -> None:
        self.conn = conn
        self.spec = spec
        install(conn, [(spec, "test")])
        self.table: ResolvedTable = resolve(conn, spec, "test")
        self.engine = EmbeddingEngine(conn, self.table, provider)

    def sync(self, full: bool = False) -> SyncStats:
        total = SyncStats()
        for bucket in range(self.spec.buckets):
            total.merge(self.engine.sync_bucket(bucket, full=full))
        return total

    def stored(self) -> dict[tuple, list[str]]:
        """key -> chunk texts, in order."""
        from psycopg import sql

        rows = self.conn.execute(
            sql.SQL("SELECT {}, chunk FROM {} ORDER BY {}, chunk_seq").format(
                self.table.key_json(), self.table.store, self.table.key_list()
            )
        ).fetchall()
        result: dict[tuple, list[str]] = {}
        for key, chunk in rows:
            result.setdefault(tuple(key), []).append(chunk)
        return result

    def pending(self) -> int:
        return change_backlog(self.conn, self.table.queue)[0]


@pytest.fixture
def make_table(conn: psycopg.Connection, recording: RecordingProvider):
    """make_table(ddl_columns, **spec fields) -> TableFixture, on a fresh schema."""
    created: list[TableFixture] = []

    def _make(columns_sql: str, schema: str | None = None, table: str = "docs", **fields) -> TableFixture:
        from psycopg import sql

        schema = schema or unique("t")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {} (" + columns_sql + ")").format(sql.Identifier(schema, table))
        )
        fields.setdefault("name", unique("tbl"))
        fields.setdefault("buckets", 4)
        spec = parse_spec({"source": {"schema": schema, "table": table}, **fields}, "test")
        fixture = TableFixture(conn, recording, spec)
        created.append(fixture)
        return fixture

    yield _make
    for fixture in created:
        fixture.engine.close()
        if fixture.spec.capture == "logical":  # a slot left behind would keep WAL for the session
            drop_slot_and_publication(conn, fixture.spec.name)


def requested_buckets(request) -> set[int]:
    """The buckets a RunRequest asks for: one partition, or a range of them in its tags."""
    if request.partition_key is not None:
        return {int(request.partition_key)}
    rng = request.partition_key_range
    return set(range(int(rng.start), int(rng.end) + 1))
