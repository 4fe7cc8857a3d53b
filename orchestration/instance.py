"""The Dagster instance: $DAGSTER_HOME/dagster.yaml with every kind of storage on PostgreSQL."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import dagster as dg
import psycopg
import yaml
from psycopg import sql

from .database import vectorsync_home

DAGSTER_DATABASE = "dagster"
# How often Dagster's monitoring daemon looks at runs, and how long after a run ended its pool
# slots are freed if it still holds them (its worker was killed before it could free them). Each
# pass makes 3-4 storage calls, idle or not (3-4 new connections where dagster-postgres's own
# storage is used, as under Dagster's Helm chart): 10 s frees a killed run's slot within about
# 11 s (Dagster's default pass is every 120 s) at half the idle cost of 5 s.
RUN_MONITORING_POLL_SECONDS = 10
FREE_SLOTS_AFTER_RUN_END_SECONDS = 1
# How long a run waits in the queue at most. A change run also waits for the tables sensor's
# tick (15 s) and its own start (2-3 s), so this keeps the first change after a quiet spell
# within the sensor path's freshness targets (p50 15 s, p95 30 s); it costs 3-6 storage calls a pass.
DEQUEUE_SECONDS = 5
PASSWORD_ENV = "PGPASSWORD"
# Opt-in (set to 1 where dagster.yaml is written): Dagster's storage on connections pooled per
# process (orchestration/dagster_storage.py). dagster-postgres has no public way to pool its
# connections (dagster-io/dagster#20325): these classes override the connection hooks of its public
# storage classes, which is behaviour Dagster chose, so they stay off unless asked for. Measured
# (`python -m bench idle`, one table): 2.5 % of a core on the sensor path and 2.7 % in continuous
# mode with them, 4.1-4.5 % and 4.2-5.3 % without; every process that loads the instance must then be
# able to import vectorsync (not so for the daemon and webserver images of Dagster's Helm chart).
POOLED_STORAGE_ENV = "VECTORSYNC_POOLED_DAGSTER_STORAGE"
STORAGE_MODULE = "orchestration.dagster_storage"
STORAGE_CLASSES = {
    "run_storage": "PooledPostgresRunStorage",
    "event_log_storage": "PooledPostgresEventLogStorage",
    "schedule_storage": "PooledPostgresScheduleStorage",
}
# A run in one of these is not over: queued, starting, running or stopping.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME", vectorsync_home() / "dagster_home")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


# Runs at once. A continuous-mode run holds a run slot for as long as it lives, so with 4 slots a
# fifth continuous table never started (measured by `python -m bench idle`: 6 of 10 stayed
# queued). The provider's pool (`pool_limit` per provider) is what bounds the work that costs.
MAX_CONCURRENT_RUNS = 16


def pooled_storage_asked() -> bool:
    return os.environ.get(POOLED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def instance_config(url: str, max_concurrent_runs: int = MAX_CONCURRENT_RUNS, pool_limit: int = 2,
                    pooled_storage: bool | None = None) -> dict:
    """dagster.yaml for a server given by a libpq URL (a unix socket when `host=` names a dir).
    `pooled_storage`: see POOLED_STORAGE_ENV (None: as that variable says)."""
    if pooled_storage is None:
        pooled_storage = pooled_storage_asked()
    parsed = urlparse(url)
    params = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    db = {
        "username": parsed.username or "postgres",
        # Never the password itself in a file: dagster reads it from the environment.
        "password": {"env": PASSWORD_ENV} if parsed.password else "",
        "hostname": parsed.hostname or "",
        "db_name": DAGSTER_DATABASE,
        "port": parsed.port or 5432,
        # SQLAlchemy 2.1 needs the psycopg2 driver named, or event writes fail on NOTIFY.
        "scheme": "postgresql+psycopg2",
    }
    if params:
        db["params"] = params
    # prepare_instance creates the tables once; every process that loads the instance (each
    # sensor evaluation builds one) would otherwise reflect the schema over 3 new connections.
    storage: dict = {"storage": {"postgres": {"postgres_db": db, "should_autocreate_tables": False}}}
    if pooled_storage:
        # dagster-postgres's storages, each process's connections pooled (orchestration/
        # dagster_storage.py): without it the idle daemon opened ~260 sessions a minute.
        storage = {
            key: {"module": STORAGE_MODULE, "class": name,
                  "config": {"postgres_db": copy.deepcopy(db), "should_autocreate_tables": False}}
            for key, name in STORAGE_CLASSES.items()
        }
    return {
        **storage,
        # Runs wait in the queue for at most DEQUEUE_SECONDS. Each pass of the queue makes 3-6
        # storage calls, idle or not (new connections under dagster-postgres's own storage).
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": DEQUEUE_SECONDS},
        },
        # Dagster's default run launcher: each run worker is a process of the code server, which
        # notices within a second when one dies (an OOM kill, a SIGKILL) and fails its run.
        "concurrency": {
            "runs": {"max_concurrent_runs": max_concurrent_runs},
            # Each provider is a pool (see the asset's `pool`): parallel runs share one rate limit.
            "pools": {"default_limit": pool_limit},
        },
        "run_monitoring": {
            "enabled": True,
            # A run stuck starting or canceling (its process gone before it could say so) is failed,
            # so the continuous keeper and the change sensor stop waiting on it.
            "start_timeout_seconds": 180,
            "cancel_timeout_seconds": 120,
            # A killed run worker never gives its pool slots back: the monitoring daemon frees the
            # slots of runs that ended, looking every few seconds (Dagster's default is 120 s).
            "poll_interval_seconds": RUN_MONITORING_POLL_SECONDS,
            "free_slots_after_run_end_seconds": FREE_SLOTS_AFTER_RUN_END_SECONDS,
        },
        # vectorsync's assets use no declarative automation and no freshness policy (its freshness
        # signal is the backlog_age check), yet the asset and freshness daemons would still tick
        # and open connections every few seconds, `enabled: false` alone leaving the asset daemon
        # on for automation sensors. Turn them back on for assets of your own that use them.
        "auto_materialize": {"enabled": False, "use_sensors": False},
        "freshness": {"enabled": False},
        "telemetry": {"enabled": False},
    }


def prepare_instance(url: str, home: Path | None = None, pooled_storage: bool | None = None) -> Path:
    """Create the Dagster database (in UTC) on the server and write dagster.yaml. Idempotent.
    `pooled_storage`: see POOLED_STORAGE_ENV."""
    home = home or dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DAGSTER_DATABASE,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DAGSTER_DATABASE)))
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone TO 'UTC'").format(sql.Identifier(DAGSTER_DATABASE))
        )
    password = urlparse(url).password
    if password and not os.environ.get(PASSWORD_ENV):
        # Processes started from here (dagster dev, the daemon, their runs) inherit it.
        os.environ[PASSWORD_ENV] = unquote(password)
    config = instance_config(url, pooled_storage=pooled_storage)
    _create_dagster_tables(config)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    nux = home / ".nux"
    nux.mkdir(exist_ok=True)
    (nux / "nux.yaml").write_text("seen: 1\n")  # no community pop-up on the first visit
    return home


def _create_dagster_tables(config: dict) -> None:
    """Create Dagster's tables if missing (what dagster-postgres does on every start when
    should_autocreate_tables is on). A schema migration after a Dagster upgrade is still
    `dagster instance migrate`, as with the default."""
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    db = dict((config["run_storage"]["config"] if "run_storage" in config
               else config["storage"]["postgres"])["postgres_db"])
    if isinstance(db.get("password"), dict):
        db["password"] = os.environ[PASSWORD_ENV]
    storage = DagsterPostgresStorage(pg_url_from_config({"postgres_db": db}), should_autocreate_tables=True)
    storage.event_log_storage.dispose()  # the only part that holds a connection (its LISTEN watcher)
