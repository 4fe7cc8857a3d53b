"""`vectorsync install`: the control schema's migrations, then each declared table's objects.

Numbered migrations in sql/migrations run once each and are recorded in vectorsync.migrations;
scripts in sql/functions and sql/table are idempotent and run every time. Running install twice
changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import versions, wal_capture
from .catalog import ResolvedTable, resolve, use_key_text_settings
from .index import index_definition
from .names import slot_name
from .spec import SpecError, TableSpec
from .table_ddl import (
    SQL_DIR, as_version, buckets_stale, create_version_objects, drop_index_of_another_distance, drop_version,
    install_capture, rebucket, replace_view,
)
# Serialises concurrent installs (an arbitrary constant of ours).
INSTALL_LOCK = 7_311_004_221


@dataclass(frozen=True)
class InstallReport:
    migrations_applied: list[str]
    tables: list[str]
    sweeps_requested: list[str]
    # Per table, one line each on what happened to its model versions (a candidate created,
    # superseded, ...); others (a cost estimate, say) may add theirs.
    notes: dict[str, list[str]] = field(default_factory=dict)


def install(
    conn: psycopg.Connection, specs: list[tuple[TableSpec, str]]
) -> InstallReport:
    """Install the control schema and every (spec, origin). All declarations are checked against
    the catalog before any DDL runs; everything happens in one transaction."""
    with conn.transaction():
        resolved = [resolve(conn, spec, origin) for spec, origin in specs]
        for table in resolved:
            if table.spec.capture == "logical":
                wal_capture.check_ready(conn, table)
        use_key_text_settings(conn, local=True)  # rebucketing hashes key texts
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        _load_pgvector(conn)
        conn.execute("CREATE SCHEMA IF NOT EXISTS vectorsync")
        conn.execute(
            """CREATE TABLE IF NOT EXISTS vectorsync.migrations (
                   version int PRIMARY KEY, name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = _apply_migrations(conn)
        for path in sorted((SQL_DIR / "functions").glob("*.sql")):
            conn.execute(path.read_text())
        notes: dict[str, list[str]] = {t.spec.name: [] for t in resolved}
        swept = [t.spec.name for t in resolved if install_table(conn, t, notes[t.spec.name])]
        for table in resolved:
            if table.spec.capture == "logical":
                wal_capture.create_publication(conn, table)
    for table in resolved:
        _switch_capture(conn, table, notes[table.spec.name])
    return InstallReport(applied, [t.spec.name for t in resolved], swept,
                         {name: lines for name, lines in notes.items() if lines})


def _load_pgvector(conn: psycopg.Connection) -> None:
    """Load pgvector's library into this session. The search function sets pgvector's settings
    (hnsw.iterative_scan, hnsw.ef_search), which PostgreSQL knows only once the library is loaded:
    before that, only a superuser may name them in CREATE FUNCTION ... SET, and install as an
    owner role that is not one failed. Any use of the type loads it (LOAD needs a superuser)."""
    schema = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
    ).fetchone()[0]
    conn.execute(sql.SQL("SELECT '[1]'::{}").format(sql.Identifier(schema, "vector")))


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


def install_table(conn: psycopg.Connection, table: ResolvedTable, notes: list[str] | None = None) -> bool:
    """Create or refresh one table's versions (store and change log each), its view and capture
    triggers. Returns whether a sweep of every bucket was requested in any version (first install,
    a new candidate version, a new destination or bucket count, so rows that predate the triggers
    or carry an old fingerprint get embedded). What happened to versions is added to `notes`.

    A declaration whose fingerprint or vector type is the active version's is applied in place, as
    before versions existed. Another one never touches the active store: it becomes (or stays) the
    candidate version, which fills beside it until promoted (assets/promotion.py)."""
    spec = table.spec
    notes = notes if notes is not None else []
    registered = conn.execute(
        "SELECT fingerprint, buckets FROM vectorsync.embedding_tables WHERE name = %s", (spec.name,)
    ).fetchone()
    active = versions.in_state(conn, spec.name, "active")
    same_as_active = active is None or active.shape == versions.shape(spec)
    active_table = as_version(table, active.version if active else 1) if same_as_active \
        else versions.version_table(conn, table, active)
    _register(conn, active_table, same_as_active)
    swept = set()
    if not same_as_active:
        _plan_candidate(conn, table, notes)
    else:
        for old in versions.versions(conn, spec.name, ("candidate",)):
            notes.append(f"candidate version {old.version} dropped: the declaration is the active version's again")
            drop_version(conn, table, old, "superseded: the declaration went back to the active version")
    store_existed = check_existing_store(conn, active_table)
    for vt in versions.live_tables(conn, table):
        existed = store_existed if vt.table.spec.version == active_table.spec.version \
            else check_existing_store(conn, vt.table)
        create_version_objects(conn, vt.table)
        drop_index_of_another_distance(conn, vt.table)
        if spec.index.min_rows == 0:
            # Asked for from the start: the store is empty, so building it here costs nothing.
            conn.execute(index_definition(vt.table, concurrently=False))
        stale = existed and buckets_stale(conn, vt.table)
        if stale or (registered is not None and registered[1] != spec.buckets):
            rebucket(conn, vt.table)
            swept.add(vt.version.version)
        elif not existed:  # a new table, destination or candidate version: an empty store
            swept.add(vt.version.version)
    replace_view(conn, active_table, recreate=False)
    install_capture(conn, table)
    for vt in versions.live_tables(conn, table):
        _check_objects_exist(conn, vt.table, view_and_triggers=vt.version.state == "active")
    for vt in versions.live_tables(conn, table):
        if vt.version.version in swept:
            conn.execute(
                sql.SQL("INSERT INTO {} (bucket, row_keys) SELECT b, NULL FROM generate_series(0, {} - 1) b")
                .format(vt.table.queue, sql.Literal(spec.buckets))
            )
    return bool(swept)


def _switch_capture(conn: psycopg.Connection, table: ResolvedTable, notes: list[str]) -> None:
    """Move a table between capture by triggers and from the WAL, after the install committed,
    never leaving a moment in which neither captures. To the WAL: the full triggers log until the
    slot exists (created outside any transaction, as PostgreSQL requires), then are swapped for the
    wake-only ones. Back to triggers: the install put the full triggers back, so what the slot
    decoded before that goes to the change logs, then the slot and publication are dropped."""
    name = table.spec.name
    if table.spec.capture == "logical":
        if wal_capture.create_slot(conn, name):
            notes.append(f"capture: logical: replication slot {slot_name(name)} created; it keeps WAL until "
                         "drained (by the tables sensor, runs and continuous mode)")
        with conn.transaction():
            install_capture(conn, table, from_wal=True)
    elif (state := wal_capture.slot_state(conn, name)) is not None:
        queues = [vt.table.queue for vt in versions.live_tables(conn, table)]
        if state == "ok":
            wal_capture.drain(conn, table, queues)
        else:
            with conn.transaction():
                wal_capture.log_sweep(conn, table, queues)
        wal_capture.drop_slot_and_publication(conn, name)
        notes.append(f"capture: triggers again; replication slot {slot_name(name)} drained and dropped")


def _register(conn: psycopg.Connection, active: ResolvedTable, declared_is_active: bool) -> None:
    """vectorsync.embedding_tables describes the active version; its row in vectorsync.versions
    follows the declaration's non-shaping fields (buckets, retry, index settings...)."""
    spec = active.spec
    conn.execute(
        """INSERT INTO vectorsync.embedding_tables
               (name, source_schema, source_table, store_schema, store_table, queue_table,
                key_columns, buckets, fingerprint, spec, version)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (name) DO UPDATE SET
               source_schema = excluded.source_schema, source_table = excluded.source_table,
               store_schema = excluded.store_schema, store_table = excluded.store_table,
               queue_table = excluded.queue_table, key_columns = excluded.key_columns,
               buckets = excluded.buckets, fingerprint = excluded.fingerprint, spec = excluded.spec,
               version = excluded.version
           WHERE (embedding_tables.fingerprint, embedding_tables.buckets, embedding_tables.spec,
                  embedding_tables.store_table, embedding_tables.queue_table)
                 IS DISTINCT FROM (excluded.fingerprint, excluded.buckets, excluded.spec,
                                   excluded.store_table, excluded.queue_table)""",
        (
            spec.name, spec.source.schema_, spec.source.table, spec.store_schema, spec.store_name,
            spec.queue_name, [c.name for c in active.key], spec.buckets, spec.fingerprint,
            versions.spec_json(spec), spec.version,
        ),
    )
    conn.execute(
        """INSERT INTO vectorsync.versions AS v (table_name, version, state, fingerprint, spec,
               store_schema, store_table, queue_table, promoted_at)
           VALUES (%s, %s, 'active', %s, %s, %s, %s, %s, now())
           ON CONFLICT (table_name, version) DO UPDATE SET spec = excluded.spec,
               fingerprint = excluded.fingerprint, store_schema = excluded.store_schema,
               store_table = excluded.store_table, queue_table = excluded.queue_table""",
        (spec.name, spec.version, spec.fingerprint, versions.spec_json(spec), spec.store_schema,
         spec.store_name, spec.queue_name),
    )


def _plan_candidate(conn: psycopg.Connection, table: ResolvedTable, notes: list[str]) -> None:
    """The candidate version for a declaration that differs from the active version: the existing
    candidate if it has the same shape, a kept previous version of that shape (current, since
    capture kept writing to it) made candidate again, or a new version; an existing candidate of
    another shape is superseded and dropped."""
    spec = table.spec
    shape = versions.shape(spec)
    others = versions.versions(conn, spec.name, ("candidate", "previous"))
    match = next((v for v in others if v.shape == shape), None)
    for old in others:
        if old.state == "candidate" and old is not match:
            notes.append(f"candidate version {old.version} ({old.fingerprint}) dropped: superseded by a new declaration")
            drop_version(conn, table, old, f"superseded by {spec.fingerprint}")
    if match is not None:
        if match.state == "previous":
            notes.append(f"previous version {match.version} is the candidate again (it was kept current)")
        number = match.version
    else:
        number = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM vectorsync.versions WHERE table_name = %s",
                              (spec.name,)).fetchone()[0]
        notes.append(f"candidate version {number} ({spec.fingerprint}) created beside active; "
                     f"fill it with `vectorsync sync {spec.name}` or a backfill, then `vectorsync promote {spec.name}`")
    candidate = table.spec.as_version(number)
    conn.execute(
        """INSERT INTO vectorsync.versions AS v (table_name, version, state, fingerprint, spec,
               store_schema, store_table, queue_table)
           VALUES (%s, %s, 'candidate', %s, %s, %s, %s, %s)
           ON CONFLICT (table_name, version) DO UPDATE SET state = 'candidate', spec = excluded.spec,
               drop_after = NULL""",
        (spec.name, number, spec.fingerprint, versions.spec_json(candidate), spec.store_schema,
         candidate.store_name, candidate.queue_name),
    )


def _check_objects_exist(conn: psycopg.Connection, table: ResolvedTable, view_and_triggers: bool) -> None:
    """Every object install meant to create is there, on the table it belongs to: DDL that says
    IF NOT EXISTS succeeds quietly when a same-named object is something else, and an install that
    left an index out must fail now, not be found out by a slow search later."""
    spec = table.spec
    names = spec.object_names
    store = (spec.store_schema, names["store"])
    queue = ("vectorsync", names["queue"])
    expected_relations = [
        ("store", store, None), ("change log", queue, None),
        ("text-hash index", (spec.store_schema, names["hash_index"]), store),
        ("bucket index", (spec.store_schema, names["bucket_index"]), store),
        ("full-text index", (spec.store_schema, names["fts_index"]), store),
        ("change-log index", ("vectorsync", names["queue_bucket_index"]), queue),
    ]
    if spec.index.min_rows == 0:
        expected_relations.append(("vector index", (spec.store_schema, names["hnsw_index"]), store))
    if view_and_triggers:
        expected_relations.append(("view", (spec.store_schema, names["view"]), None))
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
                if view_and_triggers and names[t] not in triggers]
    if missing:
        raise SpecError(table.origin, "destination", f"table {spec.name}: install did not create "
                        f"{', '.join(missing)}; is another object using that name?")


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
    if found[0] != wanted and not _is_another_version(conn, table):
        field = "vector_type" if not found[0].startswith(f"{spec.vector_type}(") else "provider.dimensions"
        raise SpecError(
            table.origin, field,
            f"table {spec.name}: the store {spec.store_schema}.{spec.store_name} holds {found[0]} vectors, "
            f"not {wanted}, and is no model version of this table; is another table using that name?",
        )
    return True


def _is_another_version(conn: psycopg.Connection, table: ResolvedTable) -> bool:
    """Whether the store is registered as a model version of this table: a declaration of another
    dimension or vector type is then a new version (install creates it), not a clash."""
    spec = table.spec
    return versions.installed(conn) and conn.execute(
        "SELECT 1 FROM vectorsync.versions WHERE table_name = %s AND store_schema = %s AND store_table = %s",
        (spec.name, spec.store_schema, spec.store_name),
    ).fetchone() is not None
