"""Session-level advisory locks named by a string: held on a connection, not in a transaction, so
a killed holder's lock goes with its connection. Free of Dagster."""

from __future__ import annotations

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


# A bucket's lock is keyed by two integers rather than one name, as every version so far has
# done, so runs of an older release still exclude newer ones. Never waited for inside the
# database: a run that finds a bucket held does its other buckets first (EmbeddingEngine), and a
# blocking wait could not be given up without cancelling the statement.

def try_bucket_lock(conn: psycopg.Connection, table_name: str, bucket: int) -> bool:
    """Take the lock on (table, bucket) if no other session holds it, so two runs never write the
    same bucket at once; returns whether it was taken. No transaction stays open while it is held."""
    return conn.execute(
        "SELECT pg_try_advisory_lock(hashtext('vectorsync:' || %s), %s)", (table_name, bucket)
    ).fetchone()[0]


def unlock_bucket(conn: psycopg.Connection, table_name: str, bucket: int) -> None:
    if not conn.closed:
        conn.execute("SELECT pg_advisory_unlock(hashtext('vectorsync:' || %s), %s)", (table_name, bucket))
