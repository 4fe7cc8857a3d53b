"""The per-table DDL of sql/table, for one model version or for the table as a whole. Free of Dagster.

- A version's own objects (sql/table/store.sql): its store, change log and their indexes.
- The table's view (sql/table/view.sql) over the ACTIVE version's store.
- The table's capture function and triggers (sql/table/capture.sql), which write each change to
  the change log of every live version, so a candidate and a kept previous version stay current.
- Dropping a version that is no longer live, with its space reported.
Install, promotion and rollback all go through here, so the capture function is rewritten in the
same transaction as any change of the set of live versions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psycopg
from psycopg import sql

from .catalog import KEY_TEXT_SETTINGS, ResolvedTable
from .index import OPERATOR_CLASSES, index_name
from .names import slot_name
from .versions import Version, live_tables

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def table_objects(table: ResolvedTable, text_columns: tuple | None = None) -> dict[str, sql.Composable]:
    """The placeholders of sql/table/*.sql for one table (one version of it). `text_columns`: the
    columns whose changes are captured, when they are more than this version's own."""
    spec = table.spec
    names = spec.object_names
    vector_type = f"{spec.vector_type}({spec.provider.dimensions})"
    compared_columns = text_columns if text_columns is not None else table.text_columns

    def compared(alias: str) -> sql.Composed:
        return sql.SQL(", ").join(
            sql.SQL("{}" if c.comparable else "{}::text").format(sql.Identifier(alias, c.name))
            for c in compared_columns
        )

    return {
        "store_schema": sql.Identifier(spec.store_schema),
        "store": table.store,
        "view": table.view,
        "queue": table.queue,
        "fan_out": fan_out([table.queue]),
        "source": table.source,
        "key_definitions": sql.SQL(", ").join(
            sql.SQL("{} {} NOT NULL").format(sql.Identifier(c.name), sql.SQL(c.type_sql)) for c in table.key
        ),
        "key_columns": table.key_list(),
        "vector_type": sql.SQL(vector_type),
        "hash_index": sql.Identifier(names["hash_index"]),
        "bucket_index": sql.Identifier(names["bucket_index"]),
        "fts_index": sql.Identifier(names["fts_index"]),
        "fts_index_qualified": sql.Literal(sql.Identifier(spec.store_schema, names["fts_index"]).as_string()),
        "store_qualified": sql.Literal(table.store.as_string()),
        "text_search_config": sql.Literal(spec.text_search_config),
        "queue_bucket_index": sql.Identifier(names["queue_bucket_index"]),
        "queue_qualified": sql.Literal(table.queue.as_string()),
        "store_source_join": table.key_equal("e", "s"),
        "capture_function": sql.Identifier("vectorsync", names["capture_function"]),
        "buckets": sql.Literal(spec.buckets),
        "new_key": table.key_json("n"),
        "old_key": table.key_json("o"),
        "new_bucket": table.bucket_expr("n"),
        "old_bucket": table.bucket_expr("o"),
        "old_new_join": table.key_equal("o", "n"),
        "first_key": sql.Identifier(table.key[0].name),
        "old_values": compared("o"),
        "new_values": compared("n"),
        "table_name": sql.Literal(spec.name),
        "key_text_settings": sql.SQL(" ").join(
            sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            for name, value in KEY_TEXT_SETTINGS.items()
        ),
        "insert_trigger": sql.Identifier(names["insert_trigger"]),
        "update_trigger": sql.Identifier(names["update_trigger"]),
        "delete_trigger": sql.Identifier(names["delete_trigger"]),
        "truncate_trigger": sql.Identifier(names["truncate_trigger"]),
    }


def fan_out(queues: list[sql.Composable]) -> sql.Composed:
    """The tail of `WITH c(bucket, row_keys) AS (...)`: insert c into every change log."""
    insert = sql.SQL("INSERT INTO {} (bucket, row_keys) SELECT bucket, row_keys FROM c")
    extra = [sql.SQL(", {} AS ({})").format(sql.Identifier(f"log_{i}"), insert.format(q))
             for i, q in enumerate(queues[1:])]
    return sql.Composed([*extra, sql.SQL(" "), insert.format(queues[0])])


def run_script(conn: psycopg.Connection, name: str, objects: dict[str, sql.Composable]) -> None:
    conn.execute(sql.SQL((SQL_DIR / "table" / name).read_text()).format(**objects))


def create_version_objects(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """A version's store and change log, and their indexes (idempotent)."""
    run_script(conn, "store.sql", table_objects(table))


def replace_view(conn: psycopg.Connection, active: ResolvedTable, recreate: bool) -> None:
    """Point the table's view at the active version's store. With `recreate`, a view whose
    embedding column has another type than the store's is dropped first (CREATE OR REPLACE VIEW
    cannot change a column's type), and the privileges granted on it are granted again."""
    view = active.view.as_string(conn)
    found = conn.execute(
        """SELECT format_type(a.atttypid, a.atttypmod) IS DISTINCT FROM %s::text,
                  ARRAY(SELECT format('GRANT %%s ON %%s TO %%s%%s', x.privilege_type, %s::text,
                                      CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
                                      CASE WHEN x.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
                        FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) x
                        LEFT JOIN pg_roles r ON r.oid = x.grantee
                        WHERE c.oid = to_regclass(%s::text) AND x.grantee <> c.relowner)
           FROM pg_attribute a WHERE a.attrelid = to_regclass(%s::text) AND a.attname = 'embedding'""",
        (f"{active.spec.vector_type}({active.spec.provider.dimensions})", view, view, view),
    ).fetchone()
    if recreate and found is not None and found[0]:
        conn.execute(sql.SQL("DROP VIEW {}").format(active.view))
        run_script(conn, "view.sql", table_objects(active))
        for grant in found[1]:
            conn.execute(grant)
        return
    run_script(conn, "view.sql", table_objects(active))


def install_capture(conn: psycopg.Connection, declared: ResolvedTable, from_wal: bool | None = None) -> None:
    """The capture function and triggers, writing to the change log of every live version (as
    vectorsync.versions has them now, in this transaction) and comparing the columns any of those
    versions renders. `from_wal`: the table's slot captures (assets/wal_capture.py), so the
    triggers only wake continuous mode; None: as the declaration says, when its slot is healthy."""
    live = live_tables(conn, declared)
    columns: dict[str, object] = {}
    for vt in live:
        columns.update({c.name: c for c in vt.table.text_columns})
    objects = table_objects(declared, tuple(columns.values()))
    objects["fan_out"] = fan_out([vt.table.queue for vt in live])
    if from_wal is None:
        from_wal = declared.spec.capture == "logical" and slot_state(conn, declared.spec.name) == "ok"
    if from_wal:
        watched = {c.name: None for c in (*declared.key, *columns.values())}  # type: ignore[attr-defined]
        objects["watched_columns"] = sql.SQL(", ").join(sql.Identifier(c) for c in watched)
        run_script(conn, "capture_wake.sql", objects)
    else:
        run_script(conn, "capture.sql", objects)


def slot_state(conn: psycopg.Connection, table_name: str) -> str | None:
    """The table's replication slot (assets/wal_capture.py): None when it does not exist, 'lost'
    when PostgreSQL invalidated it, else 'ok'. Here, beside install_capture, which it decides."""
    found = conn.execute(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot_name(table_name),)
    ).fetchone()
    if found is None:
        return None
    return "lost" if found[0] == "lost" else "ok"


def triggers_capture(conn: psycopg.Connection, declared: ResolvedTable) -> bool:
    """Whether the table's capture triggers log changes themselves (sql/table/capture.sql, with
    transition tables), rather than only waking continuous mode (capture_wake.sql)."""
    return conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s AND tgnewtable IS NOT NULL",
        (declared.source.as_string(conn), declared.spec.object_names["insert_trigger"]),
    ).fetchone() is not None


def relation_bytes(conn: psycopg.Connection, *relations: sql.Identifier) -> int:
    """pg_total_relation_size of these relations (0 for one that does not exist)."""
    total = 0
    for relation in relations:
        found = conn.execute("SELECT pg_total_relation_size(to_regclass(%s))",
                             (relation.as_string(conn),)).fetchone()[0]
        total += found or 0
    return total


def drop_version(conn: psycopg.Connection, declared: ResolvedTable, version: Version, why: str) -> int:
    """Drop a version's store, change log and ledger rows, mark it retired, and rewrite the capture
    function without its change log, all in the caller's transaction; returns the bytes freed."""
    freed = relation_bytes(conn, version.store, version.queue)
    conn.execute(
        """UPDATE vectorsync.versions SET state = 'retired', retired_at = coalesce(retired_at, now()),
                  drop_after = NULL, freed_bytes = %s, note = %s
           WHERE table_name = %s AND version = %s""",
        (freed, why, version.table_name, version.version),
    )
    install_capture(conn, declared)  # before the drop: the function must not name a dropped log
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(version.store))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(version.queue))
    conn.execute("DELETE FROM vectorsync.failures WHERE table_name = %s AND version = %s",
                 (version.table_name, version.version))
    return freed


def as_version(table: ResolvedTable, number: int) -> ResolvedTable:
    """The declared table as version `number` (same shape, that version's store and change log)."""
    return replace(table, spec=table.spec.as_version(number))


def buckets_stale(conn: psycopg.Connection, table: ResolvedTable) -> bool:
    """Whether stored chunks carry buckets that bucket_of no longer gives them: a new bucket
    count, or a store written by a version that hashed keys another way."""
    # Several rows: with 16 buckets, one row keeps its bucket under another hash one time in 16.
    found = conn.execute(
        sql.SQL("SELECT bool_or(bucket <> {}) FROM (SELECT * FROM {} LIMIT 64) s").format(
            table.bucket_expr("s"), table.store
        )
    ).fetchone()
    return bool(found and found[0])


def drop_index_of_another_distance(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """A changed `distance` needs an index with another operator class: drop the old one, and
    the index upkeep schedule builds the new one (or install does, with index.min_rows 0)."""
    spec = table.spec
    definition = conn.execute(
        "SELECT pg_get_indexdef(to_regclass(%s))",
        (sql.Identifier(spec.store_schema, index_name(table)).as_string(conn),),
    ).fetchone()[0]
    if definition and OPERATOR_CLASSES[(spec.vector_type, spec.distance)] not in definition:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(spec.store_schema, index_name(table))))


def rebucket(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """A new bucket count moves stored chunks, pending changes and failures to their new buckets."""
    buckets = sql.Literal(table.spec.buckets)
    conn.execute(sql.SQL("UPDATE {} SET bucket = {}").format(table.store, table.bucket_expr()))
    # Pending keys are logged again under their new buckets; sweep requests are dropped, since
    # the caller asks for a sweep of every bucket.
    conn.execute(
        sql.SQL(
            """WITH old AS (DELETE FROM {q} RETURNING row_keys)
               INSERT INTO {q} (bucket, row_keys)
               SELECT vectorsync.bucket_of(k, {n}), array_agg(k)
               FROM old CROSS JOIN LATERAL unnest(old.row_keys) AS e(k)
               GROUP BY 1"""
        ).format(q=table.queue, n=buckets)
    )
    conn.execute(
        "UPDATE vectorsync.failures SET bucket = vectorsync.bucket_of(row_key, %s) WHERE table_name = %s AND version = %s",
        (table.spec.buckets, table.spec.name, table.spec.version),
    )
