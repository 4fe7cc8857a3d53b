"""Session-level advisory locks named by a string: held on a connection, not in a transaction, so
a killed holder's lock goes with its connection. Free of Dagster."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


def try_lock(conn: psycopg.Connection, name: str) -> bool:
    """Take the lock `name` if nobody holds it; returns whether it was taken."""
    return conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,)).fetchone()[0]


def unlock(conn: psycopg.Connection, name: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))


def held_elsewhere(conn: psycopg.Connection, name: str) -> bool:
    """Whether another session holds the lock. (Taking it for a moment to find out is harmless
    to a holder-to-be, which retries.)"""
    if not try_lock(conn, name):
        return True
    unlock(conn, name)
    return False


class BucketBusy(RuntimeError):
    """Another run holds a bucket this run asked for, longer than it was willing to wait."""


@contextmanager
def bucket_lock(conn: psycopg.Connection, table_name: str, bucket: int, wait_seconds: float) -> Iterator[None]:
    """Hold the lock on (table, bucket), so two runs never write the same bucket at once; waits up
    to `wait_seconds` for it (polling, backing off to 1 s), then raises BucketBusy. No transaction
    stays open while a run waits for its provider. (Keyed by two integers rather than one name, as
    every version so far has done, so runs of an older release still exclude newer ones.)"""
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while not conn.execute(
        "SELECT pg_try_advisory_lock(hashtext('vectorsync:' || %s), %s)", (table_name, bucket)
    ).fetchone()[0]:
        if time.monotonic() > deadline:
            raise BucketBusy(f"table {table_name}: bucket {bucket} is held by another run")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(hashtext('vectorsync:' || %s), %s)", (table_name, bucket))
