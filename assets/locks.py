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
