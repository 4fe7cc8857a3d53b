"""A run's own rows in the control schema's run ledger (vectorsync.runs and vectorsync.run_buckets),
kept current while it runs, and the metered provider that counts each request's tokens and cost
for it and holds the run to the table's daily budget. Free of Dagster: the asset, continuous mode
and `vectorsync sync` share it; assets/usage.py has the prices and the spend read back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import psycopg

from .providers.base import DelegatingProvider, EmbeddingProvider, Embeddings
from .spec import TableSpec
from .sync_stats import SyncStats
from .usage import BudgetExceeded, Lag, cost_usd, lag_of, price_per_million, spent_today


class MeteredProvider(DelegatingProvider):
    """A provider that counts what every request costs as it returns (from any of the engine's
    threads), and refuses, before it is sent, a request that would take the day's spend past the
    budget. `spent_elsewhere` is the day's spend of other runs (and earlier attempts of this one),
    refreshed by the run's ledger."""

    def __init__(
        self, inner: EmbeddingProvider, price_per_million_tokens: float, table: str,
        budget_usd: float | None = None, on_request: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(inner)
        self.price = price_per_million_tokens
        self.table = table
        self.budget_usd = budget_usd
        self.on_request = on_request
        self.spent_elsewhere = 0.0
        self.tokens = 0
        self.chunks = 0
        self.requests = 0
        self.exhausted = False
        self._reserved = 0.0
        self._lock = threading.Lock()

    @property
    def cost_usd(self) -> float:
        return cost_usd(self.tokens, self.price)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        estimate = 0.0
        if self.budget_usd is not None and self.price > 0:
            # count_tokens never counts under the provider, so the check errs on the safe side.
            estimate = cost_usd(sum(self.inner.count_tokens(texts)), self.price)
            with self._lock:
                spent = self.spent_elsewhere + self.cost_usd + self._reserved
                if self.exhausted or spent + estimate > self.budget_usd:
                    self.exhausted = True
                    raise BudgetExceeded(self.table, spent, estimate, self.budget_usd)
                self._reserved += estimate
        try:
            result = self.inner.embed(texts)
        finally:
            with self._lock:
                self._reserved -= estimate
        with self._lock:
            self.tokens += result.tokens
            self.chunks += len(texts)
            self.requests += 1
        if self.on_request is not None:
            try:
                self.on_request()
            except Exception:  # noqa: BLE001 - progress must not cost the paid-for vectors;
                pass  # the next page's flush, on the run's own thread, reports a lasting fault
        return result


_BUCKET_FIGURES = ("rows_seen", "rows_written", "rows_deleted", "rows_skipped", "rows_failed",
                   "chunks_embedded", "chunks_reused", "tokens", "changes_cleared")


class RunLedger:
    """One run's rows in vectorsync.runs and vectorsync.run_buckets, kept current while it runs:
    every page written (by bucket) and every request returned (tokens and cost), at most once per
    `every_seconds`, on a connection of its own. Figures are added, never overwritten, so a step
    Dagster retries in the same run, or continuous mode's micro-batches, add up."""

    def __init__(
        self, conn: psycopg.Connection, run_id: str, spec: TableSpec, trigger: str, buckets: list[int],
        rows_expected: int | None = None, every_seconds: float = 1.0,
    ) -> None:
        self.conn, self.run_id, self.spec = conn, run_id, spec
        self.price = price_per_million(spec.provider)
        self.every_seconds = every_seconds
        # Figures of finished engine calls (complete: with a sweep's deletions and timings), and of
        # the pages written since the last one finished (live progress, and what a failed call did).
        self._settled: dict[int, SyncStats] = {}
        self._live: dict[int, SyncStats] = {}
        self.meter: MeteredProvider | None = None
        self._flushed_buckets: dict[int, SyncStats] = {}
        self._flushed_run = (0, 0, 0, 0, 0, 0)
        self._last = 0.0
        self._lock = threading.Lock()
        # A database not yet upgraded by `vectorsync install` has no run ledger: the run still
        # works and reports to Dagster, it just records (and budgets) nothing here.
        self.enabled = conn.execute("SELECT to_regclass('vectorsync.runs')").fetchone()[0] is not None
        if not self.enabled:
            return
        with conn.transaction():
            conn.execute(
                """INSERT INTO vectorsync.runs AS r (run_id, table_name, trigger, buckets, model,
                       price_per_million_tokens, budget_usd, rows_expected)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (run_id, table_name) DO UPDATE SET status = 'running', reason = NULL,
                       budget_usd = excluded.budget_usd, rows_expected = excluded.rows_expected,
                       updated_at = now(), finished_at = NULL""",
                (run_id, spec.name, trigger, buckets, spec.fingerprint, self.price,
                 spec.budget.daily_usd if spec.budget else None, rows_expected),
            )

    def metered(self, provider: EmbeddingProvider) -> MeteredProvider:
        """The provider, counting every request and held to the table's budget."""
        budget = self.spec.budget.daily_usd if self.spec.budget else None
        self.meter = MeteredProvider(provider, self.price, self.spec.name, budget, on_request=self.flush)
        if budget is not None:
            self.meter.spent_elsewhere = self._spent_elsewhere()
        return self.meter

    def add(self, page: dict[int, SyncStats]) -> None:
        """A page written (EmbeddingEngine.on_page): its figures per bucket."""
        with self._lock:
            for bucket, stats in page.items():
                self._live.setdefault(bucket, SyncStats()).merge(stats)
        self.flush()

    def settle(self, worked: dict[int, SyncStats]) -> None:
        """An engine call returned: its figures replace those of the pages it wrote."""
        with self._lock:
            for bucket, stats in worked.items():
                self._settled.setdefault(bucket, SyncStats()).merge(stats)
            self._live = {}
        self.flush()

    def by_bucket(self) -> dict[int, SyncStats]:
        with self._lock:
            return self._current()

    def totals(self) -> SyncStats:
        total = SyncStats()
        for stats in self.by_bucket().values():
            total.merge(stats)
        return total

    def _current(self) -> dict[int, SyncStats]:
        current: dict[int, SyncStats] = {}
        for part in (self._settled, self._live):
            for bucket, stats in part.items():
                current.setdefault(bucket, SyncStats()).merge(stats)
        return current

    def flush(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._last < self.every_seconds:
                return
            self._last = time.monotonic()
            self._write()

    def finish(self, status: str, reason: str | None = None) -> Lag | None:
        """Write what is left, the run's outcome and its lag percentiles; returns the lag."""
        with self._lock:
            lag = lag_of(lag for s in self._current().values() for lag in s.change_lags)
            if not self.enabled:
                return lag
            self._write()
            self.conn.execute(
                """UPDATE vectorsync.runs SET status = %s, reason = %s, finished_at = now(), updated_at = now(),
                       lag_p50_seconds = %s, lag_p95_seconds = %s, lag_max_seconds = %s
                   WHERE run_id = %s AND table_name = %s""",
                (status, reason, lag and lag.p50, lag and lag.p95, lag and lag.max, self.run_id, self.spec.name),
            )
        return lag

    def _spent_elsewhere(self) -> float:
        """Today's (UTC) spend of the table: other runs, and earlier attempts of this run."""
        return spent_today(self.conn, self.spec.name) if self.enabled else 0.0

    def _write(self) -> None:
        if not self.enabled:
            return
        rows = []
        current = self._current()
        for bucket, stats in current.items():
            before = self._flushed_buckets.setdefault(bucket, SyncStats())
            delta = {f: getattr(stats, f) - getattr(before, f) for f in _BUCKET_FIGURES}
            lag = max((lag for lag, _ in stats.change_lags), default=None)
            if any(delta.values()):
                rows.append({**delta, "bucket": bucket, "lag": lag,
                             "cost": cost_usd(delta["tokens"], self.price)})
                for f in _BUCKET_FIGURES:
                    setattr(before, f, getattr(stats, f))
        meter = self.meter
        now_run = (
            sum(s.rows_seen for s in current.values()),
            sum(s.rows_written for s in current.values()),
            meter.chunks if meter else sum(s.chunks_embedded for s in current.values()),
            meter.tokens if meter else sum(s.tokens for s in current.values()),
            sum(s.changes_cleared for s in current.values()),
            0,
        )
        run_delta = [a - b for a, b in zip(now_run, self._flushed_run)]
        budgeted = meter is not None and meter.budget_usd is not None
        with self.conn.transaction():
            if rows:
                self.conn.cursor().executemany(
                    """INSERT INTO vectorsync.run_buckets AS b (run_id, table_name, bucket, rows_seen,
                           rows_written, rows_deleted, rows_skipped, rows_failed, chunks_embedded, chunks_reused,
                           tokens, cost_usd, changes_cleared, lag_max_seconds)
                       VALUES (%(run)s, %(table)s, %(bucket)s, %(rows_seen)s, %(rows_written)s, %(rows_deleted)s,
                           %(rows_skipped)s, %(rows_failed)s, %(chunks_embedded)s, %(chunks_reused)s, %(tokens)s,
                           %(cost)s, %(changes_cleared)s, %(lag)s)
                       ON CONFLICT (run_id, table_name, bucket) DO UPDATE SET
                           rows_seen = b.rows_seen + excluded.rows_seen,
                           rows_written = b.rows_written + excluded.rows_written,
                           rows_deleted = b.rows_deleted + excluded.rows_deleted,
                           rows_skipped = b.rows_skipped + excluded.rows_skipped,
                           rows_failed = b.rows_failed + excluded.rows_failed,
                           chunks_embedded = b.chunks_embedded + excluded.chunks_embedded,
                           chunks_reused = b.chunks_reused + excluded.chunks_reused,
                           tokens = b.tokens + excluded.tokens,
                           cost_usd = b.cost_usd + excluded.cost_usd,
                           changes_cleared = b.changes_cleared + excluded.changes_cleared,
                           lag_max_seconds = greatest(b.lag_max_seconds, excluded.lag_max_seconds),
                           updated_at = now()""",
                    [{**r, "run": self.run_id, "table": self.spec.name} for r in rows],
                )
            if any(run_delta):
                seen, written, chunks, tokens, cleared, _ = run_delta
                self.conn.execute(
                    """UPDATE vectorsync.runs SET rows_seen = rows_seen + %s, rows_written = rows_written + %s,
                           chunks_embedded = chunks_embedded + %s, tokens = tokens + %s,
                           cost_usd = cost_usd + %s, changes_cleared = changes_cleared + %s, updated_at = now()
                       WHERE run_id = %s AND table_name = %s""",
                    (seen, written, chunks, tokens, cost_usd(tokens, self.price), cleared, self.run_id,
                     self.spec.name),
                )
            self._flushed_run = now_run
            # The day's spend of every other run (and of earlier attempts of this one): today's
            # total, this attempt's own figures just written, less this attempt's.
            today = self._spent_elsewhere() if budgeted else None
        if today is not None and meter is not None:
            with meter._lock:
                meter.spent_elsewhere = max(0.0, today - cost_usd(now_run[3], self.price))
