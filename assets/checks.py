"""The asset checks of one embeddings asset: what an auditor asks of a table.

coverage          every source row with content is embedded, pending, or in the failure ledger
backlog_age       the oldest pending change is younger than the table's max_backlog_seconds
dead_letters      no row has exhausted its retries (the top errors are in the metadata)
vector_validity   every stored vector has the declared dimension, is finite and is not zero
model_consistency every stored chunk was made by the declared model, template and chunking
"""

from collections.abc import Callable

import dagster as dg
import psycopg
from psycopg import sql

from orchestration.resources import VectorsyncDatabase

from .factory import embeddings_asset_key
from .spec import TableSpec
from .status import table_status


def _store(spec: TableSpec) -> sql.Identifier:
    return sql.Identifier(spec.store_schema, spec.store_name)


def _installed(conn: psycopg.Connection, spec: TableSpec) -> bool:
    found = conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0]
    return found is not None and conn.execute(
        "SELECT 1 FROM vectorsync.embedding_tables WHERE name = %s", (spec.name,)
    ).fetchone() is not None


def embeddings_checks(spec: TableSpec) -> list[dg.AssetChecksDefinition]:
    key = embeddings_asset_key(spec)

    def check(name: str, description: str, blocking: bool = False) -> Callable:
        def wrap(fn: Callable[[psycopg.Connection], dg.AssetCheckResult]) -> dg.AssetChecksDefinition:
            @dg.asset_check(asset=key, name=name, description=description, blocking=blocking)
            def _check(database: VectorsyncDatabase) -> dg.AssetCheckResult:
                with database.connect() as conn:
                    if not _installed(conn, spec):
                        return dg.AssetCheckResult(
                            passed=False,
                            metadata={"reason": f"table {spec.name} is not installed; run `vectorsync install`"},
                        )
                    return fn(conn)

            return _check

        return wrap

    @check("coverage", "Every source row with content has a current embedding, a pending change, or "
           "a recorded failure: nothing fell between the triggers and the store.")
    def coverage(conn: psycopg.Connection) -> dg.AssetCheckResult:
        s = table_status(conn, spec.name)
        uncovered = s.source_rows - s.rows_current - s.pending_changes - s.skipped_rows - s.failed_rows - s.dead_rows
        return dg.AssetCheckResult(
            passed=uncovered <= 0,
            metadata={"source_rows": s.source_rows, "rows_current": s.rows_current,
                      "pending_changes": s.pending_changes, "failed_rows": s.failed_rows,
                      "skipped_rows": s.skipped_rows, "uncovered_rows": max(uncovered, 0)},
        )

    @check("backlog_age", f"The oldest pending change is younger than {spec.max_backlog_seconds} s: "
           "the sensor and the runs keep up with the writes.")
    def backlog_age(conn: psycopg.Connection) -> dg.AssetCheckResult:
        pending, oldest = conn.execute(
            sql.SQL("SELECT count(*), extract(epoch FROM now() - min(queued_at))::float8 FROM {}").format(
                sql.Identifier("vectorsync", spec.queue_name)
            )
        ).fetchone()
        return dg.AssetCheckResult(
            passed=oldest is None or oldest <= spec.max_backlog_seconds,
            metadata={"pending_changes": pending, "oldest_change_seconds": round(oldest or 0.0, 1),
                      "max_backlog_seconds": spec.max_backlog_seconds},
        )

    @check("dead_letters", "No row has exhausted its retries. The most frequent errors of dead rows "
           "are listed; the whole ledger is the SQL view vectorsync.failure_report.")
    def dead_letters(conn: psycopg.Connection) -> dg.AssetCheckResult:
        top = conn.execute(
            """SELECT error_kind, left(last_error, 200), count(*) FROM vectorsync.failures
               WHERE table_name = %s AND dead GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5""",
            (spec.name,),
        ).fetchall()
        dead = conn.execute(
            "SELECT count(*) FROM vectorsync.failures WHERE table_name = %s AND dead", (spec.name,)
        ).fetchone()[0]
        return dg.AssetCheckResult(
            passed=dead == 0,
            metadata={"dead_rows": dead, "top_errors": dg.MetadataValue.md(
                "\n".join(f"- {n} x {kind}: {err}" for kind, err, n in top) or "none")},
        )

    @check("vector_validity", f"Every stored vector has {spec.provider.dimensions} dimensions, finite "
           "values and a non-zero length.")
    def vector_validity(conn: psycopg.Connection) -> dg.AssetCheckResult:
        # pgvector refuses NaN and infinity on input; the checks still look, in case of a bug there.
        chunks, wrong_dims, zero, not_finite = conn.execute(
            sql.SQL(
                """SELECT count(*),
                          count(*) FILTER (WHERE vector_dims(embedding::vector) <> %s),
                          count(*) FILTER (WHERE vector_norm(embedding::vector) = 0),
                          count(*) FILTER (WHERE vector_norm(embedding::vector) IN
                                           ('NaN'::float8, 'Infinity'::float8))
                   FROM {}"""
            ).format(_store(spec)),
            (spec.provider.dimensions,),
        ).fetchone()
        return dg.AssetCheckResult(
            passed=wrong_dims == zero == not_finite == 0,
            metadata={"chunks": chunks, "wrong_dimensions": wrong_dims, "zero_vectors": zero,
                      "not_finite": not_finite},
        )

    @check("model_consistency", "Every stored chunk was embedded under the declared model, template "
           "and chunking. After a change it warns until a backfill has replaced the old vectors; "
           "search answers from them meanwhile.")
    def model_consistency(conn: psycopg.Connection) -> dg.AssetCheckResult:
        by_model = conn.execute(
            sql.SQL("SELECT model, count(*) FROM {} GROUP BY model ORDER BY 2 DESC").format(_store(spec))
        ).fetchall()
        stale = sum(n for model, n in by_model if model != spec.fingerprint)
        return dg.AssetCheckResult(
            passed=stale == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"fingerprint": spec.fingerprint, "stale_chunks": stale,
                      "chunks_by_model": dg.MetadataValue.md(
                          "\n".join(f"- {m}: {n}" for m, n in by_model) or "none")},
        )

    return [coverage, backlog_age, dead_letters, vector_validity, model_consistency]
