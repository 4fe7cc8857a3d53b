"""Continuous mode's loop (assets/continuous.py), without Dagster: it wakes on NOTIFY, follows
inserts, updates and deletes, and shares buckets with a concurrent backfill without either of them
embedding a chunk the other already stored."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from assets.continuous import ChangeListener, drain_pending, follow_changes, pending_buckets
from assets.engine import EmbeddingEngine
from orchestration.database import connect

from conftest import RecordingProvider, TableFixture


class Follower:
    """follow_changes on a thread of its own, with its own connection and engine."""

    def __init__(
        self, db_url: str, fixture: TableFixture, provider: RecordingProvider, poll_seconds: float = 30.0
    ) -> None:
        self.conn = connect(db_url)
        self.engine = EmbeddingEngine(self.conn, fixture.table, provider, lock_wait_seconds=0.0)
        self.listener = ChangeListener(db_url, fixture.spec.name)
        self.batches: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=follow_changes,
            args=(self.engine, self.listener, self.batches.append, self.stop.is_set),
            kwargs={"poll_seconds": poll_seconds, "wait_slice_seconds": 0.2},
            daemon=True,
        )

    def __enter__(self) -> Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        self.listener.close()
        self.engine.close()
        self.conn.close()


def wait_for(condition, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not reached within {timeout}s")


@pytest.fixture
def docs(make_table, conn: psycopg.Connection) -> Iterator[TableFixture]:
    yield make_table("id int PRIMARY KEY, body text", columns=["body"], buckets=4)


@pytest.fixture
def wal_docs(make_table, conn: psycopg.Connection) -> Iterator[TableFixture]:
    yield make_table("id int PRIMARY KEY, body text", columns=["body"], buckets=4, capture="logical")


@pytest.mark.parametrize("capture", ["triggers", "logical"])
def test_follows_insert_update_delete_on_notify(
    db_url: str, request: pytest.FixtureRequest, recording, conn, capture: str
) -> None:
    # capture: logical: the wake-only trigger's NOTIFY, then the keys drained from the WAL.
    docs = request.getfixturevalue("docs" if capture == "triggers" else "wal_docs")
    source = docs.table.source
    docs.sync(full=True)  # the install's sweep markers: an empty table
    with Follower(db_url, docs, recording) as follower:
        # The poll is 30 s away: anything quicker was woken by NOTIFY.
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'first text'), (2, 'second text')").format(source))
        inserted = wait_for(lambda: docs.stored() == {(1,): ["first text"], (2,): ["second text"]})
        conn.execute(sql.SQL("UPDATE {} SET body = 'first text, edited' WHERE id = 1").format(source))
        updated = wait_for(lambda: docs.stored().get((1,)) == ["first text, edited"])
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(source))
        deleted = wait_for(lambda: (2,) not in docs.stored())
        assert max(inserted, updated, deleted) < 5.0
        assert follower.batches, "every drain that wrote something is reported"
    assert docs.pending() == 0


def test_a_missed_notification_is_caught_by_the_poll(db_url: str, docs: TableFixture, recording, conn) -> None:
    docs.sync(full=True)
    with Follower(db_url, docs, recording, poll_seconds=1.0):
        time.sleep(0.5)  # past the first drain: the follower now waits on LISTEN
        # A change logged with no NOTIFY: triggers off (replica role), the entry written by hand.
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(sql.SQL("INSERT INTO {} VALUES (6, 'logged without a notification')").format(
                docs.table.source))
            conn.execute(
                sql.SQL("INSERT INTO {} (bucket, row_keys) VALUES (vectorsync.bucket_of('[6]', %s), ARRAY['[6]'::jsonb])")
                .format(docs.table.queue), (docs.spec.buckets,))
        waited = wait_for(lambda: docs.stored() == {(6,): ["logged without a notification"]}, timeout=10)
        assert waited < 5.0
    assert docs.pending() == 0


def test_changes_made_before_anyone_listened_are_drained_first(
    db_url: str, docs: TableFixture, recording, conn
) -> None:
    docs.sync(full=True)
    conn.execute(sql.SQL("INSERT INTO {} VALUES (5, 'written before anyone listened')").format(docs.table.source))
    engine = EmbeddingEngine(conn, docs.table, recording, lock_wait_seconds=0.0)
    listener = ChangeListener(db_url, docs.spec.name)
    try:
        follow_changes(engine, listener, lambda w: None, lambda: False, quiet_seconds=0.5, poll_seconds=0.2)
    finally:
        listener.close()
        engine.close()
    assert docs.stored() == {(5,): ["written before anyone listened"]}


def test_busy_buckets_are_skipped_not_waited_for(db_url: str, docs: TableFixture, recording, conn) -> None:
    docs.sync(full=True)
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'row ' || i FROM generate_series(1, 20) i").format(docs.table.source))
    busy = pending_buckets(conn, docs.table)[0]
    with connect(db_url) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('vectorsync:' || %s), %s)", (docs.spec.name, busy))
        engine = EmbeddingEngine(conn, docs.table, recording, lock_wait_seconds=0.0)
        started = time.monotonic()
        worked = drain_pending(engine, None, lambda: False)
        engine.close()
        assert time.monotonic() - started < 10
        assert busy not in worked and worked
        assert pending_buckets(conn, docs.table) == [busy]


def test_continuous_and_a_concurrent_backfill_never_embed_the_same_chunk_twice(
    db_url: str, docs: TableFixture, recording: RecordingProvider, conn
) -> None:
    source = docs.table.source
    docs.sync(full=True)
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'original text of row ' || i FROM generate_series(1, 400) i")
                 .format(source))
    writes_done = threading.Event()

    def writer() -> None:
        with connect(db_url) as w:
            for round_ in range(40):
                # Every write is a text never seen before, so a second embedding of it would be waste.
                w.execute(sql.SQL("UPDATE {} SET body = %s || id WHERE id %% 40 = %s").format(source),
                          (f"rewrite {round_} of row ", round_))
                time.sleep(0.02)
        writes_done.set()

    with Follower(db_url, docs, recording):
        threads = [threading.Thread(target=writer)]
        backfill_conn = connect(db_url)
        backfill = EmbeddingEngine(backfill_conn, docs.table, recording)
        threads.append(threading.Thread(target=lambda: backfill.sync_buckets(range(docs.spec.buckets), full=True)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        backfill.close()
        backfill_conn.close()
        wait_for(lambda: docs.pending() == 0, timeout=60)
    current = {(k,): [body] for k, body in conn.execute(sql.SQL("SELECT id, body FROM {}").format(source))}
    assert docs.stored() == current
    sent = collections.Counter(recording.inputs)
    twice = {text: n for text, n in sent.items() if n > 1}
    assert not twice, f"embedded more than once: {list(twice.items())[:5]}"
