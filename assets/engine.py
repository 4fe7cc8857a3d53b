"""The engine that makes buckets of one table current. Free of Dagster.

A run over one or more buckets works on them one at a time, in ascending order, and for each:
  1. takes the bucket's lock (locks.try_bucket_lock), so two runs never write the same bucket at
     once; a bucket another run holds is skipped until the others are done, and
     only a run with nothing else left waits for one (holding no lock meanwhile: no deadlock);
  2. drains the bucket's change log (changelog.py) page by page: claim entries and read their rows
     (source_rows.py) in one short transaction, then render, chunk, hash, reuse what is stored,
     embed the misses with no transaction open, then in one short transaction write the chunks
     (store.py), record failures (ledger.py) and delete exactly the change-log entries it
     claimed;
  3. in a full run, or when the log asks for it (TRUNCATE, install), sweeps every source row of the
     bucket the same way, in key order, deletes store rows whose source row is gone (sweep.py),
     and drains the changes that came meanwhile; a bucket whose batch is pending (batch mode,
     batch_fill.py) is not swept: its sweep request stays parked in the log for the batch;
  4. releases the lock once the bucket's last page is written.
Every bucket's pages flow through one read-ahead pipeline (pipeline.py), so the provider stays busy
across bucket boundaries while the next bucket is read: a run holds the lock of the bucket being
written and, for a moment, of the one being read ahead, never of buckets it is not working on, so a
change run for another bucket never waits for a long sweep. The price is one source scan per bucket
instead of one per run (about 1.5 s instead of 0.9 s for 200,000 rows in 16 buckets).
A change that arrives while its row is being embedded has a new change-log entry that this run did
not claim, so it is embedded again with its new text: nothing is lost and nothing stays stale.
Where failures go, and when they are retried, is ledger.py's alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress

import psycopg
from pgvector.psycopg import register_vector

from .batch_fill import BatchFill
from .catalog import ResolvedTable, use_key_text_settings
from .changelog import ChangeLog, ClaimedPage
from .ledger import FailureLedger, RetryPolicy, retry_policy
from .locks import BucketBusy, try_bucket_lock, unlock_bucket
from .pipeline import Page, Pipeline
from .providers.base import EmbeddingProvider
from .source_rows import SourceReader
from .store import Store
from .sweep import Sweep
from .sync_stats import SyncStats
from .wal_capture import drain_table

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
        self, bucket: int, full: bool = False, should_stop: Callable[[], bool] = lambda: False,
        drain_wal: bool = True,
    ) -> SyncStats:
        """Make bucket `bucket` current: drain its change log, and sweep it if `full` or asked to."""
        return self.sync_buckets([bucket], full=full, should_stop=should_stop, drain_wal=drain_wal)[bucket]

    def drain_wal(self) -> None:
        """Log what the table's replication slot decoded so far (`capture: logical`; nothing for
        a table whose triggers capture), so this run sees every change committed before it."""
        drain_table(self.conn, self.table)

    def sync_buckets(
        self, buckets: Iterable[int], full: bool = False, should_stop: Callable[[], bool] = lambda: False,
        batch: bool | None = None, batch_wait_seconds: float = 0.0, drain_wal: bool = True,
    ) -> dict[int, SyncStats]:
        """Make several buckets current, one bucket at a time (each locked only while it is worked
        on, a busy one done last), with the provider kept busy across bucket boundaries. Raises
        BucketBusy when buckets are left that other runs held for `lock_wait_seconds` while this
        run had nothing else to do; the buckets done by then stay done. `batch` asks for (True) or
        against (False) batch mode, None: as the declaration says (batch_fill.py).

        Row and chunk counts are exact per bucket; a request's tokens and seconds are shared out
        by the tokens each bucket sent in it, its count goes to the bucket of its first text, and
        `seconds` is the call's time shared out evenly, so the per-bucket figures add up to the
        call's totals. `drain_wal=False`: the caller has just called drain_wal itself."""
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
            if drain_wal:
                self.drain_wal()
            parked = self._batch_phase(wanted, full, stats, should_stop, batch, batch_wait_seconds)
            self._work_on(wanted, full, stats, should_stop, parked)
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

    def _batch_phase(
        self, buckets: list[int], full: bool, stats: dict[int, SyncStats], should_stop: Callable[[], bool],
        batch: bool | None, wait_seconds: float,
    ) -> set[int]:
        """Before any bucket is worked on: poll (and collect) the batches of the buckets to be
        swept, and in batch mode send a batch for the others; returns the buckets not to sweep
        now (their batch is pending). Sending takes those buckets' locks in ascending order and
        waits for them (two runs must not send the same bucket twice; a run holding a lock never
        waits in the bucket loop, so this cannot deadlock); polling alone needs none."""
        if not self.batch_fill.enabled:
            return set()
        to_sweep = buckets if full else self.changes.sweep_requested(buckets)
        if not to_sweep or should_stop():
            return set()
        sending = batch if batch is not None else self.spec.backfill.mode == "batch"
        if not sending:
            return set(to_sweep) - set(self.batch_fill.before_sweep(to_sweep, stats, False, wait_seconds, should_stop))
        held: list[int] = []
        try:
            for bucket in to_sweep:
                self._wait_for_lock(bucket, should_stop)
                held.append(bucket)
            return set(to_sweep) - set(self.batch_fill.before_sweep(to_sweep, stats, True, wait_seconds, should_stop))
        finally:
            with suppress(psycopg.Error):
                for bucket in held:
                    unlock_bucket(self.conn, self.lock_name, bucket)

    def _wait_for_lock(self, bucket: int, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.05
        while not try_bucket_lock(self.conn, self.lock_name, bucket):
            if time.monotonic() > deadline or should_stop():
                raise BucketBusy(f"table {self.spec.name}: bucket {bucket} is held by another run")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _work_on(
        self, buckets: list[int], full: bool, stats: dict[int, SyncStats], should_stop: Callable[[], bool],
        parked: set[int],
    ) -> None:
        """Pass over the buckets left, taking those nobody holds, until none is left; wait (holding
        nothing) only when every bucket left is held by another run."""
        left = list(buckets)
        waiting_since: float | None = None
        delay = 0.05
        while left and not should_stop():
            before = len(left)
            held: set[int] = set()
            pages = self._bucket_pages(left, full, stats, should_stop, held, parked)
            try:
                self.pipeline.run(pages, stats)
            finally:
                pages.close()
                # The run failed before a bucket's last page: its lock goes now (with a lost
                # connection it is gone already, and the error that matters is the one raised).
                with suppress(psycopg.Error):
                    for bucket in held:
                        unlock_bucket(self.conn, self.lock_name, bucket)
            if len(left) < before:
                waiting_since, delay = None, 0.05
                continue
            now = time.monotonic()
            waiting_since = now if waiting_since is None else waiting_since
            if now - waiting_since >= self.lock_wait_seconds:
                raise BucketBusy(f"table {self.spec.name}: buckets {left} are held by another run")
            time.sleep(min(delay, max(0.0, waiting_since + self.lock_wait_seconds - now)))
            delay = min(delay * 2, 1.0)

    def _bucket_pages(
        self, left: list[int], full: bool, stats: dict[int, SyncStats], should_stop: Callable[[], bool],
        held: set[int], parked: set[int],
    ) -> Iterator[Page]:
        """The pages of every bucket of `left` that nobody else holds, bucket after bucket, each
        bucket taken off `left` as its lock is taken (and put in `held` until its last page is
        written). Ends when every bucket left is held by another run."""
        taken_any = True
        while taken_any and left:
            taken_any = False
            # Ascending, then again over those skipped: by the end of the pass the other run may be done.
            for bucket in list(left):
                if should_stop():
                    return
                if not try_bucket_lock(self.conn, self.lock_name, bucket):
                    continue
                left.remove(bucket)
                held.add(bucket)
                taken_any = True
                yield from self._one_bucket(bucket, full and bucket not in parked, stats, should_stop,
                                            bucket in parked)
                yield Page([], after_write=lambda b=bucket: self._release(b, held))

    def _release(self, bucket: int, held: set[int]) -> None:
        held.discard(bucket)
        unlock_bucket(self.conn, self.lock_name, bucket)

    def _one_bucket(
        self, bucket: int, full: bool, stats: dict[int, SyncStats], should_stop: Callable[[], bool],
        parked: bool = False,
    ) -> Iterator[Page]:
        """The pages of one bucket, its lock held: its changes, then, in a full run or when the
        log asks for it, the sweep of its rows and the changes logged meanwhile."""
        markers: dict[int, list[int]] = {}
        drained = 0
        for page in self._change_pages(bucket, should_stop, markers):
            drained += 1
            yield page
        if not (full or markers) or parked or should_stop():
            return  # a parked bucket's sweep request stays in the log for its batch
        if drained:
            # The sweep reads those rows again: read before the drain's pages are written, they
            # would be embedded-or-borrowed and written a second time.
            yield Page([], flush=True)
        yield from (Page(rows) for rows in self.sweep.pages([bucket], should_stop))
        if self.sweep.finished:
            # Once every swept page is written: delete what the source no longer has.
            answered = markers.get(bucket, [])
            yield Page([], after_write=lambda: self._finish_sweep(bucket, stats, answered))
        # Changes that arrived while the sweep read: picked up now, while the lock is held, and
        # written after the swept pages. A sweep asked for meanwhile (a TRUNCATE) stays in the
        # log for the next run.
        yield from self._change_pages(bucket, should_stop, {})

    def _finish_sweep(self, bucket: int, stats: dict[int, SyncStats], answered: list[int]) -> None:
        self.sweep.finish([bucket], stats, answered)
        self.batch_fill.after_sweep([bucket])

    def _change_pages(
        self, bucket: int, should_stop: Callable[[], bool], markers: dict[int, list[int]]
    ) -> Iterator[Page]:
        """The change-log entries of `bucket` logged before the drain began, a page at a time;
        the sweep requests found go to `markers` (bucket -> entry ids)."""

        def load(claimed: ClaimedPage) -> Page:
            rows = self.source.by_keys(list(claimed.bucket_of)) if claimed.bucket_of else []
            for row in rows:
                row.bucket = claimed.bucket_of[row.key_json]
            found = {r.key_json for r in rows}
            absent = [(k, b) for k, b in claimed.bucket_of.items() if k not in found]
            return Page(rows, absent, claimed.entry_ids)

        return self.changes.pages([bucket], self.spec.page_size, should_stop, markers, load)
