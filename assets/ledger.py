"""Where failures go: the one owner of vectorsync.failures. Free of Dagster.

- What is recorded: a row the provider failed on (its error kind and message), a row skipped for
  having no content ('skipped', never retried), a row that cannot be processed as it is
  ('unprocessable': its template does not render; dead at once). Every message names the table
  and the row's key; the key is the jsonb array of the row's key values.
- The retry policy (RetryPolicy, from the declaration's `retry:` block): the next attempt waits an
  exponential, jittered, capped backoff, at least what the provider asked for (Retry-After). Only
  failures a row itself causes count towards max_attempts; an outage of the provider never
  kills a row.
- What is due (DUE): not dead, and its next attempt is now or past. The retry schedule asks for
  runs of the buckets with due rows (due_buckets); the run puts them back in the change log
  (FailureLedger.requeue_due). The sweep leaves rows that are dead or not due alone.
- A row leaves the ledger when it is written, found unchanged, or deleted from the source.
- Each model version of a table (assets/versions.py) has its own rows (column `version`): a
  candidate filling beside the active version never clears, or counts against, the active's.
- The report: the view vectorsync.failure_report (sql/functions/failure_view.sql) shows each row
  as 'retrying', 'dead' or 'skipped' next to failed runs; `vectorsync status` counts them and the
  dead_letters check fails while any row is dead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import ResolvedTable, key_array
from .providers.base import ROW_LEVEL_KINDS
from .spec import TableSpec

# The one definition of a failed row that is due for another attempt.
DUE = sql.SQL("NOT dead AND next_attempt_at <= now()")


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed row is tried again: exponential backoff with jitter, capped at max_seconds;
    dead after max_attempts failures that the row itself causes (a bad input or answer), never
    after failures of the provider (rate limits, server errors, timeouts, lost connections)."""

    max_attempts: int = 6
    base_seconds: float = 30.0
    max_seconds: float = 6 * 3600.0


def retry_policy(spec: TableSpec) -> RetryPolicy:
    """The retry policy from the declaration's `retry:` block: every engine of a table, whichever
    run or command builds it, must retry and give up on rows the same way."""
    r = spec.retry
    return RetryPolicy(max_attempts=r.max_attempts, base_seconds=r.base_seconds, max_seconds=r.max_seconds)


def due_buckets(conn: psycopg.Connection, table_name: str) -> list[int]:
    """The buckets of `table_name` holding a failed row whose next attempt is due, ascending."""
    return [b for (b,) in conn.execute(
        sql.SQL("SELECT DISTINCT bucket FROM vectorsync.failures WHERE table_name = %s AND {} ORDER BY 1")
        .format(DUE), (table_name,))]


@dataclass(frozen=True)
class Failure:
    """One row to record: its key and bucket, the error kind and message, and the least wait the
    provider asked for before the next attempt."""

    key_json: str
    bucket: int
    kind: str
    message: str
    at_least_seconds: float = 0.0


class FailureLedger:
    """The ledger's rows of one table, read and written on the engine's connection (writes go in
    the caller's transaction, the one that writes the page they belong to)."""

    def __init__(self, conn: psycopg.Connection, table: ResolvedTable, retry: RetryPolicy) -> None:
        self.conn = conn
        self.table = table
        self.name = table.spec.name
        self.version = table.spec.version
        self.retry = retry

    def kinds(self, key_jsons: list[str]) -> dict[str, str]:
        """The ledger's entries for these keys: key -> error kind."""
        if not key_jsons:
            return {}
        return dict(self.conn.execute(_KINDS, (self.name, self.version, key_array(key_jsons))))

    def held_back(self, key_jsons: list[str]) -> set[str]:
        """Keys of failed rows whose next attempt is not due, or that are dead: the sweep leaves
        them alone (a change to a row's text still reaches it through the change log)."""
        return {k for (k,) in self.conn.execute(_HELD_BACK, (self.name, self.version, key_array(key_jsons)))}

    def forget(self, key_jsons: list[str]) -> None:
        """These rows are fine now (written, unchanged, or gone)."""
        self.conn.execute(_FORGET, (self.name, self.version, key_array(key_jsons)))

    def forget_orphans(self, buckets: list[int]) -> None:
        """Entries of rows no longer in the source, after a sweep of `buckets`."""
        self.conn.execute(
            sql.SQL(
                """DELETE FROM vectorsync.failures f WHERE f.table_name = %s AND f.version = %s
                   AND f.bucket = ANY(%s::int[]) AND NOT EXISTS (SELECT 1 FROM {} s WHERE ({}) = ({}))"""
            ).format(self.table.source, self.table.key_list("s"), self.table.key_from_json(sql.SQL("f.row_key"))),
            (self.name, self.version, buckets),
        )

    def record(self, failures: Iterable[Failure], retry: bool, dead: bool = False) -> None:
        """Record failures: `retry` schedules the next attempt by the policy; `dead` gives up now."""
        r = self.retry
        with self.conn.cursor() as cur:
            cur.executemany(
                _RECORD,
                [
                    {
                        "table": self.name, "version": self.version, "key": f.key_json, "bucket": f.bucket, "kind": f.kind,
                        "error": f"table {self.name}, row {f.key_json}: {f.message}"[:2000],
                        "retry": retry, "counts": f.kind in ROW_LEVEL_KINDS, "give_up": dead,
                        "max": r.max_attempts, "base": r.base_seconds, "cap": r.max_seconds,
                        "at_least": f.at_least_seconds,
                    }
                    for f in failures
                ],
            )

    def requeue_due(self) -> int:
        """Put rows whose next attempt is due back in the change log; returns how many."""
        with self.conn.transaction():
            return self.conn.execute(
                sql.SQL(
                    """WITH due AS (
                           UPDATE vectorsync.failures SET next_attempt_at = NULL
                           WHERE table_name = %s AND version = %s AND {} RETURNING bucket, row_key),
                       logged AS (
                           INSERT INTO {} (bucket, row_keys) SELECT bucket, array_agg(row_key) FROM due
                           GROUP BY bucket RETURNING cardinality(row_keys) AS n)
                       SELECT coalesce(sum(n), 0)::int FROM logged"""
                ).format(DUE, self.table.queue),
                (self.name, self.version),
            ).fetchone()[0]


_IN_KEYS = "row_key = ANY(ARRAY(SELECT jsonb_array_elements(%s::jsonb)))"
_OF_VERSION = "table_name = %s AND version = %s AND "
_KINDS = sql.SQL("SELECT row_key::text, error_kind FROM vectorsync.failures WHERE " + _OF_VERSION + _IN_KEYS)
_FORGET = sql.SQL("DELETE FROM vectorsync.failures WHERE " + _OF_VERSION + _IN_KEYS)
_HELD_BACK = sql.SQL(
    "SELECT row_key::text FROM vectorsync.failures WHERE " + _OF_VERSION + _IN_KEYS
    + " AND error_kind <> 'skipped' AND (dead OR next_attempt_at > now())"
)
# A skipped row (no content) is not an attempt: a later real failure counts from one. The next
# attempt waits the jittered backoff, capped, and at least what the provider asked for. Only errors
# a row can cause (%(counts)s) make it dead: an outage of the provider would otherwise kill every
# row it touched, and a dead row is never tried again by itself. %(give_up)s: a row that cannot be
# processed as it is (its template does not render) is dead at once, so the dead_letters check
# shows it; a change to the row brings it back through the change log.
_ATTEMPTS = sql.SQL("(CASE WHEN f.error_kind = 'skipped' THEN 1 ELSE f.attempts + 1 END)")
_RECORD = sql.SQL(
    """INSERT INTO vectorsync.failures AS f
           (table_name, version, row_key, bucket, error_kind, last_error, next_attempt_at, dead)
       VALUES (%(table)s, %(version)s, %(key)s::jsonb, %(bucket)s, %(kind)s, %(error)s,
               CASE WHEN %(retry)s AND NOT %(give_up)s AND (%(max)s > 1 OR NOT %(counts)s)
                    THEN now() + make_interval(secs => greatest(
                        %(at_least)s, least(%(cap)s, %(base)s * (0.8 + random() * 0.4)))) END,
               %(give_up)s OR (%(retry)s AND %(counts)s AND %(max)s <= 1))
       ON CONFLICT (table_name, version, row_key) DO UPDATE SET
           bucket = excluded.bucket,
           error_kind = excluded.error_kind,
           last_error = excluded.last_error,
           last_failed_at = now(),
           first_failed_at = CASE WHEN f.error_kind = 'skipped' THEN now() ELSE f.first_failed_at END,
           attempts = {attempts},
           dead = %(give_up)s OR (%(retry)s AND %(counts)s AND {attempts} >= %(max)s),
           next_attempt_at = CASE
               WHEN NOT %(retry)s OR %(give_up)s OR (%(counts)s AND {attempts} >= %(max)s) THEN NULL
               ELSE now() + make_interval(secs => greatest(%(at_least)s, least(%(cap)s,
                   %(base)s * power(2, least({attempts} - 1, 30)) * (0.8 + random() * 0.4))))
           END"""
).format(attempts=_ATTEMPTS)
