"""The engine that makes buckets of one table current. Free of Dagster.

A run over one or more buckets:
  1. takes the lock of each bucket (locks.bucket_lock), so two runs never write the same bucket
     at once;
  2. drains the change log (changelog.py) page by page: claim entries and read their rows
     (source_rows.py) in one short transaction, then render, chunk, hash, reuse what is stored,
     embed the misses with no transaction open, then in one short transaction write the chunks
     (store.py), record failures (ledger.py) and delete exactly the change-log entries it
     claimed; pages flow through the read-ahead pipeline (pipeline.py);
  3. in a full run, or when the log asks for it (TRUNCATE, install), sweeps every source row of the
     buckets the same way, in one pass in key order, and deletes store rows whose source row is
     gone (sweep.py); in batch mode, or while a bucket's batch is pending, batch_fill.py decides
     first which buckets are swept now (the others wait, parked, for their batch).
A change that arrives while its row is being embedded has a new change-log entry that this run did
not claim, so it is embedded again with its new text: nothing is lost and nothing stays stale.
Where failures go, and when they are retried, is ledger.py's alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack

import psycopg
from pgvector.psycopg import register_vector

from .batch_fill import BatchFill
from .catalog import ResolvedTable, use_key_text_settings
from .changelog import ChangeLog, ClaimedPage
from .ledger import FailureLedger, RetryPolicy, retry_policy
from .locks import BucketBusy, bucket_lock
from .pipeline import Page, Pipeline
from .providers.base import EmbeddingProvider
from .source_rows import SourceReader
from .store import Store
from .sweep import Sweep
from .sync_stats import SyncStats

# Callers import these from here: the engine is the front door, each has its own owner.
__all__ = ["BucketBusy", "EmbeddingEngine", "RetryPolicy", "SyncStats", "retry_policy"]


class EmbeddingEngine:
    def __init__(
        self,
        conn: psycopg.Connection,
        table: ResolvedTable,
        provider: EmbeddingProvider,
        retry: RetryPolicy = RetryPolicy(),
        lock_wait_seconds: float = 600.0,
        reuse_from: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`table` is one model version of a table (assets/versions.py: version 1 is the
        declaration itself); `reuse_from` the stores whose vectors it may reuse (store.py)."""
        if not conn.autocommit:
            raise ValueError("the engine needs an autocommit connection; it opens its own transactions")
        self.conn = conn
        self.table = table
        self.spec = table.spec
        self.provider = provider
        self.retry = retry
        self.lock_wait_seconds = lock_wait_seconds
        # Each version locks its own buckets: a candidate filling never waits for the active's run.
        self.lock_name = self.spec.name if self.spec.version == 1 else f"{self.spec.name}@v{self.spec.version}"
        register_vector(conn)
        table = table.with_parameters()  # every statement below runs with parameters
        self.source = SourceReader(conn, table)
        self.changes = ChangeLog(conn, table)
        self.ledger = FailureLedger(conn, table, retry)
        self.store = Store(conn, table, reuse_from)
        self.pipeline = Pipeline(conn, self.spec, provider, self.store, self.ledger, self.changes)
        self.sweep = Sweep(conn, table, self.source, self.ledger, self.changes)
        self.batch_fill = BatchFill(conn, table, self.sweep, self.store, provider)

    def close(self) -> None:
        self.pipeline.close()
        self.batch_fill.close()

    @property
    def on_page(self) -> Callable[[dict[int, SyncStats]], None] | None:
        """Called with each page's figures per bucket as soon as it is written (progress, spend)."""
        return self.pipeline.on_page

    @on_page.setter
    def on_page(self, callback: Callable[[dict[int, SyncStats]], None] | None) -> None:
        self.pipeline.on_page = callback

    def sync_bucket(
        self, bucket: int, full: bool = False, should_stop: Callable[[], bool] = lambda: False
    ) -> SyncStats:
        """Make bucket `bucket` current: drain its change log, and sweep it if `full` or asked to."""
        return self.sync_buckets([bucket], full=full, should_stop=should_stop)[bucket]

    def sync_buckets(
        self, buckets: Iterable[int], full: bool = False, should_stop: Callable[[], bool] = lambda: False,
        batch: bool | None = None, batch_wait_seconds: float = 0.0,
    ) -> dict[int, SyncStats]:
        """Make several buckets current in one pass: one scan of the change log and, for a sweep,
        one scan of the source for all of them, with the provider kept busy across bucket
        boundaries. Holds the lock of every bucket for the whole call.

        Row and chunk counts are exact per bucket; a request's tokens and seconds are shared out
        by the tokens each bucket sent in it, its count goes to the bucket of its first text, and
        `seconds` is the call's time shared out evenly, so the per-bucket figures add up to the
        call's totals.

        `batch`: sweep through the provider's batch API (None: as the declaration's
        backfill.mode says); `batch_wait_seconds`: how long to wait for a pending batch before
        returning with its buckets unswept (batch_fill.py)."""
        wanted = sorted(set(buckets))
        for bucket in wanted:
            if not 0 <= bucket < self.spec.buckets:
                raise ValueError(f"table {self.spec.name}: bucket {bucket} outside 0..{self.spec.buckets - 1}")
        started = time.perf_counter()
        stats = {b: SyncStats() for b in wanted}
        if not wanted:
            return stats
        # Again on every call: the caller may have changed its session's time zone in between.
        use_key_text_settings(self.conn)
        try:
            with ExitStack() as locks:
                # Ascending order: two runs over overlapping sets never wait on each other in a cycle.
                for bucket in wanted:
                    locks.enter_context(bucket_lock(self.conn, self.lock_name, bucket, self.lock_wait_seconds))
                markers = self._drain_changes(wanted, stats, should_stop)
                sweep = wanted if full else sorted(markers)
                if sweep and not should_stop():
                    sweep = self.batch_fill.before_sweep(sweep, stats, batch, batch_wait_seconds, should_stop)
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
        use_key_text_settings(self.conn)
        return self.ledger.requeue_due()

    def _drain_changes(
        self, buckets: list[int], stats: dict[int, SyncStats], should_stop: Callable[[], bool]
    ) -> dict[int, list[int]]:
        """Process the change-log entries of `buckets` logged before the drain began; returns the
        sweep requests found (bucket -> entry ids)."""
        markers: dict[int, list[int]] = {}

        def load(claimed: ClaimedPage) -> Page:
            rows = self.source.by_keys(list(claimed.bucket_of)) if claimed.bucket_of else []
            for row in rows:
                row.bucket = claimed.bucket_of[row.key_json]
            found = {r.key_json for r in rows}
            absent = [(k, b) for k, b in claimed.bucket_of.items() if k not in found]
            return Page(rows, absent, claimed.entry_ids)

        pages: Iterator[Page] = self.changes.pages(buckets, self.spec.page_size, should_stop, markers, load)
        self.pipeline.run(pages, stats)
        return markers

    def _sweep(
        self, buckets: list[int], stats: dict[int, SyncStats], should_stop: Callable[[], bool], markers: list[int]
    ) -> None:
        self.pipeline.run((Page(rows) for rows in self.sweep.pages(buckets, should_stop)), stats)
        if self.sweep.finished:
            self.sweep.finish(buckets, stats, markers)
            self.batch_fill.after_sweep(buckets)
