"""The asset checks of one embeddings asset: what an auditor asks of a table.

coverage          every source row with content is embedded under the current fingerprint, pending
                  (its key or its bucket), or in the failure ledger
backlog_age       the oldest pending change is younger than the table's max_backlog_seconds
dead_letters      no row has exhausted its retries (the top errors are in the metadata)
vector_validity   every stored vector has the declared dimension, is finite and is not zero
model_consistency every chunk of the active version's store was made by that version's model,
                  template and chunking
candidate_coverage a candidate model version filling beside the active one (assets/versions.py):
                  warns with its progress (rows covered / total) until it is complete
Every check but candidate_coverage audits the ACTIVE version, as vectorsync.embedding_tables
registers it: what search answers from.
"""

from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql

from assets import versions, wal_capture
from assets.catalog import resolve, use_key_text_settings
from assets.promotion import coverage as version_coverage
from assets.spec import TableSpec
from assets.status import change_backlog

from .names import embeddings_asset_key
from .resources import VectorsyncDatabase

# capture_slot warns past this much WAL kept for the slot (the tables sensor drains it every tick).
SLOT_RETAINED_WARN_BYTES = 1 << 30



class _Active:
    """The active version's store, change log, fingerprint, number and dimensions, as registered."""

    def __init__(self, conn: psycopg.Connection, name: str) -> None:
        store_schema, store_table, queue_table, self.fingerprint, self.version, dims = conn.execute(
            """SELECT store_schema, store_table, queue_table, fingerprint, version,
                      (spec -> 'provider' ->> 'dimensions')::int
               FROM vectorsync.embedding_tables WHERE name = %s""",
            (name,),
        ).fetchone()
        self.store = sql.Identifier(store_schema, store_table)
        self.queue = sql.Identifier("vectorsync", queue_table)
        self.dimensions = dims


def _installed(conn: psycopg.Connection, spec: TableSpec) -> bool:
    found = conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0]
    return found is not None and conn.execute(
        "SELECT 1 FROM vectorsync.embedding_tables WHERE name = %s", (spec.name,)
    ).fetchone() is not None


# How many uncovered keys the coverage check names in its metadata: enough to start looking.
SAMPLE_KEYS = 5


def _uncovered_rows(conn: psycopg.Connection, name: str) -> tuple[int, list[Any], int]:
    """Source rows with no chunk under the registered fingerprint and no reason to lack one:
    no pending change of their key, no pending sweep of their bucket, no ledger entry (a row
    skipped for having no content is in the ledger too). Returns (count, sample keys, source rows).

    Rows are counted one by one, never as a difference of totals: a failed row that keeps an old
    chunk, a stored row whose source is gone, or one sweep marker standing for a whole bucket
    would otherwise cancel out real gaps."""
    (src_schema, src_table, store_schema, store_table, queue_table, key_columns, buckets,
     fingerprint, version) = conn.execute(
        """SELECT source_schema, source_table, store_schema, store_table, queue_table, key_columns,
                  buckets, fingerprint, version
           FROM vectorsync.embedding_tables WHERE name = %s""",
        (name,),
    ).fetchone()
    source = sql.Identifier(src_schema, src_table)
    # Keys as the triggers and the engine print them (time zone and the like), whatever this
    # session's settings: a timestamptz key must compare equal to its logged and stored form.
    use_key_text_settings(conn)
    # The registry, not the declaration: the check audits what is installed, whose store carries
    # the fingerprint registered there until `vectorsync install` registers a new one.
    key_json = sql.SQL("jsonb_build_array({})").format(
        sql.SQL(", ").join(sql.Identifier("s", c) for c in key_columns)
    )
    key_equal = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier("t", c), sql.Identifier("s", c)) for c in key_columns
    )
    # One statement, so one snapshot: the engine writes a row's chunks and clears its change in
    # one transaction, and two reads could see the row neither stored nor pending.
    rows = conn.execute(
        sql.SQL(
            """WITH uncovered AS (
                   SELECT {key_json} AS k FROM {source} s
                   WHERE NOT EXISTS (SELECT 1 FROM {store} t WHERE {key_equal} AND t.model = {fingerprint})
               ), pending AS (
                   SELECT e.k FROM {queue} q CROSS JOIN LATERAL unnest(q.row_keys) AS e(k)
               ), sweeping AS (
                   SELECT DISTINCT bucket FROM {queue} WHERE row_keys IS NULL
               )
               SELECT u.k, count(*) OVER ()
               FROM uncovered u
               WHERE NOT EXISTS (SELECT 1 FROM pending p WHERE p.k = u.k)
                 AND NOT EXISTS (SELECT 1 FROM vectorsync.failures f
                                 WHERE f.table_name = {name} AND f.version = {version} AND f.row_key = u.k)
                 AND NOT EXISTS (SELECT 1 FROM sweeping w
                                 WHERE w.bucket = vectorsync.bucket_of(u.k, {buckets}))
               ORDER BY u.k LIMIT {samples}"""
        ).format(
            key_json=key_json, source=source, store=sql.Identifier(store_schema, store_table),
            key_equal=key_equal, queue=sql.Identifier("vectorsync", queue_table),
            # Literals, not parameters: psycopg would read a % in a quoted name as a placeholder.
            fingerprint=sql.Literal(fingerprint), name=sql.Literal(name), buckets=sql.Literal(buckets),
            version=sql.Literal(version),
            samples=sql.Literal(SAMPLE_KEYS),
        ),
    ).fetchall()
    source_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(source)).fetchone()[0]
    return (rows[0][1] if rows else 0), [k for k, _ in rows], source_rows


def embeddings_checks(spec: TableSpec) -> list[dg.AssetChecksDefinition]:
    """The six checks of one table, evaluated in one step over one connection: six steps cost
    a backfill run a second of step overhead, for queries that take a fraction of that."""
    key = embeddings_asset_key(spec)
    declared: dict[str, tuple[dg.AssetCheckSpec, Callable[[psycopg.Connection], dg.AssetCheckResult]]] = {}

    def check(name: str, description: str, blocking: bool = False) -> Callable:
        def register(fn: Callable[[psycopg.Connection], dg.AssetCheckResult]) -> Callable:
            declared[name] = (dg.AssetCheckSpec(name, asset=key, description=description, blocking=blocking), fn)
            return fn

        return register

    @check("coverage", "Every source row with content has a current embedding (a chunk under the "
           "registered model fingerprint), a pending change, a pending sweep of its bucket, or an "
           "entry in the failure ledger: nothing fell between the triggers and the store.")
    def coverage(conn: psycopg.Connection) -> dg.AssetCheckResult:
        uncovered, samples, source_rows = _uncovered_rows(conn, spec.name)
        return dg.AssetCheckResult(
            passed=uncovered == 0,
            metadata={"source_rows": source_rows, "uncovered_rows": uncovered,
                      "sample_uncovered_keys": dg.MetadataValue.json(samples)},
        )

    @check("backlog_age", f"The oldest pending change is younger than {spec.max_backlog_seconds} s: "
           "the sensor and the runs keep up with the writes.")
    def backlog_age(conn: psycopg.Connection) -> dg.AssetCheckResult:
        pending, oldest = change_backlog(conn, _Active(conn, spec.name).queue)
        return dg.AssetCheckResult(
            passed=oldest is None or oldest <= spec.max_backlog_seconds,
            metadata={"pending_changes": pending, "oldest_change_seconds": round(oldest or 0.0, 1),
                      "max_backlog_seconds": spec.max_backlog_seconds},
        )

    @check("dead_letters", "No row has exhausted its retries. The most frequent errors of dead rows "
           "are listed; the whole ledger is the SQL view vectorsync.failure_report.")
    def dead_letters(conn: psycopg.Connection) -> dg.AssetCheckResult:
        # The engine writes each error as "table <name>, row <key>: <message>"; grouped with that
        # prefix, every row would be a group of one. The prefix is cut exactly where it is the one
        # the engine wrote (a key may itself hold ", " or ": "), and by pattern otherwise.
        top = conn.execute(
            r"""SELECT error_kind, left(message, 200), count(*)
                FROM (SELECT error_kind,
                             CASE WHEN starts_with(last_error, prefix) THEN substr(last_error, length(prefix) + 1)
                                  ELSE regexp_replace(last_error, '^table [^,]+, row \[[^]]*\]: ', '')
                             END AS message
                      FROM (SELECT error_kind, last_error,
                                   'table ' || table_name || ', row ' || row_key::text || ': ' AS prefix
                            FROM vectorsync.failures WHERE table_name = %s AND version = %s AND dead) f) d
                GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 5""",
            (spec.name, _Active(conn, spec.name).version),
        ).fetchall()
        dead = conn.execute(
            "SELECT count(*) FROM vectorsync.failures WHERE table_name = %s AND version = %s AND dead",
            (spec.name, _Active(conn, spec.name).version),
        ).fetchone()[0]
        return dg.AssetCheckResult(
            passed=dead == 0,
            metadata={"dead_rows": dead, "top_errors": dg.MetadataValue.md(
                "\n".join(f"- {n} x {kind}: {err}" for kind, err, n in top) or "none")},
        )

    @check("vector_validity", "Every vector in the active version's store has that version's "
           "dimensions, finite values and a non-zero length.")
    def vector_validity(conn: psycopg.Connection) -> dg.AssetCheckResult:
        active = _Active(conn, spec.name)
        # pgvector refuses NaN and infinity on input; the checks still look, in case of a bug there.
        chunks, wrong_dims, zero, not_finite = conn.execute(
            sql.SQL(
                """SELECT count(*),
                          count(*) FILTER (WHERE vector_dims(embedding::vector) <> {dimensions}),
                          count(*) FILTER (WHERE vector_norm(embedding::vector) = 0),
                          count(*) FILTER (WHERE vector_norm(embedding::vector) IN
                                           ('NaN'::float8, 'Infinity'::float8))
                   FROM {store}"""
                # A literal, not a parameter: psycopg would read a % in the store's name as one.
            ).format(store=active.store, dimensions=sql.Literal(active.dimensions)),
        ).fetchone()
        return dg.AssetCheckResult(
            passed=wrong_dims == zero == not_finite == 0,
            metadata={"chunks": chunks, "wrong_dimensions": wrong_dims, "zero_vectors": zero,
                      "not_finite": not_finite},
        )

    @check("model_consistency", "Every chunk of the active version's store was embedded under that "
           "version's model, template and chunking (a new declaration fills a candidate version "
           "beside it instead, see candidate_coverage).")
    def model_consistency(conn: psycopg.Connection) -> dg.AssetCheckResult:
        active = _Active(conn, spec.name)
        by_model = conn.execute(
            sql.SQL("SELECT model, count(*) FROM {} GROUP BY model ORDER BY 2 DESC").format(active.store)
        ).fetchall()
        stale = sum(n for model, n in by_model if model != active.fingerprint)
        return dg.AssetCheckResult(
            passed=stale == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"fingerprint": active.fingerprint, "version": active.version, "stale_chunks": stale,
                      "chunks_by_model": dg.MetadataValue.md(
                          "\n".join(f"- {m}: {n}" for m, n in by_model) or "none")},
        )

    @check("candidate_coverage", "A candidate model version (a new model, dimension, template or "
           "chunking) fills beside the active one: warns with its progress, rows covered / total, "
           "until it covers every row and may be promoted; passes when complete or when there is none.")
    def candidate_coverage(conn: psycopg.Connection) -> dg.AssetCheckResult:
        candidate = versions.in_state(conn, spec.name, "candidate")
        if candidate is None:
            return dg.AssetCheckResult(passed=True, metadata={"candidate_version": "none"})
        declared = resolve(conn, spec, "<checks>")
        cov = version_coverage(conn, versions.version_table(conn, declared, candidate))
        return dg.AssetCheckResult(
            passed=cov.complete,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"candidate_version": candidate.version, "fingerprint": candidate.fingerprint,
                      "rows_covered": cov.rows_covered, "source_rows": cov.source_rows,
                      "buckets_waiting": cov.sweeps_pending, "rows_failing": cov.rows_failing,
                      "rolled_back": candidate.rolled_back_at is not None},
        )

    if spec.capture == "logical":
        @check("capture_slot", "capture: logical: the table's replication slot is healthy and keeps "
               f"less than {SLOT_RETAINED_WARN_BYTES // 2**20} MiB of WAL (a slot nobody drains keeps WAL "
               "until the disk fills; one PostgreSQL invalidated has lost changes, and the next drain "
               "recreates it and sweeps every bucket).")
        def capture_slot(conn: psycopg.Connection) -> dg.AssetCheckResult:
            health = wal_capture.slot_health(conn, spec.name)
            return dg.AssetCheckResult(
                passed=health.state == "ok" and health.retained_bytes < SLOT_RETAINED_WARN_BYTES,
                severity=dg.AssetCheckSeverity.WARN if health.state == "ok" else dg.AssetCheckSeverity.ERROR,
                metadata={"slot": health.slot, "state": health.state or "missing",
                          "retained_wal_bytes": health.retained_bytes,
                          "undrained_wal_bytes": health.undrained_bytes},
            )

    @dg.multi_asset_check(
        specs=[check_spec for check_spec, _ in declared.values()],
        name=f"{spec.name}_embeddings_checks",
        description=f"The audit of {spec.name}'s embeddings: coverage, backlog age, dead letters, vector "
        "validity, model consistency and a candidate version's coverage, each its own check in the UI.",
        can_subset=True,
    )
    def _checks(
        context: dg.AssetCheckExecutionContext, database: VectorsyncDatabase
    ) -> Iterator[dg.AssetCheckResult]:
        selected = [n for n in declared if dg.AssetCheckKey(key, n) in context.selected_asset_check_keys]
        with database.connect() as conn:
            installed = _installed(conn, spec)
            if installed and spec.capture == "logical":
                # Keys still in the WAL are pending changes too, for coverage and backlog_age.
                wal_capture.drain_declared(conn, spec)
            for name in selected:
                yield _evaluate(conn, spec, key, name, declared[name][1], installed)

    return [_checks]


def _evaluate(
    conn: psycopg.Connection, spec: TableSpec, key: dg.AssetKey, name: str,
    fn: Callable[[psycopg.Connection], dg.AssetCheckResult], installed: bool,
) -> dg.AssetCheckResult:
    """One check's result; a check whose query fails fails alone, with the error, and the others
    still report."""
    if not installed:
        return dg.AssetCheckResult(
            check_name=name, asset_key=key, passed=False,
            metadata={"reason": f"table {spec.name} is not installed; run `vectorsync install`"},
        )
    try:
        result = fn(conn)
    except psycopg.Error as exc:
        return dg.AssetCheckResult(
            check_name=name, asset_key=key, passed=False,
            metadata={"error": f"table {spec.name}, check {name}: {type(exc).__name__}: {exc}"},
        )
    return dg.AssetCheckResult(
        check_name=name, asset_key=key, passed=result.passed, severity=result.severity, metadata=result.metadata
    )
