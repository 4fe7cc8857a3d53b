"""The claim / embed / write engine for one bucket of one table. Free of Dagster.

A run for bucket b:
  1. takes a session advisory lock on (table, b), so two runs never write the same bucket at once;
  2. drains the change log page by page: claim entries and read their rows in one short
     transaction, then render, chunk, hash, reuse what is stored, embed the misses with no
     transaction open, then in one short transaction write the chunks, record failures and delete
     exactly the change-log entries it claimed;
  3. in a full run, or when the log asks for it (TRUNCATE, install), sweeps every source row of the
     bucket the same way and deletes store rows whose source row is gone.
A change that arrives while its row is being embedded has a new change-log entry that this run did
not claim, so the next run embeds the new text: nothing is lost and nothing stays stale.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from .catalog import ResolvedTable
from .providers.base import EmbeddingProvider, ProviderError
from .text import chunk, fit_to_token_limit, render, text_hash

Key = tuple[Any, ...]


@dataclass
class SyncStats:
    rows_seen: int = 0
    rows_written: int = 0
    rows_unchanged: int = 0
    rows_deleted: int = 0
    rows_skipped: int = 0
    rows_failed: int = 0
    chunks_written: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    tokens: int = 0
    provider_requests: int = 0
    provider_seconds: float = 0.0
    changes_cleared: int = 0
    seconds: float = 0.0

    def merge(self, other: "SyncStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed row is tried again: exponential backoff with jitter, dead after max_attempts."""

    max_attempts: int = 6
    base_seconds: float = 30.0
    max_seconds: float = 6 * 3600.0


@dataclass
class _Row:
    key: Key
    key_json: str
    key_values: tuple[Any, ...]
    values: dict[str, Any]
    pieces: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class BucketBusy(RuntimeError):
    pass


class EmbeddingEngine:
    def __init__(
        self,
        conn: psycopg.Connection,
        table: ResolvedTable,
        provider: EmbeddingProvider,
        retry: RetryPolicy = RetryPolicy(),
        lock_wait_seconds: float = 600.0,
    ) -> None:
        if not conn.autocommit:
            raise ValueError("the engine needs an autocommit connection; it opens its own transactions")
        self.conn = conn
        self.table = table
        self.spec = table.spec
        self.provider = provider
        self.retry = retry
        self.lock_wait_seconds = lock_wait_seconds
        self.fingerprint = self.spec.fingerprint
        register_vector(conn)
        self._pool = ThreadPoolExecutor(max_workers=provider.max_concurrency)
        self._queries = _Queries(table)
        self._copy_types = [c.type_oid for c in table.key] + ["int4", "text", "bytea", "text", "int4", "bytea"]
        self._vector_format = ">f2" if self.spec.vector_type == "halfvec" else ">f4"

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # Public entry points --------------------------------------------------------------------------

    def sync_bucket(
        self, bucket: int, full: bool = False, should_stop: Callable[[], bool] = lambda: False
    ) -> SyncStats:
        """Make bucket `bucket` current: drain its change log, and sweep it if `full` or asked to."""
        if not 0 <= bucket < self.spec.buckets:
            raise ValueError(f"table {self.spec.name}: bucket {bucket} outside 0..{self.spec.buckets - 1}")
        started = time.perf_counter()
        stats = SyncStats()
        with self._bucket_lock(bucket):
            sweep_markers = self._drain_changes(bucket, stats, should_stop)
            if (full or sweep_markers) and not should_stop():
                self._sweep(bucket, stats, should_stop, sweep_markers)
        stats.seconds = time.perf_counter() - started
        return stats

    def requeue_due_failures(self) -> int:
        """Put rows whose next attempt is due back in the change log (the retry schedule)."""
        with self.conn.transaction():
            cur = self.conn.execute(
                sql.SQL(
                    """WITH due AS (
                           UPDATE vectorsync.failures SET next_attempt_at = NULL
                           WHERE table_name = %s AND NOT dead AND next_attempt_at <= now()
                           RETURNING bucket, row_key)
                       INSERT INTO {} (bucket, row_key) SELECT bucket, row_key FROM due"""
                ).format(self.table.queue),
                (self.spec.name,),
            )
            return cur.rowcount

    # The change log ---------------------------------------------------------------------------

    def _drain_changes(self, bucket: int, stats: SyncStats, should_stop: Callable[[], bool]) -> list[int]:
        q = self._queries
        markers: list[int] = []
        after = 0
        while not should_stop():
            with self.conn.transaction():
                claimed = self.conn.execute(q.claim, (bucket, after, self.spec.page_size)).fetchall()
                if not claimed:
                    break
                ids = [i for i, k in claimed if k is not None]
                markers += [i for i, k in claimed if k is None]
                after = claimed[-1][0]
                keys = list(dict.fromkeys(json.dumps(k) for _, k in claimed if k is not None))
                rows = self._load_rows(keys) if keys else []
            found = {r.key_json for r in rows}
            absent = [k for k in keys if k not in found]
            stats.merge(self._process(bucket, rows, absent, ids))
        return markers

    def _load_rows(self, key_jsons: list[str]) -> list[_Row]:
        return self._rows(self.conn.execute(self._queries.load_by_keys, (key_jsons,)))

    def _rows(self, cursor: psycopg.Cursor) -> list[_Row]:
        nkey = len(self.table.key)
        names = [c.name for c in self.table.text_columns]
        rows = []
        for record in cursor:
            key = record[0]
            rows.append(
                _Row(
                    key=tuple(key),
                    key_json=json.dumps(key),
                    key_values=tuple(record[1 : 1 + nkey]),
                    values=dict(zip(names, record[1 + nkey :])),
                )
            )
        return rows

    # The sweep --------------------------------------------------------------------------------

    def _sweep(
        self, bucket: int, stats: SyncStats, should_stop: Callable[[], bool], markers: list[int]
    ) -> None:
        q = self._queries
        after: str | None = None
        while not should_stop():
            with self.conn.transaction():
                if after is None:
                    cur = self.conn.execute(q.sweep_first, {"bucket": bucket, "limit": self.spec.page_size})
                else:
                    cur = self.conn.execute(
                        q.sweep_next, {"bucket": bucket, "after": after, "limit": self.spec.page_size}
                    )
                rows = self._rows(cur)
            if not rows:
                break
            after = rows[-1].key_json
            stats.merge(self._process(bucket, rows, [], []))
        if should_stop():
            return  # the markers stay, so the sweep is asked for again
        with self.conn.transaction():
            stats.rows_deleted += self.conn.execute(q.delete_orphans, (bucket,)).rowcount
            self.conn.execute(q.forget_orphan_failures, (self.spec.name, bucket))
            if markers:
                stats.changes_cleared += self.conn.execute(q.delete_changes, (markers,)).rowcount

    # One page: render, chunk, hash, reuse, embed, write ------------------------------------------

    def _process(self, bucket: int, rows: list[_Row], absent: list[str], change_ids: list[int]) -> SyncStats:
        stats = SyncStats(rows_seen=len(rows) + len(absent))
        skipped: list[tuple[_Row, str]] = []
        candidates: list[_Row] = []
        for row in rows:
            text = render(self.spec.text_template, row.values)
            if not text.strip() or all(v is None or not str(v).strip() for v in row.values.values()):
                skipped.append((row, "no content: every text column is NULL or empty"))
                continue
            row.pieces = fit_to_token_limit(
                chunk(text, self.spec.chunking), self.provider.count_tokens, self.provider.max_tokens_per_input
            )
            row.hashes = [text_hash(p) for p in row.pieces]
            candidates.append(row)

        # One lookup of what is stored serves both the candidates and the skipped rows.
        stored = self._stored_hashes([r.key_json for r in candidates] + [r.key_json for r, _ in skipped])
        if skipped:
            # A row already recorded as skipped, with nothing stored, needs no new decision.
            recorded = self._recorded_skips([r.key_json for r, _ in skipped], stored)
            stats.rows_unchanged += sum(1 for r, _ in skipped if r.key in recorded)
            skipped = [(r, reason) for r, reason in skipped if r.key not in recorded]
        changed: list[_Row] = []
        unchanged: list[_Row] = []
        for row in candidates:
            current = [(h, self.fingerprint) for h in row.hashes]
            (unchanged if stored.get(row.key) == current else changed).append(row)
        stats.rows_unchanged += len(unchanged)

        texts: dict[bytes, str] = {}
        for row in changed:
            texts.update(zip(row.hashes, row.pieces))
        vectors = self._cached_vectors(list(texts))
        stats.chunks_reused += sum(len(r.hashes) for r in changed) - len(texts) + len(vectors)
        misses = {h: t for h, t in texts.items() if h not in vectors}
        errors = self._embed(misses, vectors, stats)

        written: list[_Row] = []
        failed: list[tuple[_Row, ProviderError]] = []
        for row in changed:
            error = next((errors[h] for h in row.hashes if h in errors), None)
            if error is None:
                written.append(row)
            else:
                failed.append((row, error))

        self._write(bucket, written, absent, skipped, failed, unchanged, change_ids, vectors, stats)
        stats.rows_written += len(written)
        stats.rows_skipped += len(skipped)
        stats.rows_failed += len(failed)
        return stats

    def _stored_hashes(self, key_jsons: list[str]) -> dict[Key, list[tuple[bytes, str]]]:
        stored: dict[Key, list[tuple[bytes, str]]] = {}
        if not key_jsons:
            return stored
        for key, digest, model in self.conn.execute(self._queries.stored_hashes, (key_jsons,)):
            stored.setdefault(tuple(key), []).append((bytes(digest), model))
        return stored

    def _recorded_skips(self, key_jsons: list[str], stored: dict[Key, list[tuple[bytes, str]]]) -> set[Key]:
        return {
            tuple(k)
            for (k,) in self.conn.execute(self._queries.recorded_skips, (self.spec.name, key_jsons))
            if tuple(k) not in stored
        }

    def _cached_vectors(self, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
        if not hashes:
            return {}
        cur = self.conn.execute(self._queries.cached_vectors, (hashes, self.fingerprint))
        return {bytes(h): _as_array(v) for h, v in cur}

    def _embed(self, texts: dict[bytes, str], vectors: dict[bytes, np.ndarray], stats: SyncStats) -> dict[bytes, ProviderError]:
        """Embed `texts` into `vectors`; returns the error of every hash that could not be embedded."""
        if not texts:
            return {}
        items = list(texts.items())
        counts = self.provider.count_tokens([t for _, t in items])
        batches = plan_batches(
            list(zip(items, counts)),
            self.provider.max_inputs_per_request,
            self.provider.max_tokens_per_request,
        )
        errors: dict[bytes, ProviderError] = {}
        for outcome in self._pool.map(self._embed_isolating, batches):
            for part_stats, part_vectors, part_errors in outcome:
                stats.merge(part_stats)
                vectors.update(part_vectors)
                errors.update(part_errors)
        return errors

    def _embed_isolating(self, batch: list[tuple[bytes, str]]) -> list[tuple[SyncStats, dict, dict]]:
        """One request; if it fails for a reason one input can cause, halve the batch until the
        bad inputs are alone, so the rest of the batch is still stored."""
        stats = SyncStats(provider_requests=1)
        started = time.perf_counter()
        try:
            result = self.provider.embed([t for _, t in batch])
        except ProviderError as exc:
            stats.provider_seconds = time.perf_counter() - started
            if exc.fails_run:
                raise
            if exc.row_level and len(batch) > 1:
                middle = len(batch) // 2
                return [(stats, {}, {})] + self._embed_isolating(batch[:middle]) + self._embed_isolating(batch[middle:])
            return [(stats, {}, {h: exc for h, _ in batch})]
        stats.provider_seconds = time.perf_counter() - started
        stats.tokens = result.tokens
        stats.chunks_embedded = len(batch)
        return [(stats, {h: v for (h, _), v in zip(batch, result.vectors)}, {})]

    def _write(
        self,
        bucket: int,
        written: list[_Row],
        absent: list[str],
        skipped: list[tuple[_Row, str]],
        failed: list[tuple[_Row, ProviderError]],
        unchanged: list[_Row],
        change_ids: list[int],
        vectors: dict[bytes, np.ndarray],
        stats: SyncStats,
    ) -> None:
        q = self._queries
        replaced = [r.key_json for r in written] + absent + [r.key_json for r, _ in skipped]
        succeeded = [r.key_json for r in written] + [r.key_json for r in unchanged] + absent
        with self.conn.transaction():
            if replaced:
                gone = {json.dumps(k) for (k,) in self.conn.execute(q.delete_chunks, (replaced,))}
                stats.rows_deleted += len(gone.intersection(absent))
            if written:
                with self.conn.cursor().copy(q.copy_chunks) as copy:
                    copy.set_types(self._copy_types)
                    for row in written:
                        for seq, (piece, digest) in enumerate(zip(row.pieces, row.hashes)):
                            copy.write_row(
                                (*row.key_values, seq, piece, digest, self.fingerprint, bucket,
                                 self._vector_bytes(vectors[digest]))
                            )
                            stats.chunks_written += 1
            if succeeded:
                self.conn.execute(q.forget_failures, (self.spec.name, succeeded))
            if skipped:
                self._record_failures(bucket, [(r, "skipped", reason) for r, reason in skipped], retry=False)
            if failed:
                self._record_failures(bucket, [(r, e.kind, str(e)) for r, e in failed], retry=True)
            if change_ids:
                stats.changes_cleared += self.conn.execute(q.delete_changes, (change_ids,)).rowcount

    def _vector_bytes(self, vector: np.ndarray) -> bytes:
        # pgvector's binary input: int16 dimensions, int16 unused, then the big-endian elements.
        return struct.pack(">HH", vector.shape[0], 0) + vector.astype(self._vector_format).tobytes()

    def _record_failures(self, bucket: int, entries: Iterable[tuple[_Row, str, str]], retry: bool) -> None:
        r = self.retry
        with self.conn.cursor() as cur:
            cur.executemany(
                self._queries.record_failure,
                [
                    {
                        "table": self.spec.name, "key": row.key_json, "bucket": bucket, "kind": kind,
                        "error": f"table {self.spec.name}, row {row.key_json}: {message}"[:2000],
                        "retry": retry, "max": r.max_attempts, "base": r.base_seconds, "cap": r.max_seconds,
                    }
                    for row, kind, message in entries
                ],
            )

    # Locking ----------------------------------------------------------------------------------

    def _bucket_lock(self, bucket: int) -> _AdvisoryLock:
        return _AdvisoryLock(self.conn, self.spec.name, bucket, self.lock_wait_seconds)


class _AdvisoryLock:
    """A session-level advisory lock on (table, bucket). It lives on the connection, not in a
    transaction, so no transaction stays open while we wait for the provider; a killed run's
    connection closes and the lock goes with it."""

    def __init__(self, conn: psycopg.Connection, name: str, bucket: int, wait_seconds: float) -> None:
        self.conn, self.name, self.bucket, self.wait_seconds = conn, name, bucket, wait_seconds

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.05
        while True:
            got = self.conn.execute(
                "SELECT pg_try_advisory_lock(hashtext('vectorsync:' || %s), %s)", (self.name, self.bucket)
            ).fetchone()[0]
            if got:
                return
            if time.monotonic() > deadline:
                raise BucketBusy(f"table {self.name}: bucket {self.bucket} is held by another run")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def __exit__(self, *exc: object) -> None:
        if not self.conn.closed:
            self.conn.execute(
                "SELECT pg_advisory_unlock(hashtext('vectorsync:' || %s), %s)", (self.name, self.bucket)
            )


def _as_array(vector: Any) -> np.ndarray:
    # pgvector's loader gives numpy arrays in some versions and Vector objects in others.
    as_numpy = getattr(vector, "to_numpy", None)
    return np.asarray(as_numpy() if as_numpy else vector, dtype=np.float32)


def plan_batches(
    items: Sequence[tuple[Any, int]], max_inputs: int, max_tokens: int
) -> list[list[Any]]:
    """Group (item, tokens) pairs into requests within the provider's input and token limits."""
    batches: list[list[Any]] = []
    current: list[Any] = []
    tokens = 0
    for item, count in items:
        if current and (len(current) >= max_inputs or tokens + count > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += count
    if current:
        batches.append(current)
    return batches


class _Queries:
    """Every statement the engine runs for one table, composed once with quoted identifiers."""

    def __init__(self, t: ResolvedTable) -> None:
        keys_param = sql.SQL("SELECT {} FROM unnest(%s::text[]::jsonb[]) AS u(k)").format(
            t.key_from_json(sql.SQL("u.k"))
        )
        select_columns = sql.SQL(", ").join(
            [t.key_json("s"), t.key_list("s")]
            + [sql.Identifier("s", c.name) for c in t.text_columns]
        )
        in_bucket = sql.SQL("vectorsync.bucket_of({}, {}) = %(bucket)s").format(
            t.key_json("s"), sql.Literal(t.spec.buckets)
        )
        self.claim = sql.SQL(
            "SELECT id, row_key FROM {} WHERE bucket = %s AND id > %s ORDER BY id LIMIT %s"
        ).format(t.queue)
        self.load_by_keys = sql.SQL("SELECT {} FROM {} s WHERE ({}) IN ({})").format(
            select_columns, t.source, t.key_list("s"), keys_param
        )
        self.sweep_first = sql.SQL("SELECT {} FROM {} s WHERE {} ORDER BY {} LIMIT %(limit)s").format(
            select_columns, t.source, in_bucket, t.key_list("s")
        )
        self.sweep_next = sql.SQL(
            "SELECT {} FROM {} s WHERE {} AND ({}) > ({}) ORDER BY {} LIMIT %(limit)s"
        ).format(
            select_columns, t.source, in_bucket, t.key_list("s"),
            t.key_from_json(sql.SQL("%(after)s::jsonb")), t.key_list("s"),
        )
        self.stored_hashes = sql.SQL(
            "SELECT {}, text_hash, model FROM {} e WHERE ({}) IN ({}) ORDER BY {}, chunk_seq"
        ).format(t.key_json("e"), t.store, t.key_list("e"), keys_param, t.key_list("e"))
        self.cached_vectors = sql.SQL(
            "SELECT DISTINCT ON (text_hash) text_hash, embedding::vector FROM {} "
            "WHERE text_hash = ANY(%s) AND model = %s"
        ).format(t.store)
        self.delete_chunks = sql.SQL("DELETE FROM {} e WHERE ({}) IN ({}) RETURNING {}").format(
            t.store, t.key_list("e"), keys_param, t.key_json("e")
        )
        self.copy_chunks = sql.SQL(
            "COPY {} ({}, chunk_seq, chunk, text_hash, model, bucket, embedding) FROM STDIN (FORMAT BINARY)"
        ).format(t.store, t.key_list())
        self.delete_changes = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(t.queue)
        self.delete_orphans = sql.SQL(
            "DELETE FROM {} e WHERE e.bucket = %s AND NOT EXISTS (SELECT 1 FROM {} s WHERE {})"
        ).format(t.store, t.source, t.key_equal("s", "e"))
        self.recorded_skips = sql.SQL(
            "SELECT row_key FROM vectorsync.failures WHERE table_name = %s AND error_kind = 'skipped' "
            "AND row_key = ANY(%s::text[]::jsonb[])"
        )
        self.forget_failures = sql.SQL(
            "DELETE FROM vectorsync.failures WHERE table_name = %s AND row_key = ANY(%s::text[]::jsonb[])"
        )
        self.forget_orphan_failures = sql.SQL(
            """DELETE FROM vectorsync.failures f WHERE f.table_name = %s AND f.bucket = %s
               AND NOT EXISTS (SELECT 1 FROM {} s WHERE ({}) = ({}))"""
        ).format(t.source, t.key_list("s"), t.key_from_json(sql.SQL("f.row_key")))
        self.record_failure = sql.SQL(
            """INSERT INTO vectorsync.failures AS f
                   (table_name, row_key, bucket, error_kind, last_error, next_attempt_at)
               VALUES (%(table)s, %(key)s::jsonb, %(bucket)s, %(kind)s, %(error)s,
                       CASE WHEN %(retry)s THEN now() + make_interval(secs => %(base)s * (0.8 + random() * 0.4)) END)
               ON CONFLICT (table_name, row_key) DO UPDATE SET
                   bucket = excluded.bucket,
                   error_kind = excluded.error_kind,
                   last_error = excluded.last_error,
                   last_failed_at = now(),
                   attempts = f.attempts + 1,
                   dead = %(retry)s AND f.attempts + 1 >= %(max)s,
                   next_attempt_at = CASE
                       WHEN NOT %(retry)s OR f.attempts + 1 >= %(max)s THEN NULL
                       ELSE now() + make_interval(secs => least(%(cap)s, %(base)s * power(2, f.attempts))
                                                         * (0.8 + random() * 0.4)) END"""
        )
