"""What runs spend and how fresh they keep a table: prices, cost, the daily budget, the
commit-to-embedding lag, and the run ledger in the control schema (vectorsync.runs and
vectorsync.run_buckets). Free of Dagster: the asset, `vectorsync sync` and the demo share it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import ResolvedTable
from .sync_stats import SyncStats
from .providers.base import DelegatingProvider, EmbeddingProvider, Embeddings, ProviderError
from .spec import TableSpec
from .spec_sections import ProviderSpec
from .status import estimated_rows

# US dollars per million input tokens, OpenAI's list prices for its embedding models. A
# declaration's provider.price_per_million_tokens overrides them (a discount, the batch API's
# half price, another vendor); any other model costs 0 unless declared (a local model, or a
# server of your own).
LIST_PRICES: dict[tuple[str, str], float] = {
    ("openai", "text-embedding-3-small"): 0.02,
    ("openai", "text-embedding-3-large"): 0.13,
    ("openai", "text-embedding-ada-002"): 0.10,
}


def price_per_million(provider: ProviderSpec) -> float:
    if provider.price_per_million_tokens is not None:
        return provider.price_per_million_tokens
    # A proxy (LiteLLM) names OpenAI's models with a prefix: openai/text-embedding-3-small.
    return LIST_PRICES.get((provider.kind, provider.model.removeprefix("openai/")), 0.0)


# The provider's batch API (assets/batch_fill.py) bills the same tokens at half the price:
# OpenAI's rule for /v1/batches, applied to the declared price too.
BATCH_DISCOUNT = 0.5


def batch_price_per_million(provider: ProviderSpec) -> float:
    return price_per_million(provider) * BATCH_DISCOUNT


def cost_usd(tokens: int, price_per_million_tokens: float) -> float:
    return tokens * price_per_million_tokens / 1_000_000


@dataclass(frozen=True)
class Lag:
    """Commit-to-embedding lag of the changes cleared, in seconds, weighted by keys."""

    p50: float
    p95: float
    max: float
    changes: int  # keys (a sweep request counts as one)


def lag_of(lags: Iterable[tuple[float, int]]) -> Lag | None:
    """Percentiles of (lag, keys) pairs, each lag counted once per key; None if there are none."""
    ordered = sorted((lag, n) for lag, n in lags if n > 0)
    total = sum(n for _, n in ordered)
    if not total:
        return None

    def at(fraction: float) -> float:
        rank = fraction * total
        seen = 0
        for lag, n in ordered:
            seen += n
            if seen >= rank:
                return lag
        return ordered[-1][0]

    return Lag(at(0.5), at(0.95), ordered[-1][0], total)


class BudgetExceeded(ProviderError):
    """A request that would take the table's spend of the day past its budget: the run stops,
    nothing of what is not yet written is cleared."""

    def __init__(self, table: str, spent: float, request: float, budget: float) -> None:
        super().__init__(
            "budget",
            f"table {table}: daily budget of ${budget:.2f} reached: ${spent:.4f} spent today (UTC), and the "
            f"next request would cost ${request:.4f} more; the remaining changes stay in the change log "
            "until tomorrow or a higher budget.daily_usd",
        )
        self.table, self.spent, self.budget = table, spent, budget

    @property
    def fails_run(self) -> bool:
        return True


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


# Above this many source rows (by the planner's estimate) the rows a sweep will read are estimated.
EXACT_COUNT_UP_TO = 1_000_000


def rows_to_visit(conn: psycopg.Connection, table: ResolvedTable, buckets: list[int], full: bool) -> int:
    """About how many source rows a run over `buckets` will read, for its progress bar: the keys
    pending in their change log, and every row of the buckets it sweeps (all of them when `full`,
    else those with a sweep request pending, as after an install or a TRUNCATE)."""
    table = table.with_parameters()  # the statements below take parameters: a % in a name is doubled
    pending, marked = conn.execute(
        sql.SQL(
            "SELECT coalesce(sum(cardinality(row_keys)), 0)::bigint, "
            "coalesce(array_agg(DISTINCT bucket) FILTER (WHERE row_keys IS NULL), '{{}}') "
            "FROM {} WHERE bucket = ANY(%s)"
        ).format(table.queue),
        (buckets,),
    ).fetchone()
    swept = buckets if full else marked
    if not swept:
        return pending
    estimate = estimated_rows(conn, table.source)
    if estimate is not None and estimate > EXACT_COUNT_UP_TO:
        return pending + round(estimate * len(swept) / table.spec.buckets)
    in_buckets = conn.execute(
        sql.SQL("SELECT count(*) FROM {} s WHERE {} = ANY(%s)").format(table.source, table.bucket_expr("s")),
        (swept,),
    ).fetchone()[0]
    return pending + in_buckets


def budget_reached(conn: psycopg.Connection, spec: TableSpec) -> str | None:
    """Why no run of the table should start now, if a run stopped at the budget today (UTC) under
    a budget at least as high as the declared one; None otherwise (a raised budget, or a new day,
    lets runs start again)."""
    if spec.budget is None or conn.execute("SELECT to_regclass('vectorsync.runs')").fetchone()[0] is None:
        return None
    found = conn.execute(
        """SELECT (SELECT sum(cost_usd) FROM vectorsync.runs
                   WHERE table_name = %(name)s AND updated_at >= date_trunc('day', now(), 'UTC'))
           FROM vectorsync.runs
           WHERE table_name = %(name)s AND status = 'over_budget' AND budget_usd >= %(budget)s
             AND finished_at >= date_trunc('day', now(), 'UTC')
           LIMIT 1""",
        {"name": spec.name, "budget": spec.budget.daily_usd},
    ).fetchone()
    if found is None:
        return None
    return (f"table {spec.name}: daily budget of ${spec.budget.daily_usd:.2f} reached (${found[0]:.4f} spent "
            "today, UTC): changes wait in the change log until tomorrow or a higher budget.daily_usd")


def spent_today(conn: psycopg.Connection, table_name: str, with_batches_in_flight: bool = False) -> float:
    """The table's spend today (UTC): its runs, and the batches collected today. With
    `with_batches_in_flight`, also what the batches sent and not yet collected will cost at the
    batch price (their tokens were counted when they were sent): money already committed."""
    in_flight = sql.SQL("")
    if with_batches_in_flight and conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0]:
        in_flight = sql.SQL(
            """ + (SELECT coalesce(sum(i.tokens * j.price_per_million_tokens / 1e6), 0)
                   FROM vectorsync.batch_jobs j JOIN vectorsync.batch_items i ON i.job_id = j.id
                   WHERE j.table_name = %(name)s AND j.state IN ('preparing', 'uploaded', 'submitted'))""")
    return conn.execute(
        sql.SQL("""SELECT (SELECT coalesce(sum(cost_usd), 0) FROM vectorsync.runs
                   WHERE table_name = %(name)s AND updated_at >= date_trunc('day', now(), 'UTC'))""")
        + _batch_spend_since(conn, sql.SQL("date_trunc('day', now(), 'UTC')")) + in_flight,
        {"name": table_name},
    ).fetchone()[0]


def _batch_spend_since(conn: psycopg.Connection, since: sql.Composable) -> sql.Composable:
    """`+ what the table's batches were billed since `since`` (nothing before the batch
    migration). A batch's tokens are billed when it is collected, and recorded on its job in the
    transaction that stores its vectors, so a run killed right after still leaves them counted."""
    if conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is None:
        return sql.SQL("")
    return sql.SQL(" + (SELECT coalesce(sum(cost_usd), 0) FROM vectorsync.batch_jobs "
                   "WHERE table_name = %(name)s AND collected_at >= {})").format(since)


@dataclass(frozen=True)
class Spend:
    tokens_day: int
    cost_day: float
    tokens_month: int
    cost_month: float
    # What batch mode saved over the last 30 days: its tokens at the synchronous price, less
    # what they cost.
    saved_month: float = 0.0


def spend_by_table(conn: psycopg.Connection) -> dict[str, Spend]:
    """Tokens and cost per table over the last 24 hours and the last 30 days: ordinary requests
    (the run ledger) and collected batches (vectorsync.batch_jobs) alike."""
    if conn.execute("SELECT to_regclass('vectorsync.runs')").fetchone()[0] is None:
        return {}
    batches = conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is not None
    found = conn.execute(
        sql.SQL(
            """SELECT table_name,
                      coalesce(sum(tokens) FILTER (WHERE at >= now() - interval '1 day'), 0)::bigint,
                      coalesce(sum(cost_usd) FILTER (WHERE at >= now() - interval '1 day'), 0),
                      coalesce(sum(tokens), 0)::bigint, coalesce(sum(cost_usd), 0), coalesce(sum(saved), 0)
               FROM (SELECT table_name, updated_at AS at, tokens, cost_usd, 0 AS saved FROM vectorsync.runs
                     {}) AS spent
               WHERE at >= now() - interval '30 days' GROUP BY table_name"""
        ).format(sql.SQL(
            """UNION ALL SELECT table_name, collected_at, tokens, cost_usd,
                   tokens * list_price_per_million_tokens / 1e6 - cost_usd
               FROM vectorsync.batch_jobs WHERE collected_at IS NOT NULL""" if batches else ""))
    ).fetchall()
    return {name: Spend(*figures) for name, *figures in found}
