"""The engine's pipeline: several pages in flight at once, and one call over many buckets, keep
the engine's guarantees (nothing lost, no stale overwrite, no text sent twice)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import psycopg
import pytest
from psycopg import sql

from assets.engine import EmbeddingEngine, SyncStats
from assets.providers.base import EmbeddingProvider, Embeddings, ProviderError

DOCS = "id int PRIMARY KEY, body text"


class SlowProvider(EmbeddingProvider):
    """Deterministic vectors after a delay, with several requests in flight, recording every input;
    hooks run when a text is first counted (the main thread) or embedded (a worker thread)."""

    def __init__(self, delay: float = 0.05, batch: int = 1, concurrency: int = 4) -> None:
        self.dimensions = 384
        self.max_inputs_per_request = batch
        self.max_tokens_per_request = 10**6
        self.max_tokens_per_input = 10**6
        self.max_concurrency = concurrency
        self.delay = delay
        self.inputs: list[str] = []
        self.on_count: dict[str, Callable[[], None]] = {}
        self.fail_on: set[str] = set()
        self._lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        for t in texts:
            hook = self.on_count.pop(t, None)
            if hook is not None:
                hook()
        return [len(t) for t in texts]

    def embed(self, texts: Sequence[str]) -> Embeddings:
        with self._lock:
            self.inputs.extend(texts)
        time.sleep(self.delay)
        if self.fail_on.intersection(texts):
            raise ProviderError("auth", "the key was revoked")
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(384) for t in texts]
        return Embeddings(np.asarray(rows, dtype=np.float32), len(texts))


def _stored(conn: psycopg.Connection, t) -> dict[int, str]:
    return dict(conn.execute(sql.SQL("SELECT id, chunk FROM {} ORDER BY id").format(t.table.store)).fetchall())


def test_a_text_in_flight_for_an_earlier_page_is_not_sent_again(make_table, conn: psycopg.Connection) -> None:
    t = make_table(DOCS, template="{body}", page_size=2, buckets=1)
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'text ' || (i % 4) FROM generate_series(1, 16) i")
                 .format(t.table.source))
    provider = SlowProvider(delay=0.1, batch=1, concurrency=4)
    engine = EmbeddingEngine(conn, t.table, provider)
    try:
        stats = engine.sync_bucket(0, full=True)
    finally:
        engine.close()
    assert Counter(provider.inputs) == {f"text {i}": 1 for i in range(4)}
    assert stats.rows_written == 16 and stats.chunks_embedded == 4 and stats.chunks_reused == 12
    assert len(_stored(conn, t)) == 16 and t.pending() == 0


def test_a_row_changed_back_while_an_earlier_page_writes_it_ends_current(
    make_table, conn: psycopg.Connection, db_url: str
) -> None:
    t = make_table(DOCS, template="{body}", page_size=1, buckets=1)
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'old')").format(t.table.source))
    provider = SlowProvider(delay=0.5, concurrency=2)
    engine = EmbeddingEngine(conn, t.table, provider)
    try:
        engine.sync_bucket(0, full=True)
        # Two changes logged before the run: one page claims each.
        conn.execute(sql.SQL("UPDATE {} SET body = 'new' WHERE id = 1").format(t.table.source))
        conn.execute(sql.SQL("UPDATE {} SET body = 'newer' WHERE id = 1").format(t.table.source))

        def change_back() -> None:
            with psycopg.connect(db_url, autocommit=True) as other:
                other.execute(sql.SQL("UPDATE {} SET body = 'old' WHERE id = 1").format(t.table.source))

        # The first page reads 'newer' and is still being embedded when the second page reads
        # 'old', which is what the store still holds: only the pipeline knows that the first
        # page is about to overwrite it, so the second page must write again after it.
        provider.on_count["newer"] = change_back
        engine.sync_bucket(0)
        assert _stored(conn, t) == {1: "old"}
        engine.sync_bucket(0)  # the change made during the run was left for the next one
    finally:
        engine.close()
    assert _stored(conn, t) == {1: "old"} and t.pending() == 0


@pytest.mark.parametrize("statements", ["one per row", "one bulk"])
def test_a_failing_request_loses_no_change_of_any_page_in_flight(
    make_table, conn: psycopg.Connection, statements: str
) -> None:
    t = make_table(DOCS, template="{body}", page_size=2, buckets=1)
    insert = sql.SQL("INSERT INTO {} SELECT i, 'row ' || i FROM generate_series(%s::int, %s::int) i").format(t.table.source)
    if statements == "one bulk":
        conn.execute(insert, (1, 20))
    else:
        for i in range(1, 21):
            conn.execute(insert, (i, i))
    pending = t.pending()
    provider = SlowProvider(delay=0.05, batch=2, concurrency=4)
    provider.fail_on = {"row 9"}
    engine = EmbeddingEngine(conn, t.table, provider)
    try:
        with pytest.raises(ProviderError):
            engine.sync_bucket(0)
        written = _stored(conn, t)
        # Pages are written in order: everything before the failing page, nothing from it on.
        assert set(written) == set(range(1, len(written) + 1)) and 9 not in written
        if statements == "one bulk":
            # The statement's one entry spans ten pages: it stays whole until its last key is written.
            assert t.pending() == pending
        else:
            assert t.pending() == pending - len(written)
        provider.fail_on = set()
        engine.sync_bucket(0)
    finally:
        engine.close()
    assert len(_stored(conn, t)) == 20 and t.pending() == 0


def test_one_call_over_many_buckets_reports_each_bucket(make_table, conn: psycopg.Connection) -> None:
    t = make_table(DOCS, template="{body}", page_size=7, buckets=4)
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'row ' || i FROM generate_series(1, 50) i").format(t.table.source))
    in_bucket = dict(conn.execute(
        sql.SQL("SELECT vectorsync.bucket_of(jsonb_build_array(id), 4), count(*) FROM {} GROUP BY 1")
        .format(t.table.source)).fetchall())
    provider = SlowProvider(delay=0.01, batch=5, concurrency=3)
    engine = EmbeddingEngine(conn, t.table, provider)
    try:
        per_bucket = engine.sync_buckets([0, 1, 2, 3], full=True)
        conn.execute(sql.SQL("DELETE FROM {} WHERE id <= 10").format(t.table.source))
        again = engine.sync_buckets([3, 1, 0, 2])
    finally:
        engine.close()
    assert {b: s.rows_written for b, s in per_bucket.items()} == {b: in_bucket.get(b, 0) for b in range(4)}
    total = SyncStats()
    for s in per_bucket.values():
        total.merge(s)
    # No text sent twice; requests fill across buckets, but the changes drained before each
    # bucket's sweep are written first, which may send one part-filled request per bucket.
    assert total.chunks_embedded == 50 and 10 <= total.provider_requests <= 10 + 4 and len(provider.inputs) == 50
    stored = conn.execute(
        sql.SQL("SELECT bucket, count(*) FROM {} GROUP BY 1").format(t.table.store)).fetchall()
    assert sum(n for _, n in stored) == 40
    assert sum(s.rows_deleted for s in again.values()) == 10 and t.pending() == 0
    assert all(
        b == conn.execute("SELECT vectorsync.bucket_of(jsonb_build_array(%s::int), 4)", (i,)).fetchone()[0]
        for i, b in conn.execute(sql.SQL("SELECT id, bucket FROM {}").format(t.table.store)).fetchall()
    )
