"""Per-table health figures, for `vectorsync status` and the asset checks."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from .spec import TableSpec


@dataclass(frozen=True)
class TableStatus:
    name: str
    source: str
    source_rows: int
    rows_embedded: int
    rows_current: int  # embedded under the current model fingerprint, with no pending change
    chunks: int
    pending_changes: int
    oldest_change_seconds: float | None
    failed_rows: int
    dead_rows: int
    skipped_rows: int


def require_installed(conn: psycopg.Connection, spec: TableSpec) -> None:
    """Raise LookupError, naming the table, unless `spec` is installed as declared (registered,
    with its store and change log): commands check this before any slow step such as a model load."""
    registered = conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0] is not None
    if registered:
        # The active model version's store and change log, which need not be the declaration's
        # names (assets/versions.py).
        registered = conn.execute(
            "SELECT store_schema, store_table, queue_table FROM vectorsync.embedding_tables WHERE name = %s",
            (spec.name,),
        ).fetchone()
    if not registered:
        raise LookupError(f"table {spec.name} is declared but not installed; run `vectorsync install`")
    store_schema, store_table, queue_table = registered
    for schema, name, what in ((store_schema, store_table, "store"), ("vectorsync", queue_table, "change log")):
        relation = sql.Identifier(schema, name).as_string(conn)
        if conn.execute("SELECT to_regclass(%s)", (relation,)).fetchone()[0] is None:
            raise LookupError(f"table {spec.name}: its {what} {relation} does not exist; "
                              "run `vectorsync install`")


def table_status(conn: psycopg.Connection, name: str) -> TableStatus:
    reg = conn.execute(
        """SELECT source_schema, source_table, store_schema, store_table, queue_table, key_columns,
                  fingerprint, version
           FROM vectorsync.embedding_tables WHERE name = %s""",
        (name,),
    ).fetchone()
    if reg is None:
        raise LookupError(f"table {name} is not installed; run `vectorsync install`")
    src_schema, src_table, store_schema, store_table, queue_table, key_columns, fingerprint, version = reg
    source = sql.Identifier(src_schema, src_table)
    store = sql.Identifier(store_schema, store_table)
    queue = sql.Identifier("vectorsync", queue_table)
    for relation, what in ((source, "source"), (store, "store"), (queue, "change log")):
        if conn.execute("SELECT to_regclass(%s)", (relation.as_string(conn),)).fetchone()[0] is None:
            raise LookupError(f"table {name}: its {what} {relation.as_string(conn)} does not exist")
    keys = sql.SQL(", ").join(sql.Identifier(c) for c in key_columns)
    key_json = sql.SQL("jsonb_build_array({})").format(keys)
    source_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(source)).fetchone()[0]
    # The fingerprint as a literal, not a parameter: with parameters, psycopg would read a % in a
    # table's name as a placeholder.
    embedded, current, chunks = conn.execute(
        sql.SQL(
            """SELECT count(DISTINCT {kj}),
                      count(DISTINCT {kj}) FILTER (WHERE model = {fingerprint} AND {kj} NOT IN
                          (SELECT k FROM {queue} CROSS JOIN LATERAL unnest(row_keys) AS e(k))),
                      count(*)
               FROM {store}"""
        ).format(kj=key_json, queue=queue, store=store, fingerprint=sql.Literal(fingerprint))
    ).fetchone()
    pending, oldest = conn.execute(
        sql.SQL(
            # Distinct keys waiting, and one per bucket waiting for a sweep.
            """SELECT count(DISTINCT coalesce(e.k::text, 'sweep:' || q.bucket)),
                      extract(epoch FROM now() - min(q.queued_at))::float8
               FROM {} q LEFT JOIN LATERAL unnest(q.row_keys) AS e(k) ON true"""
        ).format(queue)
    ).fetchone()
    failed, dead, skipped = conn.execute(
        """SELECT count(*) FILTER (WHERE error_kind <> 'skipped' AND NOT dead),
                  count(*) FILTER (WHERE dead),
                  count(*) FILTER (WHERE error_kind = 'skipped')
           FROM vectorsync.failures WHERE table_name = %s AND version = %s""",
        (name, version),
    ).fetchone()
    return TableStatus(
        name, f"{src_schema}.{src_table}", source_rows, embedded, current, chunks, pending, oldest,
        failed, dead, skipped,
    )


def installed_tables(conn: psycopg.Connection) -> list[str]:
    exists = conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0]
    if exists is None:
        return []
    return [n for (n,) in conn.execute("SELECT name FROM vectorsync.embedding_tables ORDER BY name")]


def change_backlog(conn: psycopg.Connection, change_log: sql.Composable) -> tuple[int, float | None]:
    """Keys waiting in a change log (a sweep request counts as one; an entry holds every key one
    statement changed in a bucket), and the age in seconds of the oldest entry (None if empty)."""
    return conn.execute(
        sql.SQL(
            "SELECT coalesce(sum(coalesce(cardinality(row_keys), 1)), 0)::int, "
            "extract(epoch FROM now() - min(queued_at))::float8 FROM {}"
        ).format(change_log)
    ).fetchone()


def estimated_rows(conn: psycopg.Connection, relation: sql.Composable) -> int | None:
    """The planner's row estimate of a table (None if it does not exist): a count(*) of a large
    table costs a scan, too much for a sensor tick or a run that wrote a few rows."""
    found = conn.execute(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)",
        (relation.as_string(conn),),
    ).fetchone()
    return found[0] if found else None
