"""Dagster resources: the database every asset, check and sensor talks to."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from psycopg_pool import ConnectionPool

from .database import connect, database_url

# One small pool per database per process: a sensor is evaluated every few seconds in the code
# server, and opening a connection for each tick (a PostgreSQL backend forked, authenticated and
# torn down) was most of the idle stack's CPU. Runs keep their own connections.
_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


# One tick of the tables sensor looks at every table in turn: a change log locked by a long
# statement (an ALTER, a TRUNCATE) fails that table's part of the tick instead of holding up all.
SENSOR_LOCK_TIMEOUT = "5s"


def _configure(conn: psycopg.Connection) -> None:
    conn.execute("SET application_name = 'vectorsync sensors'")
    conn.execute(f"SET lock_timeout = '{SENSOR_LOCK_TIMEOUT}'")


def _pool(url: str) -> ConnectionPool:
    with _pools_lock:
        pool = _pools.get(url)
        if pool is None:
            # check= tests a pooled connection before lending it: a database restart between
            # ticks costs one reconnect, not a failed tick.
            pool = ConnectionPool(url, min_size=0, max_size=4, max_idle=300, kwargs={"autocommit": True},
                                  configure=_configure, check=ConnectionPool.check_connection, open=True,
                                  name="vectorsync-sensors")
            _pools[url] = pool
        return pool


class VectorsyncDatabase(dg.ConfigurableResource):
    """The PostgreSQL database with the source tables, the stores and the control schema.
    Without a URL, the embedded server in $VECTORSYNC_HOME is used."""

    url: str | None = None

    def connect(self) -> psycopg.Connection:
        return connect(self.url)

    @contextmanager
    def pooled(self) -> Iterator[psycopg.Connection]:
        """A connection kept open between calls, for sensors and schedules that query a little
        every few seconds; give it back in the state it was lent (autocommit, no open transaction)."""
        with _pool(self.resolved_url()).connection() as conn:
            yield conn

    def resolved_url(self) -> str:
        return self.url or database_url()


def database_resource() -> VectorsyncDatabase:
    # EnvVar keeps a password in DATABASE_URL out of the UI and the run config.
    if os.environ.get("DATABASE_URL"):
        return VectorsyncDatabase(url=dg.EnvVar("DATABASE_URL"))
    return VectorsyncDatabase()
