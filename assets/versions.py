"""Model versions of a table, side by side: the registry vectorsync.versions. Free of Dagster.

A change of anything that shapes a stored vector (the fingerprint: provider kind, model and
dimensions, template, chunking; or the vector type) does not touch the store search answers
from. `vectorsync install` makes it a *candidate* version with its own store and change log
(assets/names.py), filled by the same engine as any table (a version is a ResolvedTable whose spec
is the version's spec), kept current by the capture triggers, which write every change to every
live version's change log. Promotion (assets/promotion.py) makes it *active* in one transaction;
the version it replaces becomes *previous*, kept current until its drop_after for a rollback, then
*retired* (its store and change log dropped).

vectorsync.embedding_tables always describes the active version, so every reader of it (the SQL
search function, status, checks) answers from that version only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from .catalog import ResolvedTable, resolve
from .spec import TableSpec, parse_spec

# The declaration's fields that a version keeps as they were when it was created: they shape the
# vectors (the fingerprint and the vector type). Every other field follows the declaration.
SHAPE_FIELDS = ("provider", "template", "columns", "chunking", "vector_type")
LIVE_STATES = ("active", "candidate", "previous")
_ORDER = "array_position(ARRAY['active', 'candidate', 'previous', 'retired'], state), version DESC"


@dataclass(frozen=True)
class Version:
    table_name: str
    version: int
    state: str
    fingerprint: str
    spec: dict[str, Any]
    store_schema: str
    store_table: str
    queue_table: str
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    drop_after: datetime | None
    rolled_back_at: datetime | None
    freed_bytes: int | None
    note: str | None

    @property
    def shape(self) -> tuple[str, str]:
        return self.fingerprint, self.spec.get("vector_type", "vector")

    @property
    def store(self) -> sql.Identifier:
        return sql.Identifier(self.store_schema, self.store_table)

    @property
    def queue(self) -> sql.Identifier:
        return sql.Identifier("vectorsync", self.queue_table)


@dataclass(frozen=True)
class VersionTable:
    """One live version, ready for an engine: its table, and the stores whose vectors it may reuse."""

    version: Version
    table: ResolvedTable
    reuse_from: tuple[tuple[str, str], ...]


def shape(spec: TableSpec) -> tuple[str, str]:
    """What makes two declarations need different stores."""
    return spec.fingerprint, spec.vector_type


def spec_json(spec: TableSpec) -> str:
    return json.dumps(spec.model_dump(mode="json", by_alias=True))


def installed(conn: psycopg.Connection) -> bool:
    """Whether the control schema has the versions registry (migration 004)."""
    return conn.execute("SELECT to_regclass('vectorsync.versions')").fetchone()[0] is not None


def versions(conn: psycopg.Connection, table_name: str, states: tuple[str, ...] = LIVE_STATES) -> list[Version]:
    """The table's versions in these states: active first, then the candidate, then previous ones
    (newest first)."""
    if not installed(conn):
        return []
    with conn.cursor(row_factory=class_row(Version)) as cur:
        return cur.execute(
            f"""SELECT table_name, version, state, fingerprint, spec, store_schema, store_table,
                       queue_table, created_at, promoted_at, retired_at, drop_after, rolled_back_at,
                       freed_bytes, note
                FROM vectorsync.versions WHERE table_name = %s AND state = ANY(%s) ORDER BY {_ORDER}""",
            (table_name, list(states)),
        ).fetchall()


def in_state(conn: psycopg.Connection, table_name: str, state: str) -> Version | None:
    found = versions(conn, table_name, (state,))
    return found[0] if found else None


def version_spec(declared: TableSpec, version: Version | None, origin: str = "<versions>") -> TableSpec:
    """The spec a version runs with: the declaration, with the shaping fields the version was
    created with, named as that version (its store and change log)."""
    if version is None:
        return declared
    data = declared.model_dump(mode="json", by_alias=True)
    if (shape(declared)) != version.shape:
        data.update({f: version.spec[f] for f in SHAPE_FIELDS if f in version.spec})
    return parse_spec(data, origin).as_version(version.version)


def version_table(conn: psycopg.Connection, declared: ResolvedTable, version: Version | None) -> ResolvedTable:
    """A version as a ResolvedTable; resolved against the catalog again only when its columns
    may differ from the declaration's (another template or column list)."""
    spec = version_spec(declared.spec, version, declared.origin)
    if (spec.template, spec.columns) == (declared.spec.template, declared.spec.columns):
        return replace(declared, spec=spec)
    return resolve(conn, spec, declared.origin)


def reusable_stores(version: Version, others: list[Version]) -> tuple[tuple[str, str], ...]:
    """Stores of other live versions whose stored vectors this version may take as they are: made
    by the same provider model and dimensions, in the same vector type or in full precision."""
    head = version.fingerprint.rsplit("/", 1)[0]
    kind = version.spec.get("vector_type", "vector")
    return tuple(
        (o.store_schema, o.store_table) for o in others
        if o.version != version.version and o.fingerprint.rsplit("/", 1)[0] == head
        and o.spec.get("vector_type", "vector") in (kind, "vector")
    )


def live_tables(conn: psycopg.Connection, declared: ResolvedTable) -> list[VersionTable]:
    """Every live version of a declared table, active first: what a run of its buckets syncs.
    Before migration 004 (or before the first install), the declaration alone."""
    live = versions(conn, declared.spec.name)
    if not live:
        return [VersionTable(_unregistered(declared.spec), declared, ())]
    return [VersionTable(v, version_table(conn, declared, v), reusable_stores(v, live)) for v in live]


def active_table(conn: psycopg.Connection, declared: ResolvedTable) -> ResolvedTable:
    """The version search, status and checks answer from."""
    return version_table(conn, declared, in_state(conn, declared.spec.name, "active"))


def installed_spec(conn: psycopg.Connection, declared: TableSpec) -> TableSpec:
    """The active version's spec, from the database: what search must embed its query with, even
    when the declaration already names a new model that is still filling."""
    return version_spec(declared, in_state(conn, declared.name, "active"))


def _unregistered(spec: TableSpec) -> Version:
    return Version(spec.name, spec.version, "active", spec.fingerprint, json.loads(spec_json(spec)),
                   spec.store_schema, spec.store_name, spec.queue_name, datetime.now(), None, None, None,
                   None, None, None)
