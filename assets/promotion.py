"""Promotion, rollback and the dropping of expired versions. Free of Dagster.

- `coverage`: how far a version is filled: source rows, rows with chunks under its fingerprint,
  rows skipped (no content), pending sweep requests and changes, failing rows.
- `promote`: the candidate becomes active, only when it is complete (no bucket waiting for its
  sweep, no failing row, every source row embedded, skipped, or with a pending change that the
  next run embeds: under steady writes a change log is never empty, and a row changed a moment ago
  is as fresh in the candidate as in the active version) and the gate, if any, passes. Its HNSW
  index is built first, outside the switch (CONCURRENTLY, so nothing waits on it). Then one
  transaction: the active version becomes previous (dropped after keep_previous_hours), the
  candidate active, vectorsync.embedding_tables names it, and the view is recreated over its store.
- `rollback`: the newest previous version becomes active again in one transaction; the active one
  becomes the candidate (kept current, promotable again by hand, never by `promote: auto`). A
  candidate that was filling is dropped.
- `drop_expired`: previous versions past their drop_after are dropped, their space reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psycopg
from psycopg import sql

from . import versions
from .catalog import ResolvedTable
from .evaluation import GateResult
from .index import build_index, index_state
from .table_ddl import drop_version, relation_bytes, replace_view
from .versions import Version


class PromotionRefused(RuntimeError):
    """A promotion or rollback that cannot happen now; the message says why, naming the table."""


@dataclass(frozen=True)
class Coverage:
    version: int
    fingerprint: str
    source_rows: int
    rows_embedded: int   # rows with chunks, all under the version's fingerprint
    rows_skipped: int    # rows with no text to embed (recorded in the ledger as 'skipped')
    rows_pending: int    # rows neither embedded nor skipped that have a pending change
    sweeps_pending: int  # buckets still waiting for their sweep (the fill)
    rows_failing: int    # rows in the version's failure ledger (retrying or dead)

    @property
    def rows_covered(self) -> int:
        return self.rows_embedded + self.rows_skipped

    @property
    def complete(self) -> bool:
        return (self.sweeps_pending == 0 and self.rows_failing == 0
                and self.rows_covered + self.rows_pending >= self.source_rows)

    def describe(self) -> str:
        return (f"version {self.version} covers {self.rows_covered}/{self.source_rows} rows "
                f"({self.sweeps_pending} buckets waiting for their sweep, {self.rows_pending} rows with "
                f"pending changes, {self.rows_failing} failing)")


@dataclass(frozen=True)
class ActiveAndCandidate:
    """What a promotion gate judges: both versions (their tables search with
    assets.search.run_search(..., version=N)), the candidate's coverage, and the declared
    tolerance. `conn` is an autocommit connection the gate may use."""

    conn: psycopg.Connection
    active: versions.VersionTable
    candidate: versions.VersionTable
    coverage: Coverage
    max_quality_drop: float


Gate = Callable[[ActiveAndCandidate], GateResult]


@dataclass(frozen=True)
class Switch:
    table_name: str
    active: int                  # the version now active
    previous: int | None         # the version switched away from
    gate: GateResult | None = None
    dropped: dict[int, int] = field(default_factory=dict)  # version -> bytes freed
    notes: list[str] = field(default_factory=list)


def coverage(conn: psycopg.Connection, table: ResolvedTable) -> Coverage:
    """How far one version (a version's ResolvedTable, assets/versions.py) is filled."""
    spec = table.spec
    key = table.key_json("s")
    found = conn.execute(
        sql.SQL(
            """WITH pending AS MATERIALIZED (
                   SELECT DISTINCT e.k FROM {queue} q CROSS JOIN LATERAL unnest(q.row_keys) AS e(k)),
               skipped AS MATERIALIZED (
                   SELECT f.row_key FROM vectorsync.failures f WHERE f.table_name = {name}
                   AND f.version = {version} AND f.error_kind = 'skipped'),
               rows AS (
                   SELECT EXISTS (SELECT 1 FROM {store} e WHERE {match} AND e.model = {fp}) AS embedded,
                          {key} IN (SELECT row_key FROM skipped) AS skipped,
                          {key} IN (SELECT k FROM pending) AS pending
                   FROM {source} s)
               SELECT count(*), count(*) FILTER (WHERE embedded), count(*) FILTER (WHERE skipped AND NOT embedded),
                      count(*) FILTER (WHERE pending AND NOT embedded AND NOT skipped),
                      (SELECT count(DISTINCT bucket) FROM {queue} WHERE row_keys IS NULL),
                      (SELECT count(*) FROM vectorsync.failures WHERE table_name = {name}
                       AND version = {version} AND error_kind <> 'skipped')
               FROM rows"""
        ).format(store=table.store, match=table.key_equal("e", "s"), fp=sql.Literal(spec.fingerprint),
                 name=sql.Literal(spec.name), version=sql.Literal(spec.version), key=key,
                 queue=table.queue, source=table.source)
    ).fetchone()
    return Coverage(spec.version, spec.fingerprint, *found)


def promote(
    conn: psycopg.Connection, declared: ResolvedTable, gate: Gate | None = None, build_missing_index: bool = True,
) -> Switch:
    """Make the candidate version active (see the module's doc). Raises PromotionRefused."""
    name = declared.spec.name
    live = {vt.version.state: vt for vt in versions.live_tables(conn, declared)}
    candidate, active = live.get("candidate"), live.get("active")
    if candidate is None or active is None:
        raise PromotionRefused(f"table {name}: no candidate version to promote; declare another model, "
                               "dimension, template or chunking and run `vectorsync install`")
    cov = coverage(conn, candidate.table)
    if not cov.complete:
        raise PromotionRefused(f"table {name}: not promoted: {cov.describe()}")
    verdict = None
    if gate is not None:
        verdict = gate(ActiveAndCandidate(conn, active, candidate, cov, declared.spec.versions.max_quality_drop))
        if not verdict.passed:
            raise PromotionRefused(f"table {name}: not promoted: the gate refused: {verdict.reason}")
    if build_missing_index:
        _index_like_active(conn, active.table, candidate.table)
    keep_hours = declared.spec.versions.keep_previous_hours
    with conn.transaction():
        _lock_versions(conn, name, {candidate.version.version: "candidate", active.version.version: "active"})
        # One previous version is kept: an older one expires now and is dropped below.
        conn.execute("""UPDATE vectorsync.versions SET drop_after = now()
                        WHERE table_name = %s AND state = 'previous'""", (name,))
        conn.execute(
            """UPDATE vectorsync.versions SET state = 'previous', retired_at = now(),
                      drop_after = now() + make_interval(secs => %s)
               WHERE table_name = %s AND version = %s""",
            (keep_hours * 3600.0, name, active.version.version),
        )
        _activate(conn, candidate, recreate_view=True)
    dropped = drop_expired(conn, declared)
    return Switch(name, candidate.version.version, active.version.version, verdict, dropped)


def rollback(conn: psycopg.Connection, declared: ResolvedTable) -> Switch:
    """Make the newest kept previous version active again (see the module's doc)."""
    name = declared.spec.name
    live = versions.live_tables(conn, declared)
    active = next((vt for vt in live if vt.version.state == "active"), None)
    previous = next((vt for vt in live if vt.version.state == "previous"), None)  # newest first
    if previous is None or active is None:
        raise PromotionRefused(f"table {name}: no previous version to roll back to (it is kept for "
                               f"versions.keep_previous_hours = {declared.spec.versions.keep_previous_hours:g} "
                               "after a promotion)")
    cov = coverage(conn, previous.table)
    if not cov.complete:
        raise PromotionRefused(f"table {name}: not rolled back: {cov.describe()}; run `vectorsync sync {name}`")
    notes, dropped = [], {}
    with conn.transaction():
        _lock_versions(conn, name, {previous.version.version: "previous", active.version.version: "active"})
        for vt in live:
            if vt.version.state == "candidate":
                notes.append(f"candidate version {vt.version.version} dropped: the rolled-back version "
                             f"{active.version.version} is the candidate now")
                dropped[vt.version.version] = drop_version(conn, declared, vt.version, "superseded by a rollback")
        conn.execute(
            """UPDATE vectorsync.versions SET state = 'candidate', rolled_back_at = now(), drop_after = NULL,
                      retired_at = now()
               WHERE table_name = %s AND version = %s""",
            (name, active.version.version),
        )
        _activate(conn, previous, recreate_view=True)
    return Switch(name, previous.version.version, active.version.version, None, dropped, notes)


def drop_expired(conn: psycopg.Connection, declared: ResolvedTable) -> dict[int, int]:
    """Drop previous versions whose drop_after has passed; returns version -> bytes freed."""
    freed = {}
    for v in versions.versions(conn, declared.spec.name, ("previous",)):
        with conn.transaction():
            again = conn.execute(
                """SELECT 1 FROM vectorsync.versions WHERE table_name = %s AND version = %s
                   AND state = 'previous' AND drop_after <= now() FOR UPDATE""",
                (v.table_name, v.version),
            ).fetchone()
            if again:
                freed[v.version] = drop_version(conn, declared, v, "expired after its keep period")
    return freed


def version_bytes(conn: psycopg.Connection, version: Version) -> int:
    return relation_bytes(conn, version.store, version.queue)


def _index_like_active(conn: psycopg.Connection, active: ResolvedTable, candidate: ResolvedTable) -> None:
    """Before the switch: the candidate gets its HNSW index if the active version has one or the
    candidate is big enough for one, so the first search after the switch is not a full scan."""
    if not (index_state(conn, active).exists or index_state(conn, candidate).needs_build):
        return
    state = build_index(conn, replace_min_rows(candidate))
    if state.building:
        raise PromotionRefused(f"table {candidate.spec.name}: the candidate's index {state.index} is being "
                               "built by another session; promote again when it is done")


def replace_min_rows(table: ResolvedTable) -> ResolvedTable:
    """The table with index.min_rows 0, so build_index builds whatever the store's size."""
    # model_copy keeps the version number (a private attribute).
    spec = table.spec.model_copy(update={"index": table.spec.index.model_copy(update={"min_rows": 0})})
    return replace(table, spec=spec)


def _lock_versions(conn: psycopg.Connection, name: str, expected: dict[int, str]) -> None:
    """Lock the table's version rows (a concurrent promote, rollback or install waits), and
    check nothing switched since they were read."""
    found = dict(conn.execute(
        "SELECT version, state FROM vectorsync.versions WHERE table_name = %s FOR UPDATE", (name,)
    ).fetchall())
    for number, state in expected.items():
        if found.get(number) != state:
            raise PromotionRefused(f"table {name}: version {number} is {found.get(number)}, no longer {state}: "
                                   "another promotion or rollback ran meanwhile")


def _activate(conn: psycopg.Connection, vt: versions.VersionTable, recreate_view: bool) -> None:
    """In the switch transaction: the version is active, the registry and the view say so."""
    spec = vt.table.spec
    conn.execute(
        """UPDATE vectorsync.versions SET state = 'active', promoted_at = now(), drop_after = NULL,
                  retired_at = NULL
           WHERE table_name = %s AND version = %s""",
        (spec.name, spec.version),
    )
    conn.execute(
        """UPDATE vectorsync.embedding_tables SET store_schema = %s, store_table = %s, queue_table = %s,
                  fingerprint = %s, spec = %s, version = %s
           WHERE name = %s""",
        (spec.store_schema, spec.store_name, spec.queue_name, spec.fingerprint, versions.spec_json(spec),
         spec.version, spec.name),
    )
    replace_view(conn, vt.table, recreate=recreate_view)


def maybe_auto_promote(conn: psycopg.Connection, declared: ResolvedTable, gate: Gate | None = None) -> Switch | None:
    """With `versions.promote: auto`, promote a candidate once it is complete (through the gate);
    None when there is nothing to do yet. A candidate that a rollback switched away from is
    promoted only by hand. A refusal by the gate raises PromotionRefused, for the caller to show."""
    if declared.spec.versions.promote != "auto":
        return None
    candidate = versions.in_state(conn, declared.spec.name, "candidate")
    if candidate is None or candidate.rolled_back_at is not None:
        return None
    if not coverage(conn, versions.version_table(conn, declared, candidate)).complete:
        return None
    return promote(conn, declared, gate)


def progress(conn: psycopg.Connection, table: ResolvedTable) -> tuple[int, int]:
    """(rows with a first chunk under the version's fingerprint, source rows): a cheaper figure
    than `coverage` for a run's metadata, one count of each table."""
    spec = table.spec
    covered = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE chunk_seq = 0 AND model = {}").format(
        table.store, sql.Literal(spec.fingerprint))).fetchone()[0]
    total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.source)).fetchone()[0]
    return covered, total
