"""A least-privilege role for runs: read the sources, write the store and the control tables.

`vectorsync install --grant ROLE` calls `grant_run_role` after the install. What a run needs, and
nothing more:
  - the source schemas: USAGE; the source tables: SELECT (the role can never change the user's data);
  - the store schemas: USAGE; each store table and change log: SELECT, INSERT, UPDATE, DELETE; the
    change log's id sequence: USAGE (re-queued retries insert into the log); each view: SELECT;
  - the vectorsync schema: USAGE; the failure ledger: SELECT, INSERT, UPDATE, DELETE; the record of
    failed runs (written by the run-failure sensor): SELECT, INSERT; the run ledger (each run's
    figures and spend, vectorsync.runs and run_buckets): SELECT, INSERT, UPDATE; batch mode's jobs,
    items and vector cache: SELECT, INSERT, UPDATE, DELETE, and the jobs' id sequence: USAGE
    (collecting a batch also uses a temporary table, which PostgreSQL allows every role by
    default); the registry, the
    migrations table and the failure report: SELECT; every vectorsync function: EXECUTE.
No CREATE on any schema and no ownership, so the role can run no DDL: it cannot drop or truncate a
store, alter a trigger or add a table. Advisory locks, LISTEN and pg_notify need no grant. Building
the HNSW index (CREATE INDEX) needs the store's owner, so index upkeep must not run as this role.

Grants are per table, so a table declared later needs `install --grant ROLE` again; GRANT is
idempotent, so re-running it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import versions
from .catalog import ResolvedTable

RUN_WRITE = sql.SQL("SELECT, INSERT, UPDATE, DELETE")


class GrantError(ValueError):
    """A grant that cannot be made, naming the role."""


@dataclass(frozen=True)
class GrantReport:
    role: str
    tables: list[str]
    statements: int


def grant_run_role(conn: psycopg.Connection, tables: list[ResolvedTable], role: str) -> GrantReport:
    """Grant `role` what runs of `tables` need, in one transaction. The role must exist already:
    creating roles (and their passwords) is the database administrator's business, not ours."""
    statements: list[sql.Composable] = []
    who = sql.Identifier(role)
    with conn.transaction():
        exists = conn.execute("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists is None:
            raise GrantError(f"role {role!r} does not exist; create it first (CREATE ROLE {role} LOGIN)")
        logical = [t.spec.name for t in tables if t.spec.capture == "logical"]
        if logical and not exists[0]:
            # Reading a replication slot takes the REPLICATION attribute, which no GRANT gives.
            raise GrantError(f"role {role!r}: table {logical[0]} has capture: logical, and draining its replication "
                             f"slot needs the REPLICATION attribute: ALTER ROLE {role} REPLICATION (as a superuser)")
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA vectorsync TO {}").format(who),
            sql.SQL("GRANT SELECT ON vectorsync.embedding_tables, vectorsync.migrations, "
                    "vectorsync.failure_report TO {}").format(who),
            sql.SQL("GRANT {} ON vectorsync.failures TO {}").format(RUN_WRITE, who),
            sql.SQL("GRANT SELECT, INSERT ON vectorsync.run_failures TO {}").format(who),
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON vectorsync.runs, vectorsync.run_buckets TO {}").format(who),
            # Batch mode (migration 005): runs record, poll and finish batch jobs and read the cache.
            sql.SQL("GRANT {} ON vectorsync.batch_jobs, vectorsync.batch_items, vectorsync.batch_vectors TO {}")
            .format(RUN_WRITE, who),
            sql.SQL("GRANT USAGE ON SEQUENCE vectorsync.batch_jobs_id_seq TO {}").format(who),
            # Functions are executable by PUBLIC by default, but a hardened database revokes that.
            sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA vectorsync TO {}").format(who),
        ]
        schemas = sorted({t.spec.source.schema_ for t in tables} | {t.spec.store_schema for t in tables})
        statements += [sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(s), who) for s in schemas]
        if versions.installed(conn):
            statements.append(sql.SQL("GRANT SELECT ON vectorsync.versions TO {}").format(who))
        for declared in tables:
            statements.append(sql.SQL("GRANT SELECT ON {} TO {}").format(declared.source, who))
            statements.append(sql.SQL("GRANT SELECT ON {} TO {}").format(declared.view, who))
            # Every live model version's store and change log: runs fill a candidate too.
            for table in (vt.table for vt in versions.live_tables(conn, declared)):
                statements.append(sql.SQL("GRANT {} ON {}, {} TO {}").format(RUN_WRITE, table.store, table.queue, who))
                sequence = conn.execute(
                    "SELECT pg_get_serial_sequence(%s, 'id')", (table.queue.as_string(conn),)
                ).fetchone()[0]
                if sequence is None:
                    raise GrantError(
                        f"role {role!r}: table {table.spec.name}: change log vectorsync.{table.spec.queue_name} "
                        "has no id sequence; run `vectorsync install` first"
                    )
                statements.append(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sql.SQL(sequence), who))
        for statement in statements:
            conn.execute(statement)
    return GrantReport(role, [t.spec.name for t in tables], len(statements))
