"""Dagster's instance storage on PostgreSQL, with each process's connections kept open.

dagster-postgres gives every storage call a new connection (a NullPool, with no setting for a
pool: dagster-io/dagster#20325), so an idle daemon opened about 260 PostgreSQL sessions a minute,
each a backend forked, authenticated, warmed and torn down: the largest part of the idle stack's
CPU. These are dagster-postgres's own storage classes, named in dagster.yaml (Dagster's documented
`run_storage` / `event_log_storage` / `schedule_storage` custom classes), that hand out connections
from one small pool per process and database instead, through the hooks a SQL storage defines
(`connect`, `run_connection`, `index_connection`). Everything else is dagster-postgres's.

The pool is per process, not per storage or per DagsterInstance: a code server builds an instance
for every sensor evaluation, and a pool per instance would leave connections open with each one.
The webserver keeps the pool Dagster gives it (`optimize_for_webserver`, with its statement
timeout). Every process that loads the instance must be able to import this module: `dagster dev`,
`dg dev`, `dagster-daemon` and `dagster-webserver` started from this project's environment can."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import sqlalchemy as db
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from dagster_postgres.utils import create_pg_connection, get_token_provider_from_config, pg_url_from_config
from sqlalchemy.engine import Connection

# Connections kept open per process when idle. The daemon's threads (sensors, schedules, run queue,
# monitoring, backfills) seldom query at the same instant; a call that finds both busy opens one
# more, closed when it is done (no cap: Dagster sometimes nests calls, and must never wait).
POOL_SIZE = 2
# A kept connection is replaced after an hour, so a backend's caches do not grow for weeks.
POOL_RECYCLE_SECONDS = 3600

# (pid, url) -> engine. Keyed by process: a forked child must open its own connections, and never
# close its parent's (closing a socket it shares would end the parent's session), so a parent's
# engine is kept here, unused, rather than dropped.
_engines: dict[tuple[int, str], db.engine.Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(url: str) -> db.engine.Engine:
    """This process's pooled engine for Dagster's database at `url`."""
    key = (os.getpid(), url)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = db.create_engine(
                url, isolation_level="AUTOCOMMIT", pool_size=POOL_SIZE, max_overflow=-1,
                # A kept connection may have died with a server restart or a network blip: tested
                # (one round trip on a warm backend) before it is lent, replaced if dead.
                pool_pre_ping=True, pool_recycle=POOL_RECYCLE_SECONDS,
            )
            _engines[key] = engine
        return engine


class _Pooled:
    """What the three storages share: connections from this process's pool, unless the webserver
    pooled them already or a cloud IAM token provider must renew each connection's password."""

    postgres_url: str
    _vectorsync_pooled: bool = True

    @contextmanager
    def _pooled_connection(self) -> Iterator[Connection]:
        # create_pg_connection retries a connection that fails to open, as dagster-postgres does.
        with create_pg_connection(shared_engine(self.postgres_url)) as conn:
            yield conn

    def optimize_for_webserver(self, statement_timeout: int, pool_recycle: int, max_overflow: int) -> None:
        super().optimize_for_webserver(statement_timeout, pool_recycle, max_overflow)  # type: ignore[misc]
        self._vectorsync_pooled = False

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> Any:
        token_provider = get_token_provider_from_config(config_value)
        storage = cls(  # type: ignore[call-arg]
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=token_provider,
        )
        storage._vectorsync_pooled = token_provider is None
        return storage


class PooledPostgresRunStorage(_Pooled, PostgresRunStorage):
    """dagster-postgres's run storage, on this process's pooled connections."""

    def connect(self) -> AbstractContextManager[Connection]:
        return self._pooled_connection() if self._vectorsync_pooled else super().connect()


class PooledPostgresScheduleStorage(_Pooled, PostgresScheduleStorage):
    """dagster-postgres's schedule storage (sensor and schedule state, ticks), on this process's
    pooled connections: the sensor daemon's pass every 5 s makes most of the idle daemon's calls."""

    def connect(self, run_id: str | None = None) -> AbstractContextManager[Connection]:
        return self._pooled_connection() if self._vectorsync_pooled else super().connect(run_id)


class PooledPostgresEventLogStorage(_Pooled, PostgresEventLogStorage):
    """dagster-postgres's event log storage, on this process's pooled connections: a run writes
    each of its events with a call of its own. Its LISTEN watcher keeps its own connection."""

    def run_connection(self, run_id: str | None = None) -> AbstractContextManager[Connection]:
        return self._pooled_connection() if self._vectorsync_pooled else super().run_connection(run_id)

    def index_connection(self) -> AbstractContextManager[Connection]:
        return self._pooled_connection() if self._vectorsync_pooled else super().index_connection()
