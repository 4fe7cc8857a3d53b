"""The metadata a materialization of an embeddings asset carries, and the figures of its run: each
partition's own work (rows, chunks, tokens, cost, lag), its stored chunks and rows, the change
log's backlog, and the store's table name, columns and column lineage. Shared by a partition run,
a backfill and continuous mode, so the UI's plots read the same keys whichever made a partition.
"""

import time
from collections.abc import Callable

import dagster as dg
import psycopg
from psycopg import sql

from assets.catalog import ResolvedTable
from assets.engine import SyncStats
from assets.spec import TableSpec
from assets.status import estimated_rows
from assets.usage import BATCH_DISCOUNT, Lag, cost_usd, lag_of

from .names import bucket_partition_key, source_asset_key

# Above this many chunks per bucket (by the planner's estimate) a materialization leaves out
# the partition's exact row count: counting it would cost a change run that wrote one row
# seconds of scanning.
EXACT_COUNT_UP_TO = 1_000_000
CONTINUOUS_EXACT_COUNT_UP_TO = 50_000
# How often a run that follows changes (continuous mode's, or a change run lingering for more)
# writes what it did to Dagster's event log, at most: a materialization per partition touched, or
# a log line. Each is an event-log write, on a new PostgreSQL connection under dagster-postgres's
# storage. Once per micro-batch or per second, 20 inserts/s over 16 buckets meant 12-24 writes a
# second: over two minutes (`python -m bench f`) 1,350-2,900 sessions, on which PostgreSQL spent
# 11-15 s of CPU. The store is written as each change commits either way; only the UI's record
# lags, by at most this long (the first batch after a quiet spell is recorded at once).
REPORT_EVERY_SECONDS = 10.0


class BatchThrottle:
    """Micro-batches' figures per bucket, handed to `emit` together at most every `every_seconds`:
    what a run that follows changes records (see REPORT_EVERY_SECONDS). `flush()` emits when the
    interval has passed (call it on quiet moments too, so the last batch is not held back);
    `flush(force=True)` emits what is left. The interval counts from the start, or with
    `first_at_once` the first batch is emitted as it comes."""

    def __init__(
        self, emit: Callable[[dict[int, SyncStats]], None], every_seconds: float = REPORT_EVERY_SECONDS,
        first_at_once: bool = False,
    ) -> None:
        self.emit, self.every_seconds = emit, every_seconds
        self.pending: dict[int, SyncStats] = {}
        self.last = float("-inf") if first_at_once else time.monotonic()

    def add(self, worked: dict[int, SyncStats]) -> None:
        for bucket, stats in worked.items():
            self.pending.setdefault(bucket, SyncStats()).merge(stats)
        self.flush()

    def flush(self, force: bool = False) -> None:
        if self.pending and (force or time.monotonic() - self.last >= self.every_seconds):
            batch, self.pending = self.pending, {}
            self.last = time.monotonic()
            self.emit(batch)


def _figure(value: float, digits: int = 2) -> float:
    """Rounded for display: 403.21, not 403.20586029699984 (cost keeps six decimals)."""
    return round(float(value), digits)


def batch_figures(batch_tokens: int, price_per_million_tokens: float, prefix: str = "") -> dict:
    """What batch mode's tokens cost at the batch price, and what they saved against the ordinary one."""
    batch_cost = cost_usd(batch_tokens, price_per_million_tokens * BATCH_DISCOUNT)
    return {f"{prefix}batch_cost_usd": round(batch_cost, 6),
            f"{prefix}batch_saved_usd": round(cost_usd(batch_tokens, price_per_million_tokens) - batch_cost, 6)}


def work_metadata(stats: SyncStats, price_per_million_tokens: float) -> dict:
    """What a materialization of one partition says about the work that made it: the figures of
    that bucket alone, the same keys whether a partition run, a backfill or continuous mode made
    it, so Dagster's plots show each partition's own distribution. cost_usd counts ordinary
    requests and collected batches alike (these at the batch price)."""
    figures = {k: v for k, v in stats.as_dict().items() if not isinstance(v, float)}
    lag = lag_of(stats.change_lags)
    batch = batch_figures(stats.batch_tokens, price_per_million_tokens)
    return {
        **figures,
        "provider_seconds": _figure(stats.provider_seconds),
        "seconds": _figure(stats.seconds),
        "cost_usd": round(cost_usd(stats.tokens, price_per_million_tokens) + batch["batch_cost_usd"], 6),
        **batch,
        "rows_per_second": _figure(stats.rows_written / stats.seconds, 1) if stats.seconds else 0.0,
        **({} if lag is None else {
            "lag_p50_seconds": _figure(lag.p50), "lag_p95_seconds": _figure(lag.p95),
            "lag_max_seconds": _figure(lag.max),
        }),
    }


def backlog_metadata(pending: int | None, oldest: float | None) -> dict:
    """The table's change log after the run (left out when it could not be read)."""
    if pending is None:
        return {}
    return {"pending_changes": pending, "oldest_change_seconds": _figure(oldest or 0.0, 1)}


def run_totals(total: SyncStats, tokens_sent: int, price: float, lag: Lag | None, buckets: int) -> dict:
    """A run's figures over all its buckets: in its tags, its log and an observation of the
    asset, never repeated on each partition's materialization. `tokens_sent` counts every
    request the provider answered, also those of pages a failed run did not get to write. Batch
    tokens are those of the batches the run collected, at the batch price."""
    batch = batch_figures(total.batch_tokens, price, prefix="run_")
    return {
        "run_buckets": buckets,
        "run_rows_seen": total.rows_seen,
        "run_rows_written": total.rows_written,
        "run_rows_deleted": total.rows_deleted,
        "run_rows_failed": total.rows_failed,
        "run_chunks_embedded": total.chunks_embedded,
        "run_chunks_reused": total.chunks_reused,
        "run_tokens": tokens_sent,
        "run_batch_tokens": total.batch_tokens,
        "run_batches_submitted": total.batches_submitted,
        "run_cost_usd": round(cost_usd(tokens_sent, price) + batch["run_batch_cost_usd"], 6),
        **batch,
        "run_seconds": _figure(total.seconds),
        "run_changes_cleared": total.changes_cleared,
        **({} if lag is None else {
            "run_lag_p50_seconds": _figure(lag.p50), "run_lag_p95_seconds": _figure(lag.p95),
            "run_lag_max_seconds": _figure(lag.max),
        }),
    }


def partition_metadata(
    conn: psycopg.Connection, table: ResolvedTable, per_bucket: dict[int, SyncStats], buckets: list[int],
    price: float, exact_count_up_to: int = EXACT_COUNT_UP_TO,
) -> dict[str, dict]:
    """Each partition's own figures: its bucket's work, its stored chunks (`chunks`) and its
    source rows embedded (`dagster/row_count`)."""
    result = {bucket_partition_key(b): work_metadata(per_bucket.get(b, SyncStats()), price) for b in buckets}
    estimate = estimated_rows(conn, table.store)
    if estimate is not None and estimate / table.spec.buckets > exact_count_up_to:
        return result
    # Chunks per bucket from the bucket index alone (an index-only scan, milliseconds). Rows are
    # the chunks numbered 0, which the index does not hold: counted from the table for a small
    # bucket, and above ROWS_COUNTED_UP_TO chunks (about 0.2 s of reading per 30,000 chunks)
    # taken as its chunks times the share of chunk 0 among all chunks, from the planner's statistics.
    # Statements with parameters: a % in the store's name must be doubled (ResolvedTable.with_parameters).
    store = table.with_parameters().store
    chunks = dict(conn.execute(
        sql.SQL("SELECT bucket, count(*) FROM {} WHERE bucket = ANY(%s) GROUP BY bucket").format(store),
        (buckets,),
    ).fetchall())
    small = [b for b in buckets if chunks.get(b, 0) <= ROWS_COUNTED_UP_TO]
    rows = dict(conn.execute(
        sql.SQL("SELECT bucket, count(*) FROM {} WHERE bucket = ANY(%s) AND chunk_seq = 0 GROUP BY bucket").format(
            store),
        (small,),
    ).fetchall()) if small else {}
    share = _first_chunk_share(conn, table) if len(small) < len(buckets) else 1.0
    for bucket in buckets:
        figures = result[bucket_partition_key(bucket)]
        figures["chunks"] = chunks.get(bucket, 0)
        figures["dagster/row_count"] = (
            rows.get(bucket, 0) if bucket in small else round(chunks.get(bucket, 0) * share)
        )
    return result


# Above this many chunks in a bucket its row count is estimated (see partition_metadata).
ROWS_COUNTED_UP_TO = 20_000


def _first_chunk_share(conn: psycopg.Connection, table: ResolvedTable) -> float:
    """The share of the store's chunks that are a row's first (chunk_seq 0): rows per chunk."""
    found = conn.execute(
        """SELECT most_common_vals::text::int[], most_common_freqs FROM pg_stats
           WHERE schemaname = %s AND tablename = %s AND attname = 'chunk_seq'""",
        (table.spec.store_schema, table.spec.store_name),
    ).fetchone()
    if not found or not found[0]:
        return 1.0
    return next((freq for value, freq in zip(*found) if value == 0), 1.0)


def store_metadata(spec: TableSpec, table: ResolvedTable) -> dict:
    """What a materialization says about the store: its name, columns and their lineage."""
    columns = dg.TableSchema(
        columns=[dg.TableColumn(c.name, c.type_sql) for c in table.key]
        + [
            dg.TableColumn("chunk_seq", "int"),
            dg.TableColumn("chunk", "text"),
            dg.TableColumn("text_hash", "bytea"),
            dg.TableColumn("model", "text"),
            dg.TableColumn("embedding", f"{spec.vector_type}({spec.provider.dimensions})"),
        ]
    )
    source = source_asset_key(spec)
    lineage = dg.TableColumnLineage(
        deps_by_column={
            "chunk": [dg.TableColumnDep(source, c.name) for c in table.text_columns],
            "embedding": [dg.TableColumnDep(source, c.name) for c in table.text_columns],
            **{c.name: [dg.TableColumnDep(source, c.name)] for c in table.key},
        }
    )
    return {
        "dagster/table_name": f"{spec.store_schema}.{spec.store_name}",
        "dagster/column_schema": columns,
        "dagster/column_lineage": lineage,
    }
