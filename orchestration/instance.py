"""The Dagster instance: $DAGSTER_HOME/dagster.yaml with every kind of storage on PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import dagster as dg
import psycopg
import yaml
from psycopg import sql

from .database import vectorsync_home

DAGSTER_DATABASE = "dagster"
PASSWORD_ENV = "PGPASSWORD"
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


def instance_config(url: str, max_concurrent_runs: int = 4, pool_limit: int = 2) -> dict:
    """dagster.yaml for a server given by a libpq URL (a unix socket when `host=` names a dir)."""
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
    return {
        "storage": {"postgres": {"postgres_db": db}},
        # Runs wait in the queue for at most a second: freshness is measured in seconds.
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": 1},
        },
        # Runs are forked from a warm parent in the daemon: they start without seconds of imports.
        "run_launcher": {"module": "orchestration.run_launcher", "class": "WarmRunLauncher"},
        "concurrency": {
            "runs": {"max_concurrent_runs": max_concurrent_runs},
            # Each provider is a pool (see the asset's `pool`): parallel runs share one rate limit.
            "pools": {"default_limit": pool_limit},
        },
        # A run stuck starting or canceling (its process gone before it could say so) is failed,
        # so the continuous keeper and the change sensor stop waiting on it.
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "cancel_timeout_seconds": 120},
        "telemetry": {"enabled": False},
    }


def prepare_instance(url: str, home: Path | None = None) -> Path:
    """Create the Dagster database (in UTC) on the server and write dagster.yaml. Idempotent."""
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
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(url), sort_keys=False))
    nux = home / ".nux"
    nux.mkdir(exist_ok=True)
    (nux / "nux.yaml").write_text("seen: 1\n")  # no community pop-up on the first visit
    return home
