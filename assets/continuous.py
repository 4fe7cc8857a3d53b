"""Draining the change log as changes arrive, woken by LISTEN/NOTIFY. Free of Dagster.

Two callers use it: a change-triggered partition run that lingers after its first pass to take
the changes that keep arriving in its buckets, and continuous mode, one long-lived run per table.
Both go through EmbeddingEngine.sync_bucket, so the claim protocol is the same as every other run's:
a bucket is worked by one run at a time (advisory lock), a change leaves the log only with its
embedding, and a killed run leaves its claimed changes for the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import psycopg
from psycopg import sql

from .catalog import ResolvedTable
from .engine import BucketBusy, EmbeddingEngine, SyncStats

CHANNEL = "vectorsync_changes"


class ChangeListener:
    """LISTENs on its own connection for the commits that touch one table's change log.

    The capture trigger sends the table's name on `vectorsync_changes`; a notification can be
    missed (the listener reconnected, the sender's transaction used a replica role), so a caller
    always also polls, slowly."""

    def __init__(self, url: str, table_name: str) -> None:
        self.table_name = table_name
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))

    def wait(self, timeout: float) -> bool:
        """Block until this table is notified (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            notes = self.conn.notifies(timeout=left)
            try:
                for note in notes:
                    if note.payload == self.table_name:
                        return True
            finally:
                notes.close()  # the generator holds the connection's lock until closed
        return False

    def close(self) -> None:
        self.conn.close()


def pending_buckets(
    conn: psycopg.Connection, table: ResolvedTable, within: Collection[int] | None = None
) -> list[int]:
    """The buckets with entries in the change log (optionally only those in `within`)."""
    # A loose index scan over (bucket, id): one probe per bucket, however long the log is.
    found = conn.execute(
        sql.SQL(
            """WITH RECURSIVE b AS (
                   (SELECT bucket FROM {q} ORDER BY bucket LIMIT 1)
                   UNION ALL
                   SELECT (SELECT bucket FROM {q} WHERE bucket > b.bucket ORDER BY bucket LIMIT 1)
                   FROM b WHERE b.bucket IS NOT NULL)
               SELECT bucket FROM b WHERE bucket IS NOT NULL"""
        ).format(q=table.queue)
    ).fetchall()
    buckets = [b for (b,) in found]
    return buckets if within is None else [b for b in buckets if b in within]


def drain_pending(
    engine: EmbeddingEngine,
    buckets: Collection[int] | None,
    should_stop: Callable[[], bool],
) -> dict[int, SyncStats]:
    """Drain every bucket (of `buckets`) that has pending changes, skipping buckets another run
    holds: that run drains them, or the next pass comes back. Returns the stats of each bucket
    that was worked."""
    worked: dict[int, SyncStats] = {}
    engine.drain_wal()
    for bucket in pending_buckets(engine.conn, engine.table, buckets):
        if should_stop():
            break
        try:
            stats = engine.sync_bucket(bucket, full=False, should_stop=should_stop, drain_wal=False)
        except BucketBusy:
            continue
        if stats.rows_seen or stats.changes_cleared:  # not emptied by another run meanwhile
            worked[bucket] = stats
    return worked


def follow_changes(
    engine: EmbeddingEngine,
    listener: ChangeListener,
    on_batch: Callable[[dict[int, SyncStats]], None],
    should_stop: Callable[[], bool],
    buckets: Collection[int] | None = None,
    quiet_seconds: float | None = None,
    max_seconds: float | None = None,
    poll_seconds: float = 10.0,
    wait_slice_seconds: float = 1.0,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Drain changes as they are committed until `should_stop()`, or until no change has come for
    `quiet_seconds`, or `max_seconds` have passed (when given). Each drain that wrote something is passed to `on_batch`.

    Waits on NOTIFY in slices of `wait_slice_seconds`, so a stop request is seen within about that
    long, and drains at least every `poll_seconds` in case a notification was missed. `on_idle` is
    called after every quiet slice (to flush what the caller batches)."""
    started = last_change = time.monotonic()
    next_poll = started  # drain at once: changes may have come before we listened
    while not should_stop():
        now = time.monotonic()
        if now < next_poll and not listener.wait(min(wait_slice_seconds, next_poll - now)):
            if on_idle is not None:
                on_idle()
        else:
            next_poll = time.monotonic() + poll_seconds
            worked = drain_pending(engine, buckets, should_stop)
            if worked:
                last_change = time.monotonic()
                on_batch(worked)
        now = time.monotonic()
        if quiet_seconds is not None and now - last_change >= quiet_seconds:
            return
        if max_seconds is not None and now - started >= max_seconds:
            return
