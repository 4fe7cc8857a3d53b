"""The claim / embed / write engine for the buckets of one table. Free of Dagster.

A run over one or more buckets:
  1. takes a session advisory lock on (table, b) for each bucket, so two runs never write the
     same bucket at once;
  2. drains the change log page by page: claim entries and read their rows in one short
     transaction, then render, chunk, hash, reuse what is stored, embed the misses with no
     transaction open, then in one short transaction write the chunks, record failures and delete
     exactly the change-log entries it claimed;
  3. in a full run, or when the log asks for it (TRUNCATE, install), sweeps every source row of the
     buckets the same way, in one pass in key order, and deletes store rows whose source row is gone.
Pages flow through a pipeline: while the provider embeds one page, the next pages are read and
prepared and their requests queued (up to the provider's concurrency), and pages are written in
the order they were read. A key that an unwritten page will write is never judged unchanged from
the store, and a text an unwritten page is embedding is borrowed from it, never sent twice.
A change that arrives while its row is being embedded has a new change-log entry that this run did
not claim, so it is embedded again with its new text: nothing is lost and nothing stays stale.
"""

from __future__ import annotations

import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from .catalog import ResolvedTable
from .providers.base import ROW_LEVEL_KINDS, EmbeddingProvider, ProviderError
from .spec import TableSpec
from .text import chunk, fit_to_token_limit, render, text_hash

# A cap on the pipeline's read-ahead, in source rows (see EmbeddingEngine._max_pages).
_MAX_ROWS_IN_FLIGHT = 20_000


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
    # (seconds from logging to clearing, keys in the entry) of each change-log entry cleared:
    # the commit-to-embedding lag, weighted by the keys it held (a sweep request counts as one).
    change_lags: list[tuple[float, int]] = field(default_factory=list)

    def merge(self, other: SyncStats) -> None:
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, list):
                mine.extend(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        """The counters and timings (the lags are a distribution: see change_lags)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "change_lags"}


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


@dataclass
class _Row:
    key_json: str  # the key as jsonb prints it: the identity of a row everywhere in the engine
    key_values: tuple[Any, ...]
    values: dict[str, Any]
    bucket: int = 0
    pieces: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class _Batch:
    """One provider request, filled across pages: a page's last, partial batch is topped up by the
    next page instead of going out half empty. Sent when full, or when a page that needs it is due."""

    def __init__(self, bucket: int) -> None:
        self.items: list[tuple[bytes, str]] = []
        self.tokens = 0
        self.bucket = bucket  # the bucket of its first text: the request itself is counted there
        # Each text's bucket, and the tokens each bucket sends: the provider's figures are shared
        # out by them, so each partition shows what its own rows cost.
        self.bucket_of: dict[bytes, int] = {}
        self.bucket_tokens: Counter[int] = Counter()
        self.future: Future | None = None
        self.waiting = 0  # unwritten pages that need its vectors
        self.booked = False

    def done(self) -> bool:
        return self.future is not None and self.future.done()


@dataclass
class _Page:
    """One page on its way through the pipeline: read, prepared (texts queued), written."""

    rows: list[_Row]
    absent: list[tuple[str, int]] = field(default_factory=list)  # (key json, bucket) of vanished rows
    change_ids: list[int] = field(default_factory=list)
    stats: dict[int, SyncStats] = field(default_factory=dict)
    skipped: list[tuple[_Row, str]] = field(default_factory=list)
    changed: list[_Row] = field(default_factory=list)
    unchanged: list[_Row] = field(default_factory=list)
    vectors: dict[bytes, np.ndarray] = field(default_factory=dict)
    # The requests whose vectors this page needs: its own, and those of earlier pages still in
    # flight that carry the same texts (borrowed, never sent twice).
    needs: dict[bytes, _Batch] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    has_chunks: set[str] = field(default_factory=set)
    has_failures: set[str] = field(default_factory=set)

    def of(self, bucket: int) -> SyncStats:
        return self.stats.setdefault(bucket, SyncStats())

    def batches(self) -> list[_Batch]:
        return list({id(b): b for b in self.needs.values()}.values())

    def ready(self) -> bool:
        return all(b.done() for b in self.batches())


@dataclass
class _Entry:
    """A claimed change-log entry: the keys one statement changed in one bucket."""

    id: int
    bucket: int
    keys: list[str]  # each key as jsonb prints it
    taken: int = 0  # how many of them are in pages already


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
        # Pages in flight: enough requests queued to keep every concurrent slot busy three times
        # over (so slots never idle while the oldest page is written and the next ones are read),
        # at least two pages (the next page is prepared while the provider works on this one), and
        # at most _MAX_ROWS_IN_FLIGHT rows: memory stays bounded whatever a bucket holds.
        per_page = max(1, -(-self.spec.page_size // max(1, provider.max_inputs_per_request)))
        self._max_pages = min(
            max(2, -(-3 * provider.max_concurrency // per_page)),
            max(2, _MAX_ROWS_IN_FLIGHT // self.spec.page_size),
        )
        self._inflight_keys: Counter[str] = Counter()
        self._inflight_hashes: dict[bytes, _Batch] = {}
        self._open: _Batch | None = None
        # Called with each page's figures per bucket as soon as the page is written (progress,
        # spend): a call of sync_buckets returns only when all of its buckets are done.
        self.on_page: Callable[[dict[int, SyncStats]], None] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # Public entry points --------------------------------------------------------------------------

    def sync_bucket(
        self, bucket: int, full: bool = False, should_stop: Callable[[], bool] = lambda: False
    ) -> SyncStats:
        """Make bucket `bucket` current: drain its change log, and sweep it if `full` or asked to."""
        return self.sync_buckets([bucket], full=full, should_stop=should_stop)[bucket]

    def sync_buckets(
        self, buckets: Iterable[int], full: bool = False, should_stop: Callable[[], bool] = lambda: False
    ) -> dict[int, SyncStats]:
        """Make several buckets current in one pass: one scan of the change log and, for a sweep,
        one scan of the source for all of them, with the provider kept busy across bucket
        boundaries. Holds the advisory lock of every bucket for the whole call.

        Row and chunk counts are exact per bucket; a request's tokens and seconds are shared out
        by the tokens each bucket sent in it, its count goes to the bucket of its first text, and
        `seconds` is the call's time shared out evenly, so the per-bucket figures add up to the
        call's totals."""
        wanted = sorted(set(buckets))
        for bucket in wanted:
            if not 0 <= bucket < self.spec.buckets:
                raise ValueError(f"table {self.spec.name}: bucket {bucket} outside 0..{self.spec.buckets - 1}")
        started = time.perf_counter()
        stats = {b: SyncStats() for b in wanted}
        if not wanted:
            return stats
        try:
            with ExitStack() as locks:
                # Ascending order: two runs over overlapping sets never wait on each other in a cycle.
                for bucket in wanted:
                    locks.enter_context(self._bucket_lock(bucket))
                markers = self._drain_changes(wanted, stats, should_stop)
                sweep = wanted if full else sorted(markers)
                if sweep and not should_stop():
                    self._sweep(sweep, stats, should_stop, [i for b in sweep for i in markers.get(b, [])])
                    # Changes that arrived while the sweep ran: picked up now, while the locks are held.
                    # A sweep asked for meanwhile (a TRUNCATE) stays in the log for the next run.
                    self._drain_changes(wanted, stats, should_stop)
        except psycopg.OperationalError as exc:
            # A lost connection (the database restarted): say which table and buckets it hit.
            # The type is kept, so callers can still tell a transient failure from a bad one.
            raise type(exc)(f"table {self.spec.name}, buckets {wanted}: {exc}") from exc
        elapsed = time.perf_counter() - started
        for s in stats.values():
            s.seconds = elapsed / len(wanted)
        return stats

    def requeue_due_failures(self) -> int:
        """Put rows whose next attempt is due back in the change log (the retry schedule);
        returns how many."""
        with self.conn.transaction():
            return self.conn.execute(
                sql.SQL(
                    """WITH due AS (
                           UPDATE vectorsync.failures SET next_attempt_at = NULL
                           WHERE table_name = %s AND NOT dead AND next_attempt_at <= now()
                           RETURNING bucket, row_key),
                       logged AS (
                           INSERT INTO {} (bucket, row_keys) SELECT bucket, array_agg(row_key) FROM due
                           GROUP BY bucket RETURNING cardinality(row_keys) AS n)
                       SELECT coalesce(sum(n), 0)::int FROM logged"""
                ).format(self.table.queue),
                (self.spec.name,),
            ).fetchone()[0]

    # The change log ---------------------------------------------------------------------------

    def _drain_changes(
        self, buckets: list[int], stats: dict[int, SyncStats], should_stop: Callable[[], bool]
    ) -> dict[int, list[int]]:
        """Process the change-log entries of `buckets` logged before the drain began; returns the
        sweep markers (bucket -> ids)."""
        markers: dict[int, list[int]] = {}
        after = [0]
        # Only what was logged before the drain began: under a steady stream of writes a run
        # must end (what comes later is the next run's, or the lingering loop's next pass).
        bound = self.conn.execute(self._queries.last_change, (buckets,)).fetchone()[0]
        if bound is None:
            return markers

        page_size = self.spec.page_size
        # Entries claimed whose keys are not all paged yet. An entry of a bulk statement may hold
        # far more keys than a page: it is paged in slices, and its id goes with the page of its
        # last key, so it leaves the log only once every key of it is written.
        held: deque[_Entry] = deque()
        exhausted = [False]

        def pages() -> Iterator[_Page]:
            while not should_stop():
                with self.conn.transaction():
                    have = sum(len(e.keys) - e.taken for e in held)
                    if have < page_size and not exhausted[0]:
                        claimed = self.conn.execute(
                            self._queries.claim, (buckets, after[0], bound, page_size, page_size - have)
                        ).fetchall()
                        if claimed:
                            after[0] = claimed[-1][0]
                        else:
                            exhausted[0] = True
                        for i, b, keys in claimed:
                            if keys is None:
                                markers.setdefault(b, []).append(i)
                            else:
                                held.append(_Entry(i, b, keys))
                    if not held:
                        if exhausted[0]:
                            return
                        continue  # only sweep markers so far
                    bucket_of: dict[str, int] = {}
                    ids = []
                    room = page_size
                    while held and room > 0:
                        entry = held[0]
                        end = min(len(entry.keys), entry.taken + room)
                        for k in entry.keys[entry.taken:end]:
                            bucket_of.setdefault(k, entry.bucket)
                        room -= end - entry.taken
                        entry.taken = end
                        if end == len(entry.keys):
                            ids.append(held.popleft().id)
                    rows = self._load_rows(list(bucket_of)) if bucket_of else []
                for row in rows:
                    row.bucket = bucket_of[row.key_json]
                found = {r.key_json for r in rows}
                yield _Page(rows, [(k, b) for k, b in bucket_of.items() if k not in found], ids)

        while self._run_pages(pages(), stats) and not should_stop():
            pass
        return markers

    def _load_rows(self, key_jsons: list[str]) -> list[_Row]:
        return self._rows(self.conn.execute(self._queries.load_by_keys, (_key_array(key_jsons),)), with_bucket=False)

    def _rows(self, cursor: psycopg.Cursor, with_bucket: bool) -> list[_Row]:
        nkey = len(self.table.key)
        first_value = 2 + nkey if with_bucket else 1 + nkey
        names = [c.name for c in self.table.text_columns]
        rows = []
        for record in cursor:
            rows.append(
                _Row(
                    key_json=record[0],
                    key_values=tuple(record[first_value - nkey : first_value]),
                    values=dict(zip(names, record[first_value:])),
                    bucket=record[1] if with_bucket else 0,
                )
            )
        return rows

    # The sweep --------------------------------------------------------------------------------

    def _sweep(
        self, buckets: list[int], stats: dict[int, SyncStats], should_stop: Callable[[], bool], markers: list[int]
    ) -> None:
        """Compare every source row of `buckets` with the store, in one pass in key order."""
        q = self._queries
        finished = [False]

        def pages() -> Iterator[_Page]:
            after: str | None = None
            while not should_stop():
                params = {"buckets": buckets, "after": after, "limit": self.spec.page_size}
                cur = self.conn.execute(q.sweep_first if after is None else q.sweep_next, params)
                rows = self._rows(cur, with_bucket=True)
                if not rows:
                    finished[0] = True
                    return
                after = rows[-1].key_json
                held = self._held_back([r.key_json for r in rows])
                if held:
                    # The ledger decides when a failed row is tried again, not the sweep: a dead
                    # row or one not yet due is left alone (a change to its text still reaches
                    # it through the change log).
                    rows = [r for r in rows if r.key_json not in held]
                if rows:
                    yield _Page(rows)

        self._run_pages(pages(), stats)
        if not finished[0]:
            return  # stopped: the markers stay, so the sweep is asked for again
        with self.conn.transaction():
            for bucket, in_bucket in _count_by(self.conn.execute(q.delete_orphans, (buckets,))).items():
                stats[bucket].rows_deleted += in_bucket
            self.conn.execute(q.forget_orphan_failures, (self.spec.name, buckets))
            if markers:
                _book_cleared(self.conn.execute(q.delete_changes, (markers,)), stats.__getitem__)

    def _held_back(self, key_jsons: list[str]) -> set[str]:
        """Keys of failed rows whose next attempt is not due, or that are dead."""
        return {
            k for (k,) in self.conn.execute(
                self._queries.held_back, (self.spec.name, _key_array(key_jsons))
            )
        }

    # The pipeline: read and prepare the next pages while the provider embeds earlier ones --------

    def _run_pages(self, pages: Iterator[_Page], stats: dict[int, SyncStats]) -> int:
        """Prepare each page (requests submitted) as it is read, and write pages in the order they
        were read, as soon as their requests are done; at most self._max_pages are in flight.
        Returns how many pages were processed."""
        inflight: deque[_Page] = deque()
        done = 0
        try:
            for page in pages:
                self._prepare(page)
                inflight.append(page)
                while inflight and (len(inflight) >= self._max_pages or inflight[0].ready()):
                    self._finish(inflight.popleft(), stats)
                    done += 1
            while inflight:
                self._finish(inflight.popleft(), stats)
                done += 1
        except BaseException:
            # Nothing of an unwritten page is cleared: its changes stay in the log for the next run.
            futures = [b.future for page in inflight for b in page.batches() if b.future is not None]
            for future in futures:
                future.cancel()
            wait(futures)
            for page in inflight:
                self._release(page)
            self._open = None
            self._inflight_hashes.clear()
            raise
        return done

    def _prepare(self, page: _Page) -> None:
        """Render, chunk and hash the page's rows, decide what is unchanged, reuse stored vectors,
        and submit the misses to the provider."""
        candidates: list[_Row] = []
        for row in page.rows:
            text = render(self.spec.text_template, row.values)
            if not text.strip() or all(v is None or not str(v).strip() for v in row.values.values()):
                page.skipped.append((row, "no content: every text column is NULL or empty"))
                continue
            row.pieces = chunk(text, self.spec.chunking)
            candidates.append(row)
        tokens = self._fit_to_token_limit(candidates)

        # A key that an earlier, unwritten page is about to write must be written again after it,
        # whatever the store says now: the store does not show that write yet.
        pending = self._inflight_keys
        page.keys = [r.key_json for r in page.rows] + [k for k, _ in page.absent]
        in_flight = {k for k in page.keys if k in pending}
        # One lookup of what is stored, and one of the failure ledger, serve every row of the page.
        stored = self._stored_hashes([r.key_json for r in candidates] + [r.key_json for r, _ in page.skipped])
        failures = self._failure_kinds(page.keys)
        # Only these keys can have chunks to delete or ledger entries to clear when the page is
        # written: a backfill into an empty store then skips both statements.
        page.has_chunks = set(stored) | in_flight
        page.has_failures = set(failures) | in_flight
        unchanged = Counter()
        if page.skipped:
            # A row already recorded as skipped, with nothing stored, needs no new decision.
            keep = []
            for row, reason in page.skipped:
                k = row.key_json
                if failures.get(k) == "skipped" and k not in stored and k not in in_flight:
                    unchanged[row.bucket] += 1
                else:
                    keep.append((row, reason))
            page.skipped = keep
        fingerprint = self.fingerprint
        for row in candidates:
            k = row.key_json
            if k not in in_flight and stored.get(k) == [(h, fingerprint) for h in row.hashes]:
                page.unchanged.append(row)
                unchanged[row.bucket] += 1
            else:
                page.changed.append(row)
        for bucket, n in unchanged.items():
            page.of(bucket).rows_unchanged += n

        texts: dict[bytes, str] = {}
        first_bucket: dict[bytes, int] = {}
        for row in page.changed:
            for h, p in zip(row.hashes, row.pieces):
                if h not in texts:
                    texts[h] = p
                    first_bucket[h] = row.bucket
        for h in texts:
            if h in self._inflight_hashes:
                page.needs[h] = self._inflight_hashes[h]
        page.vectors.update(self._cached_vectors([h for h in texts if h not in page.needs]))
        misses = [(h, t) for h, t in texts.items() if h not in page.vectors and h not in page.needs]
        own = {h for h, _ in misses}
        credited: set[bytes] = set()
        reused: Counter[int] = Counter()
        for row in page.changed:
            for h in row.hashes:
                if h in own and h not in credited:
                    credited.add(h)
                else:
                    reused[row.bucket] += 1
        for bucket, n in reused.items():
            page.of(bucket).chunks_reused += n
        if misses:
            limit_inputs = self.provider.max_inputs_per_request
            limit_tokens = self.provider.max_tokens_per_request
            for (h, text), n in zip(misses, self._count_missing(misses, tokens)):
                batch = self._open
                if batch is not None and (len(batch.items) >= limit_inputs or batch.tokens + n > limit_tokens):
                    self._send_open()
                    batch = None
                if batch is None:
                    batch = self._open = _Batch(first_bucket[h])
                batch.items.append((h, text))
                batch.tokens += n
                batch.bucket_of[h] = first_bucket[h]
                batch.bucket_tokens[first_bucket[h]] += n
                self._inflight_hashes[h] = batch
                page.needs[h] = batch
            if self._open is not None and len(self._open.items) >= limit_inputs:
                self._send_open()
        for batch in page.batches():
            batch.waiting += 1
        self._inflight_keys.update(page.keys)

    def _send_open(self) -> None:
        batch, self._open = self._open, None
        if batch is not None and batch.items:
            batch.future = self._pool.submit(self._embed_isolating, batch.items)

    def _fit_to_token_limit(self, rows: list[_Row]) -> dict[bytes, int]:
        """Split any piece the model would truncate (never cut silently), and hash every piece.
        Tokens are counted in one call per page rather than one per row; returns them by hash."""
        pieces = [p for r in rows for p in r.pieces]
        if not pieces:
            return {}
        counts = iter(self.provider.count_tokens(pieces))
        limit = self.provider.max_tokens_per_input
        tokens: dict[bytes, int] = {}
        for row in rows:
            row_counts = [next(counts) for _ in row.pieces]
            if max(row_counts) > limit:
                row.pieces = fit_to_token_limit(row.pieces, self.provider.count_tokens, limit)
                row.hashes = [text_hash(p) for p in row.pieces]
                continue  # counted again, if it is embedded, by _count_missing
            row.hashes = [text_hash(p) for p in row.pieces]
            tokens.update(zip(row.hashes, row_counts))
        return tokens

    def _count_missing(self, items: list[tuple[bytes, str]], tokens: dict[bytes, int]) -> list[int]:
        unknown = [t for h, t in items if h not in tokens]
        counted = iter(self.provider.count_tokens(unknown) if unknown else [])
        return [tokens[h] if h in tokens else next(counted) for h, _ in items]

    def _finish(self, page: _Page, stats: dict[int, SyncStats]) -> None:
        """Wait for the requests the page needs, then write it in one short transaction."""
        try:
            if self._open is not None and any(b is self._open for b in page.batches()):
                self._send_open()
            errors: dict[bytes, ProviderError] = {}
            for batch in page.batches():
                outcome = batch.future.result()  # type: ignore[union-attr]
                for part_stats, part_vectors, part_errors in outcome:
                    if not batch.booked:
                        _book_provider(page, batch, part_stats, part_vectors)
                    for h, v in part_vectors.items():
                        if h in page.needs:
                            page.vectors[h] = v
                    for h, e in part_errors.items():
                        if h in page.needs:
                            errors[h] = e
                batch.booked = True
            written: list[_Row] = []
            failed: list[tuple[_Row, ProviderError]] = []
            for row in page.changed:
                error = next((errors[h] for h in row.hashes if h in errors), None)
                if error is None:
                    written.append(row)
                else:
                    failed.append((row, error))
            self._write(page, written, failed)
        finally:
            self._release(page)
        for name, buckets in (
            ("rows_written", [r.bucket for r in written]),
            ("rows_skipped", [r.bucket for r, _ in page.skipped]),
            ("rows_failed", [r.bucket for r, _ in failed]),
            ("rows_seen", [r.bucket for r in page.rows] + [b for _, b in page.absent]),
        ):
            for bucket, n in Counter(buckets).items():
                setattr(page.of(bucket), name, getattr(page.of(bucket), name) + n)
        for bucket, s in page.stats.items():
            stats[bucket].merge(s)
        if self.on_page is not None:
            self.on_page(page.stats)

    def _release(self, page: _Page) -> None:
        """The page is written (or abandoned): a request no unwritten page needs any more is
        forgotten, since its vectors are in the store now and the cache lookup finds them."""
        for batch in page.batches():
            batch.waiting -= 1
            if batch.waiting <= 0 and batch.future is not None:
                for h, _ in batch.items:
                    if self._inflight_hashes.get(h) is batch:
                        del self._inflight_hashes[h]
        page.needs = {}
        self._inflight_keys.subtract(page.keys)
        for k in page.keys:
            if self._inflight_keys[k] <= 0:
                del self._inflight_keys[k]
        page.keys = []

    def _stored_hashes(self, key_jsons: list[str]) -> dict[str, list[tuple[bytes, str]]]:
        stored: dict[str, list[tuple[bytes, str]]] = {}
        if not key_jsons:
            return stored
        for key, digest, model in self.conn.execute(self._queries.stored_hashes, (_key_array(key_jsons),)):
            stored.setdefault(key, []).append((bytes(digest), model))
        return stored

    def _failure_kinds(self, key_jsons: list[str]) -> dict[str, str]:
        """The ledger's entries for these keys: key -> error kind."""
        if not key_jsons:
            return {}
        return dict(self.conn.execute(self._queries.failure_kinds, (self.spec.name, _key_array(key_jsons))))

    def _cached_vectors(self, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
        if not hashes:
            return {}
        cur = self.conn.execute(self._queries.cached_vectors, (hashes, self.fingerprint))
        return {bytes(h): _as_array(v) for h, v in cur}

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

    def _write(self, page: _Page, written: list[_Row], failed: list[tuple[_Row, ProviderError]]) -> None:
        q = self._queries
        absent = [k for k, _ in page.absent]
        replaced = absent + [
            k for k in [r.key_json for r in written] + [r.key_json for r, _ in page.skipped] if k in page.has_chunks
        ]
        succeeded = [
            k for k in [r.key_json for r in written] + [r.key_json for r in page.unchanged] + absent
            if k in page.has_failures
        ]
        with self.conn.transaction():
            if replaced:
                gone = {k for (k,) in self.conn.execute(q.delete_chunks, (_key_array(replaced),))}
                for key, bucket in page.absent:
                    if key in gone:
                        page.of(bucket).rows_deleted += 1
            if written:
                vectors = page.vectors
                chunks: Counter[int] = Counter()
                with self.conn.cursor().copy(q.copy_chunks) as copy:
                    copy.set_types(self._copy_types)
                    for row in written:
                        for seq, (piece, digest) in enumerate(zip(row.pieces, row.hashes)):
                            copy.write_row(
                                (*row.key_values, seq, piece, digest, self.fingerprint, row.bucket,
                                 self._vector_bytes(vectors[digest]))
                            )
                        chunks[row.bucket] += len(row.pieces)
                for bucket, n in chunks.items():
                    page.of(bucket).chunks_written += n
            if succeeded:
                self.conn.execute(q.forget_failures, (self.spec.name, _key_array(succeeded)))
            if page.skipped:
                self._record_failures([(r, "skipped", reason, 0.0) for r, reason in page.skipped], retry=False)
            if failed:
                self._record_failures([(r, e.kind, str(e), e.retry_after or 0.0) for r, e in failed], retry=True)
            if page.change_ids:
                _book_cleared(self.conn.execute(q.delete_changes, (page.change_ids,)), page.of)

    def _vector_bytes(self, vector: np.ndarray) -> bytes:
        # pgvector's binary input: int16 dimensions, int16 unused, then the big-endian elements.
        return struct.pack(">HH", vector.shape[0], 0) + vector.astype(self._vector_format).tobytes()

    def _record_failures(self, entries: Iterable[tuple[_Row, str, str, float]], retry: bool) -> None:
        r = self.retry
        with self.conn.cursor() as cur:
            cur.executemany(
                self._queries.record_failure,
                [
                    {
                        "table": self.spec.name, "key": row.key_json, "bucket": row.bucket, "kind": kind,
                        "error": f"table {self.spec.name}, row {row.key_json}: {message}"[:2000],
                        "retry": retry, "counts": kind in ROW_LEVEL_KINDS,
                        "max": r.max_attempts, "base": r.base_seconds, "cap": r.max_seconds,
                        "at_least": at_least,
                    }
                    for row, kind, message, at_least in entries
                ],
            )

    # Locking ----------------------------------------------------------------------------------

    def _bucket_lock(self, bucket: int) -> _AdvisoryLock:
        return _AdvisoryLock(self.conn, self.spec.name, bucket, self.lock_wait_seconds)


def _key_array(key_jsons: Iterable[str]) -> str:
    """Keys (each a jsonb array's text) as one jsonb array, the parameter of every keyed lookup."""
    return "[" + ",".join(key_jsons) + "]"


def _book_provider(page: _Page, batch: _Batch, part: SyncStats, vectors: dict[bytes, Any]) -> None:
    """A request's figures, by bucket: chunks embedded exactly, tokens and provider seconds in
    proportion to the tokens each bucket sent (the provider reports one total per request)."""
    page.of(batch.bucket).provider_requests += part.provider_requests
    total = sum(batch.bucket_tokens.values())
    shares = sorted(batch.bucket_tokens.items()) if total else [(batch.bucket, 1)]
    total = total or 1
    chunks = Counter(batch.bucket_of.get(h, batch.bucket) for h in vectors)
    tokens_left = part.tokens
    for i, (bucket, sent) in enumerate(shares):
        stats = page.of(bucket)
        tokens = tokens_left if i == len(shares) - 1 else round(part.tokens * sent / total)
        tokens_left -= tokens
        stats.tokens += tokens
        stats.provider_seconds += part.provider_seconds * sent / total
        stats.chunks_embedded += chunks.pop(bucket, 0)
    for bucket, n in chunks.items():
        page.of(bucket).chunks_embedded += n


def _book_cleared(cursor: psycopg.Cursor, stats_of: Callable[[int], SyncStats]) -> None:
    """Count the change-log entries a `delete_changes` cleared, and their lags, per bucket."""
    for bucket, lag, keys in cursor:
        stats = stats_of(bucket)
        stats.changes_cleared += 1
        stats.change_lags.append((lag, keys))


def _count_by(cursor: psycopg.Cursor) -> Counter[int]:
    """How many rows a `... RETURNING bucket` statement returned per bucket."""
    return Counter(b for (b,) in cursor)


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


class _Queries:
    """Every statement the engine runs for one table, composed once with quoted identifiers."""

    def __init__(self, t: ResolvedTable) -> None:
        # Keys travel as one jsonb array (joined in Python, no per-key quoting) and come back as
        # jsonb's own text, so a key read from the source, the store or the log compares equal.
        # Every keyed lookup is a LATERAL probe per key, fenced by OFFSET 0 so the planner cannot
        # turn it into a hash join over the whole table: a store emptied or created just before a
        # backfill has no statistics, and that plan then scans the growing store once per page.
        keys = sql.SQL("jsonb_array_elements(%s::jsonb) AS u(k)")

        def matches(alias: str) -> sql.Composed:
            return sql.SQL(" AND ").join(
                sql.SQL("{} = (u.k ->> {})::{}").format(sql.Identifier(alias, c.name), sql.Literal(i), sql.SQL(c.type_sql))
                for i, c in enumerate(t.key)
            )

        key_text = sql.SQL("{}::text").format(t.key_json("s"))
        select_columns = sql.SQL(", ").join(
            [key_text, t.key_list("s")]
            + [sql.Identifier("s", c.name) for c in t.text_columns]
        )
        bucket_expr = t.bucket_expr("s")
        swept_columns = sql.SQL(", ").join(
            [key_text, bucket_expr, t.key_list("s")]
            + [sql.Identifier("s", c.name) for c in t.text_columns]
        )
        # One scan in key order serves every requested bucket: a backfill of all buckets reads the
        # source once, not once per bucket.
        in_buckets = sql.SQL("{} = ANY(%(buckets)s::int[])").format(bucket_expr)
        # The next entries in id order, as many as it takes to reach the last parameter's number
        # of keys (a sweep request counts as one): each entry's keys as jsonb prints them.
        self.claim = sql.SQL(
            """SELECT id, bucket, row_keys::text[]
               FROM (SELECT id, bucket, row_keys,
                            sum(coalesce(cardinality(row_keys), 1)) OVER (ORDER BY id)
                              - coalesce(cardinality(row_keys), 1) AS before
                     FROM (SELECT id, bucket, row_keys FROM {} WHERE bucket = ANY(%s::int[])
                           AND id > %s AND id <= %s ORDER BY id LIMIT %s) AS next) AS counted
               WHERE before < %s ORDER BY id"""
        ).format(t.queue)
        self.held_back = sql.SQL(
            """SELECT row_key::text FROM vectorsync.failures
               WHERE table_name = %s AND row_key = ANY(ARRAY(SELECT jsonb_array_elements(%s::jsonb)))
                 AND error_kind <> 'skipped' AND (dead OR next_attempt_at > now())"""
        )
        self.last_change = sql.SQL("SELECT max(id) FROM {} WHERE bucket = ANY(%s::int[])").format(t.queue)
        self.load_by_keys = sql.SQL(
            "SELECT x.* FROM {} CROSS JOIN LATERAL (SELECT {} FROM {} s WHERE {} OFFSET 0) x"
        ).format(keys, select_columns, t.source, matches("s"))
        self.sweep_first = sql.SQL("SELECT {} FROM {} s WHERE {} ORDER BY {} LIMIT %(limit)s").format(
            swept_columns, t.source, in_buckets, t.key_list("s")
        )
        self.sweep_next = sql.SQL(
            "SELECT {} FROM {} s WHERE {} AND ({}) > ({}) ORDER BY {} LIMIT %(limit)s"
        ).format(
            swept_columns, t.source, in_buckets, t.key_list("s"),
            t.key_from_json(sql.SQL("%(after)s::jsonb")), t.key_list("s"),
        )
        # Ordered by chunk_seq: the chunks of each key come back in order (keys may interleave).
        self.stored_hashes = sql.SQL(
            "SELECT x.k, x.text_hash, x.model FROM {} CROSS JOIN LATERAL "
            "(SELECT {}::text AS k, e.text_hash, e.model, e.chunk_seq FROM {} e WHERE {} OFFSET 0) x "
            "ORDER BY x.chunk_seq"
        ).format(keys, t.key_json("e"), t.store, matches("e"))
        # %b: a bytea[] in binary, which psycopg builds without quoting each element in Python.
        self.cached_vectors = sql.SQL(
            "SELECT h.x, c.embedding::vector FROM unnest(%b::bytea[]) AS h(x) CROSS JOIN LATERAL "
            "(SELECT embedding FROM {} WHERE text_hash = h.x AND model = %s LIMIT 1) c"
        ).format(t.store)
        self.delete_chunks = sql.SQL(
            "DELETE FROM {} e WHERE e.ctid = ANY(ARRAY(SELECT x.ctid FROM {} CROSS JOIN LATERAL "
            "(SELECT d.ctid FROM {} d WHERE {} OFFSET 0) x)) RETURNING {}::text"
        ).format(t.store, keys, t.store, matches("d"), t.key_json("e"))
        self.copy_chunks = sql.SQL(
            "COPY {} ({}, chunk_seq, chunk, text_hash, model, bucket, embedding) FROM STDIN (FORMAT BINARY)"
        ).format(t.store, t.key_list())
        # With each entry's age (queued_at is when the change was logged, in the writer's
        # transaction) and how many keys it held: the commit-to-embedding lag.
        self.delete_changes = sql.SQL(
            "DELETE FROM {} WHERE id = ANY(%s) RETURNING bucket, "
            "extract(epoch FROM clock_timestamp() - queued_at)::float8, coalesce(cardinality(row_keys), 1)"
        ).format(t.queue)
        # One result row per deleted source row (not per chunk), with its bucket.
        self.delete_orphans = sql.SQL(
            "WITH gone AS (DELETE FROM {} e WHERE e.bucket = ANY(%s::int[]) "
            "AND NOT EXISTS (SELECT 1 FROM {} s WHERE {}) RETURNING e.bucket, {} AS k) "
            "SELECT bucket FROM gone GROUP BY bucket, k"
        ).format(t.store, t.source, t.key_equal("s", "e"), t.key_json("e"))
        self.failure_kinds = sql.SQL(
            "SELECT row_key::text, error_kind FROM vectorsync.failures WHERE table_name = %s "
            "AND row_key = ANY(ARRAY(SELECT jsonb_array_elements(%s::jsonb)))"
        )
        self.forget_failures = sql.SQL(
            "DELETE FROM vectorsync.failures WHERE table_name = %s "
            "AND row_key = ANY(ARRAY(SELECT jsonb_array_elements(%s::jsonb)))"
        )
        self.forget_orphan_failures = sql.SQL(
            """DELETE FROM vectorsync.failures f WHERE f.table_name = %s AND f.bucket = ANY(%s::int[])
               AND NOT EXISTS (SELECT 1 FROM {} s WHERE ({}) = ({}))"""
        ).format(t.source, t.key_list("s"), t.key_from_json(sql.SQL("f.row_key")))
        # A skipped row (no content) is not an attempt: a later real failure counts from one. The
        # next attempt waits the jittered backoff, capped, and at least what the provider asked for.
        # Only errors a row can cause (%(counts)s) make it dead: an outage of the provider would
        # otherwise kill every row it touched, and a dead row is never tried again by itself.
        attempts = sql.SQL("(CASE WHEN f.error_kind = 'skipped' THEN 1 ELSE f.attempts + 1 END)")
        self.record_failure = sql.SQL(
            """INSERT INTO vectorsync.failures AS f
                   (table_name, row_key, bucket, error_kind, last_error, next_attempt_at, dead)
               VALUES (%(table)s, %(key)s::jsonb, %(bucket)s, %(kind)s, %(error)s,
                       CASE WHEN %(retry)s AND (%(max)s > 1 OR NOT %(counts)s)
                            THEN now() + make_interval(secs => greatest(
                                %(at_least)s, least(%(cap)s, %(base)s * (0.8 + random() * 0.4)))) END,
                       %(retry)s AND %(counts)s AND %(max)s <= 1)
               ON CONFLICT (table_name, row_key) DO UPDATE SET
                   bucket = excluded.bucket,
                   error_kind = excluded.error_kind,
                   last_error = excluded.last_error,
                   last_failed_at = now(),
                   first_failed_at = CASE WHEN f.error_kind = 'skipped' THEN now() ELSE f.first_failed_at END,
                   attempts = {attempts},
                   dead = %(retry)s AND %(counts)s AND {attempts} >= %(max)s,
                   next_attempt_at = CASE
                       WHEN NOT %(retry)s OR (%(counts)s AND {attempts} >= %(max)s) THEN NULL
                       ELSE now() + make_interval(secs => greatest(%(at_least)s, least(%(cap)s,
                           %(base)s * power(2, least({attempts} - 1, 30)) * (0.8 + random() * 0.4))))
                   END"""
        ).format(attempts=attempts)
