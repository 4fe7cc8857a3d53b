"""Bucket locks: a run holds a bucket's lock only while it works on that bucket, a change run for
another bucket never waits for a long sweep, and runs over overlapping buckets do the buckets
nobody holds first. Each run is an engine on its own connection and thread, with the real local
model; a run is held inside a bucket by blocking its first provider request on an event, so
"while the other run is still working" is a fact of the test, not a guess about timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import sql

from assets.engine import BucketBusy, EmbeddingEngine, SyncStats
from assets.locks import try_bucket_lock, unlock_bucket
from assets.providers.base import ProviderError
from conftest import RecordingProvider

DOCS = "id int PRIMARY KEY, body text"
ROWS_PER_BUCKET = 20  # 4 pages of 5 a bucket: the pipeline's read-ahead (3 pages) stays in one bucket
WAIT = 60.0  # how long any event may take; only a broken run ever comes near it


def _fill(conn: psycopg.Connection, t, buckets: int) -> dict[int, list[int]]:
    """ROWS_PER_BUCKET rows in each bucket, as rows that predate the install (nothing logged):
    what a backfill sweeps. Returns bucket -> ids."""
    ids: dict[int, list[int]] = {b: [] for b in range(buckets)}
    i = 0
    while any(len(v) < ROWS_PER_BUCKET for v in ids.values()):
        i += 1
        bucket = conn.execute("SELECT vectorsync.bucket_of(jsonb_build_array(%s::int), %s)", (i, buckets)).fetchone()[0]
        if len(ids[bucket]) < ROWS_PER_BUCKET:
            ids[bucket].append(i)
    every = [i for v in ids.values() for i in v]
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'text of row ' || i FROM unnest(%s::int[]) i").format(t.table.source),
                 (every,))
    conn.execute(sql.SQL("DELETE FROM {}").format(t.table.queue))
    return ids


def _buckets_held(conn: psycopg.Connection, by: psycopg.Connection) -> set[int]:
    """The buckets whose lock the session of `by` holds (a bucket lock is the only two-key
    advisory lock these tests take)."""
    return {b for (b,) in conn.execute(
        "SELECT objid::int FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND pid = %s",
        (by.info.backend_pid,),
    )}


class _Run:
    """One run on its own connection and thread; its first provider request blocks until
    `release` is set (after setting `blocked`), and `written[b]` is set once a page of bucket b
    is written."""

    def __init__(self, db_url: str, t, local_provider, buckets: list[int], block: bool = True) -> None:
        self.conn = psycopg.connect(db_url, autocommit=True)
        self.provider = RecordingProvider(local_provider)
        self.blocked, self.release = threading.Event(), threading.Event()
        if block:
            self.provider.during_request = self._block
        self.engine = EmbeddingEngine(self.conn, t.table, self.provider, lock_wait_seconds=WAIT)
        self.written: dict[int, threading.Event] = {b: threading.Event() for b in buckets}
        self.engine.on_page = self._page_written
        self.buckets = buckets
        self.stats: dict[int, SyncStats] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _block(self) -> None:
        self.blocked.set()
        assert self.release.wait(WAIT), "the test never released this run"

    def _page_written(self, page: dict[int, SyncStats]) -> None:
        # Rows seen, not any figure: a request shared by two buckets books tokens to both.
        for bucket, stats in page.items():
            if stats.rows_seen:
                self.written[bucket].set()

    def _run(self) -> None:
        try:
            self.stats = self.engine.sync_buckets(self.buckets, full=True)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def start(self) -> _Run:
        self.thread.start()
        return self

    def finish(self) -> dict[int, SyncStats]:
        self.release.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the run did not finish"
        self.engine.close()
        self.conn.close()
        if self.error is not None:
            raise self.error
        return self.stats


def _wait(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), f"timed out waiting until {what}"


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state of the database that no event announces (the locks a session holds)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _all_current(conn: psycopg.Connection, t) -> None:
    stored = dict(conn.execute(sql.SQL("SELECT id, chunk FROM {}").format(t.table.store)).fetchall())
    source = dict(conn.execute(sql.SQL("SELECT id, body FROM {}").format(t.table.source)).fetchall())
    assert stored == source and t.pending() == 0


def test_a_change_run_for_a_bucket_finishes_while_a_long_sweep_works_on_another(
    make_table, conn: psycopg.Connection, db_url: str, local_provider
) -> None:
    t = make_table(DOCS, template="{body}", page_size=5, buckets=8)
    ids = _fill(conn, t, 8)
    sweep = _Run(db_url, t, local_provider, list(range(8))).start()
    try:
        _wait(sweep.blocked, "the sweep is embedding bucket 0")
        # The sweep holds the bucket it works on, and none of the seven it has not reached.
        assert _buckets_held(conn, sweep.conn) == {0}
        row = ids[5][3]
        conn.execute(sql.SQL("UPDATE {} SET body = 'changed' WHERE id = %s").format(t.table.source), (row,))
        # A change run that would not wait a moment for a held bucket.
        change = EmbeddingEngine(conn, t.table, RecordingProvider(local_provider), lock_wait_seconds=0.0)
        try:
            done = change.sync_bucket(5)
        finally:
            change.close()
        assert done.rows_written == 1 and done.changes_cleared == 1
        assert conn.execute(sql.SQL("SELECT chunk FROM {} WHERE id = %s").format(t.table.store), (row,)).fetchone() == (
            "changed",)
        assert sweep.thread.is_alive() and not sweep.release.is_set()  # still inside bucket 0
    finally:
        stats = sweep.finish()
    # The sweep came to bucket 5 after the change run and found the changed row current.
    assert stats[5].rows_written == ROWS_PER_BUCKET - 1 and stats[5].rows_unchanged == 1
    assert sum(s.rows_written for s in stats.values()) == 8 * ROWS_PER_BUCKET - 1
    _all_current(conn, t)


def test_runs_over_overlapping_buckets_do_the_free_ones_first_and_both_finish(
    make_table, conn: psycopg.Connection, db_url: str, local_provider
) -> None:
    t = make_table(DOCS, template="{body}", page_size=5, buckets=8)
    _fill(conn, t, 8)
    # B holds bucket 3, its first, inside a provider request; A wants 0..5.
    b = _Run(db_url, t, local_provider, [3, 4]).start()
    a = _Run(db_url, t, local_provider, list(range(6)), block=False)
    try:
        _wait(b.blocked, "run B is embedding bucket 3")
        assert _buckets_held(conn, b.conn) == {3}
        a.start()
        # A does 4 and 5 while B still holds 3, rather than waiting for B's whole run ...
        _wait(a.written[5], "run A has written bucket 5")
        assert a.written[4].is_set() and not a.written[3].is_set()
        assert b.thread.is_alive() and a.thread.is_alive()
        # ... and waits for 3 holding nothing, so B can take 4 (done by A) after 3.
        _until(lambda: not _buckets_held(conn, a.conn), "run A holds no bucket")
        assert not a.written[3].is_set() and b.thread.is_alive()
    finally:
        b_stats = b.finish()
        a_stats = a.finish() if a.thread.ident is not None else {}
    # Every row was written once, by whichever run came first, and found current by the other.
    assert b_stats[3].rows_written == ROWS_PER_BUCKET and a_stats[3].rows_unchanged == ROWS_PER_BUCKET
    assert a_stats[4].rows_written == ROWS_PER_BUCKET and b_stats[4].rows_unchanged == ROWS_PER_BUCKET
    assert sum(s.rows_written for s in [*a_stats.values(), *b_stats.values()]) == 6 * ROWS_PER_BUCKET
    stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t.table.store)).fetchone()[0]
    assert stored == 6 * ROWS_PER_BUCKET and t.pending() == 0


def test_a_bucket_held_past_the_wait_is_named_and_the_others_are_done(
    make_table, conn: psycopg.Connection, db_url: str, local_provider
) -> None:
    t = make_table(DOCS, template="{body}", page_size=5, buckets=4)
    ids = _fill(conn, t, 4)
    with psycopg.connect(db_url, autocommit=True) as other:
        assert try_bucket_lock(other, t.spec.name, 2)
        engine = EmbeddingEngine(conn, t.table, RecordingProvider(local_provider), lock_wait_seconds=0.0)
        try:
            with pytest.raises(BucketBusy, match=rf"table {t.spec.name}: buckets \[2\]"):
                engine.sync_buckets(range(4), full=True)
            stored = {i for (i,) in conn.execute(sql.SQL("SELECT id FROM {}").format(t.table.store))}
            assert stored == set(ids[0] + ids[1] + ids[3])
            assert _buckets_held(conn, conn) == set()
            unlock_bucket(other, t.spec.name, 2)
            engine.sync_buckets(range(4), full=True)
        finally:
            engine.close()
    _all_current(conn, t)


def test_a_failed_run_leaves_no_bucket_locked(make_table, conn: psycopg.Connection, local_provider) -> None:
    t = make_table(DOCS, template="{body}", page_size=5, buckets=4)
    _fill(conn, t, 4)
    provider = RecordingProvider(local_provider)

    def revoke_the_key() -> None:
        raise ProviderError("auth", "the key was revoked")

    provider.during_request = revoke_the_key
    engine = EmbeddingEngine(conn, t.table, provider, lock_wait_seconds=0.0)
    try:
        with pytest.raises(ProviderError, match="revoked"):
            engine.sync_buckets(range(4), full=True)
        assert _buckets_held(conn, conn) == set()
        engine.sync_buckets(range(4), full=True)  # every bucket free again, at once
    finally:
        engine.close()
    _all_current(conn, t)
