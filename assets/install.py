"""`vectorsync install`: the control schema's migrations, then each declared table's objects.

Numbered migrations in sql/migrations run once each and are recorded in vectorsync.migrations;
scripts in sql/functions and sql/table are idempotent and run every time. Running install twice
changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from .catalog import KEY_TEXT_SETTINGS, ResolvedTable, resolve, use_key_text_settings
from .index import OPERATOR_CLASSES, index_definition, index_name
from .spec import SpecError, TableSpec

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# Serialises concurrent installs (an arbitrary constant of ours).
INSTALL_LOCK = 7_311_004_221


@dataclass(frozen=True)
class InstallReport:
    migrations_applied: list[str]
    tables: list[str]
    sweeps_requested: list[str]


def install(
    conn: psycopg.Connection, specs: list[tuple[TableSpec, str]]
) -> InstallReport:
    """Install the control schema and every (spec, origin). All declarations are checked against
    the catalog before any DDL runs; everything happens in one transaction."""
    with conn.transaction():
        resolved = [resolve(conn, spec, origin) for spec, origin in specs]
        use_key_text_settings(conn, local=True)  # rebucketing hashes key texts
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE SCHEMA IF NOT EXISTS vectorsync")
        conn.execute(
            """CREATE TABLE IF NOT EXISTS vectorsync.migrations (
                   version int PRIMARY KEY, name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = _apply_migrations(conn)
        for path in sorted((SQL_DIR / "functions").glob("*.sql")):
            conn.execute(path.read_text())
        swept = [t.spec.name for t in resolved if install_table(conn, t)]
    return InstallReport(applied, [t.spec.name for t in resolved], swept)


def _apply_migrations(conn: psycopg.Connection) -> list[str]:
    done = {v for (v,) in conn.execute("SELECT version FROM vectorsync.migrations")}
    applied = []
    for path in sorted((SQL_DIR / "migrations").glob("*.sql")):
        version = int(path.name.split("_", 1)[0])
        if version in done:
            continue
        conn.execute(path.read_text())
        conn.execute(
            "INSERT INTO vectorsync.migrations (version, name) VALUES (%s, %s)", (version, path.stem)
        )
        applied.append(path.stem)
    return applied


def table_objects(table: ResolvedTable) -> dict[str, sql.Composable]:
    """The placeholders of sql/table/*.sql for one table."""
    spec = table.spec
    names = spec.object_names
    vector_type = f"{spec.vector_type}({spec.provider.dimensions})"

    def compared(alias: str) -> sql.Composed:
        return sql.SQL(", ").join(
            sql.SQL("{}" if c.comparable else "{}::text").format(sql.Identifier(alias, c.name))
            for c in table.text_columns
        )

    return {
        "store_schema": sql.Identifier(spec.store_schema),
        "store": table.store,
        "view": table.view,
        "queue": table.queue,
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


def install_table(conn: psycopg.Connection, table: ResolvedTable) -> bool:
    """Create or refresh one table's store, change log, view and triggers. Returns whether
    a sweep of every bucket was requested (first install, or a new model, template or bucket count,
    so rows that predate the triggers or carry an old fingerprint get embedded)."""
    spec = table.spec
    objects = table_objects(table)
    store_existed = check_existing_store(conn, table)
    for name in ("store.sql", "capture.sql"):
        conn.execute(sql.SQL((SQL_DIR / "table" / name).read_text()).format(**objects))
    _drop_index_of_another_distance(conn, table)
    if spec.index.min_rows == 0:
        # Asked for from the start: the store is empty, so building it here costs nothing.
        conn.execute(index_definition(table, concurrently=False))
    _check_objects_exist(conn, table)
    previous = conn.execute(
        "SELECT fingerprint, buckets FROM vectorsync.embedding_tables WHERE name = %s", (spec.name,)
    ).fetchone()
    conn.execute(
        """INSERT INTO vectorsync.embedding_tables
               (name, source_schema, source_table, store_schema, store_table, queue_table,
                key_columns, buckets, fingerprint, spec)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (name) DO UPDATE SET
               source_schema = excluded.source_schema, source_table = excluded.source_table,
               store_schema = excluded.store_schema, store_table = excluded.store_table,
               queue_table = excluded.queue_table, key_columns = excluded.key_columns,
               buckets = excluded.buckets, fingerprint = excluded.fingerprint, spec = excluded.spec
           WHERE (embedding_tables.fingerprint, embedding_tables.buckets, embedding_tables.spec)
                 IS DISTINCT FROM (excluded.fingerprint, excluded.buckets, excluded.spec)""",
        (
            spec.name, spec.source.schema_, spec.source.table, spec.store_schema, spec.store_name,
            spec.queue_name, [c.name for c in table.key], spec.buckets, spec.fingerprint,
            json.dumps(spec.model_dump(mode="json", by_alias=True)),
        ),
    )
    stale_buckets = store_existed and _buckets_stale(conn, table)
    if previous == (spec.fingerprint, spec.buckets) and store_existed and not stale_buckets:
        return False  # a new destination is an empty store: it needs the sweep too
    if stale_buckets or (previous is not None and previous[1] != spec.buckets):
        _rebucket(conn, table)
    conn.execute(
        sql.SQL("INSERT INTO {} (bucket, row_keys) SELECT b, NULL FROM generate_series(0, {} - 1) b").format(
            table.queue, sql.Literal(spec.buckets)
        )
    )
    return True


def _check_objects_exist(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """Every object install meant to create is there, on the table it belongs to: DDL that says
    IF NOT EXISTS succeeds quietly when a same-named object is something else, and an install that
    left an index out must fail now, not be found out by a slow search later."""
    spec = table.spec
    names = spec.object_names
    store = (spec.store_schema, names["store"])
    queue = ("vectorsync", names["queue"])
    expected_relations = [
        ("store", store, None), ("view", (spec.store_schema, names["view"]), None), ("change log", queue, None),
        ("text-hash index", (spec.store_schema, names["hash_index"]), store),
        ("bucket index", (spec.store_schema, names["bucket_index"]), store),
        ("full-text index", (spec.store_schema, names["fts_index"]), store),
        ("change-log index", ("vectorsync", names["queue_bucket_index"]), queue),
    ]
    if spec.index.min_rows == 0:
        expected_relations.append(("vector index", (spec.store_schema, names["hnsw_index"]), store))
    missing = []
    for role, (schema, name), on in expected_relations:
        found = conn.execute(
            """SELECT coalesce(i.indrelid, c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_index i ON i.indexrelid = c.oid
               WHERE n.nspname = %s AND c.relname = %s""",
            (schema, name),
        ).fetchone()
        owner = None if on is None else conn.execute(
            "SELECT to_regclass(%s)::oid", (sql.Identifier(*on).as_string(conn),)
        ).fetchone()[0]
        if found is None or (on is not None and found[0] != owner):
            missing.append(f"{role} {schema}.{name}" + ("" if on is None else f" on {on[0]}.{on[1]}"))
    triggers = {n for (n,) in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s)", (table.source.as_string(conn),)
    )}
    missing += [f"trigger {names[t]} on {spec.source.qualified}"
                for t in ("insert_trigger", "update_trigger", "delete_trigger", "truncate_trigger")
                if names[t] not in triggers]
    if missing:
        raise SpecError(table.origin, "destination", f"table {spec.name}: install did not create "
                        f"{', '.join(missing)}; is another object using that name?")


def _buckets_stale(conn: psycopg.Connection, table: ResolvedTable) -> bool:
    """Whether stored chunks carry buckets that bucket_of no longer gives them: a new bucket
    count, or a store written by a version that hashed keys another way."""
    # Several rows: with 16 buckets, one row keeps its bucket under another hash one time in 16.
    found = conn.execute(
        sql.SQL("SELECT bool_or(bucket <> {}) FROM (SELECT * FROM {} LIMIT 64) s").format(
            table.bucket_expr("s"), table.store
        )
    ).fetchone()
    return bool(found and found[0])


def check_existing_store(conn: psycopg.Connection, table: ResolvedTable) -> bool:
    """Whether the store exists already; refuses a declaration whose vectors no longer fit it
    (another size or type), before any DDL, rather than letting every run fail on write."""
    spec = table.spec
    found = conn.execute(
        """SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
           WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding' AND NOT a.attisdropped""",
        (table.store.as_string(conn),),
    ).fetchone()
    if found is None:
        return False
    wanted = f"{spec.vector_type}({spec.provider.dimensions})"
    if found[0] != wanted:
        field = "vector_type" if not found[0].startswith(f"{spec.vector_type}(") else "provider.dimensions"
        raise SpecError(
            table.origin, field,
            f"table {spec.name}: the store {spec.store_schema}.{spec.store_name} holds {found[0]} vectors, "
            f"not {wanted}; declare a new `destination` to embed side by side (docs/changing-a-model.md)",
        )
    return True


def _drop_index_of_another_distance(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """A changed `distance` needs an index with another operator class: drop the old one, and
    the index upkeep schedule builds the new one (or install does, with index.min_rows 0)."""
    spec = table.spec
    definition = conn.execute(
        "SELECT pg_get_indexdef(to_regclass(%s))",
        (sql.Identifier(spec.store_schema, index_name(table)).as_string(conn),),
    ).fetchone()[0]
    if definition and OPERATOR_CLASSES[(spec.vector_type, spec.distance)] not in definition:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(spec.store_schema, index_name(table))))


def _rebucket(conn: psycopg.Connection, table: ResolvedTable) -> None:
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
        "UPDATE vectorsync.failures SET bucket = vectorsync.bucket_of(row_key, %s) WHERE table_name = %s",
        (table.spec.buckets, table.spec.name),
    )
