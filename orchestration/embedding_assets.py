"""The Dagster side of one declared table: its source asset, its embeddings asset and its checks."""


import os
import queue
import random
import time
from collections.abc import Callable

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field

from assets import versions
from assets.catalog import ResolvedTable, resolve
from assets.continuous import ChangeListener, follow_changes
from assets.engine import BucketBusy, EmbeddingEngine, SyncStats, retry_policy
from assets.providers import provider_for
from assets.run_ledger import RunLedger
from assets.spec import TableSpec
from assets.status import change_backlog, estimated_rows
from assets.usage import (
    BATCH_DISCOUNT, BudgetExceeded, Lag, cost_usd, lag_of, rows_to_visit,
)

from .names import dagster_name_part
from .resources import VectorsyncDatabase
from .versions_dagster import auto_promote, sync_other_versions, version_metadata

GROUP = "embeddings"
# A run (or a backfill, whose runs inherit its tags) with this tag set to "batch" sweeps through the
# provider's batch API.
BATCH_MODE_TAG = "vectorsync/mode"
# A run's step is tried again this many times after a transient failure, about this long apart.
STEP_RETRIES = 2
STEP_RETRY_SECONDS = 10.0
SOURCE_GROUP = "sources"


def bucket_partition_key(bucket: int) -> str:
    return f"{bucket:03d}"


def partitions_for(spec: TableSpec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([bucket_partition_key(b) for b in range(spec.buckets)])


def source_asset_key(spec: TableSpec) -> dg.AssetKey:
    """The source table's key: any PostgreSQL identifier, spelled as valid Dagster names."""
    parts = [dagster_name_part(spec.source.schema_), dagster_name_part(spec.source.table)]
    return dg.AssetKey([*spec.asset.source_key_prefix, *parts])


def embeddings_asset_key(spec: TableSpec) -> dg.AssetKey:
    return dg.AssetKey([*spec.asset.key_prefix, spec.name])


class EmbeddingRunConfig(dg.Config):
    full_sweep: bool = Field(
        default=True,
        description="Compare every row of the bucket with the store (backfills, reconcile, manual "
        "runs). The change sensor turns this off: its runs only drain the change log.",
    )
    retry_due_failures: bool = Field(
        default=False,
        description="First put rows of the failure ledger whose next attempt is due back into the "
        "change log (the retry schedule sets this).",
    )
    linger_seconds: float = Field(
        default=0.0,
        ge=0.0,
        description="After the first pass, keep draining changes that arrive in these buckets "
        "(woken by LISTEN/NOTIFY) until none has come for this long. The change sensor sets it, so "
        "under a steady stream of writes one run keeps up instead of one run per change.",
    )
    linger_max_seconds: float = Field(
        default=120.0, ge=0.0, description="Stop lingering after this long in all, so the run ends."
    )
    batch: bool = Field(
        default=False,
        description="Sweep through the provider's batch API at half price (also asked for by the run tag "
        f"{BATCH_MODE_TAG}=batch, e.g. on a backfill, or by the declaration's backfill.mode). The run "
        "sends the batch and ends; the buckets are stored by the first run after the batch completes.",
    )
    batch_wait_seconds: float = Field(
        default=0.0, ge=0.0, description="Wait this long for the buckets' pending batches, then store them.",
    )


def source_asset_spec(spec: TableSpec) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=source_asset_key(spec),
        group_name=spec.asset.source_group_name,
        kinds={"postgres"},
        description=f"The PostgreSQL table {spec.source.qualified}, owned by your application. "
        "vectorsync only reads it; triggers record which rows change.",
        metadata={"dagster/table_name": spec.source.qualified},
    )


def embeddings_asset(spec: TableSpec, origin: str) -> dg.AssetsDefinition:
    provider = spec.provider
    description = (
        spec.description
        or f"Vector embeddings of {spec.source.qualified} ({', '.join(spec.text_columns)}), made by "
        f"{provider.kind} model {provider.model} ({provider.dimensions} dimensions) and stored one row "
        f"per chunk in {spec.store_schema}.{spec.store_name}; query them through the view "
        f"{spec.store_schema}.{spec.view_name}. Partitions are {spec.buckets} hash buckets of the "
        "primary key: materializing a partition makes every row of that bucket current, and "
        "a backfill of all partitions re-embeds the table, reusing every vector whose text is unchanged."
    )

    @dg.asset(
        key=embeddings_asset_key(spec),
        deps=[source_asset_key(spec)],
        partitions_def=partitions_for(spec),
        # A UI backfill of every partition becomes runs of `backfill.buckets_per_run` buckets each.
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=spec.backfill.buckets_per_run),
        group_name=spec.asset.group_name,
        kinds={"postgres", "pgvector", provider.kind, *spec.asset.kinds},
        owners=spec.asset.owners,
        description=description,
        pool=f"vectorsync_{provider.kind}".replace("-", "_"),
        metadata={
            "dagster/table_name": f"{spec.store_schema}.{spec.store_name}",
            "declared_in": origin,
            "model": provider.model,
            "model_fingerprint": spec.fingerprint,
        },
        tags={**spec.asset.tags, "vectorsync/table": spec.name},
    )
    def _embeddings(
        context: dg.AssetExecutionContext, config: EmbeddingRunConfig, database: VectorsyncDatabase
    ) -> dg.MaterializeResult:
        try:
            return _materialize(context, config, database)
        except (psycopg.OperationalError, BucketBusy) as exc:
            # Transient: a lost connection (the database restarted) or a bucket held too long by
            # another run. A wrong declaration or a rejected key is not retried: it fails at once.
            raise dg.RetryRequested(
                max_retries=STEP_RETRIES, seconds_to_wait=STEP_RETRY_SECONDS * (0.8 + 0.4 * random.random())
            ) from exc

    def _materialize(
        context: dg.AssetExecutionContext, config: EmbeddingRunConfig, database: VectorsyncDatabase
    ) -> dg.MaterializeResult:
        buckets = [int(k) for k in context.partition_keys]
        # Which process works on the run: what an operator (or the kill test) looks for.
        context.log.info(f"{spec.name}: run worker pid {os.getpid()} on buckets {buckets[0]}..{buckets[-1]}")
        # The engine's connection, and the ledger's: pages are written on the first while requests
        # return on the provider's threads, and both are recorded as they come.
        with database.connect() as conn, database.connect() as ledger_conn:
            declared = resolve(conn, spec, origin)
            # Every live model version of these buckets: the active one here, the others after it.
            live = versions.live_tables(conn, declared)
            table = live[0].table
            trigger = context.run.tags.get("vectorsync/trigger", "manual")
            expected = rows_to_visit(conn, table, buckets, config.full_sweep)
            provider = provider_for(table.spec.provider)  # a local model loads here, before the run's clock
            ledger = RunLedger(ledger_conn, context.run.run_id, table.spec, trigger, buckets, rows_expected=expected)
            if not ledger.enabled:
                context.log.warning(f"{spec.name}: no run ledger (vectorsync.runs) in this database: run "
                                    "`vectorsync install` to apply its migrations; cost and budget are not recorded")
            metered = ledger.metered(provider)
            engine = EmbeddingEngine(conn, table, metered, retry=retry_policy(spec), reuse_from=live[0].reuse_from)
            engine.on_page = ledger.add
            outcome, reason = "failed", None
            try:
                if config.retry_due_failures:
                    requeued = engine.requeue_due_failures()
                    context.log.info(f"{spec.name}: {requeued} failed rows due for a retry put back in the change log")
                if config.full_sweep:
                    batch = config.batch or context.run.tags.get(BATCH_MODE_TAG) == "batch"
                    _sweep_buckets(context, spec, engine, buckets, ledger, lambda: metered.exhausted,
                                   batch=True if batch else None, batch_wait_seconds=config.batch_wait_seconds)
                else:
                    _follow_changes(context, spec, engine, database, buckets, config, ledger)
                outcome = "succeeded"
            except BudgetExceeded as exc:
                outcome, reason = "over_budget", str(exc)
            except BaseException as exc:
                reason = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                engine.close()
                try:
                    lag = ledger.finish(outcome, reason)
                except psycopg.Error as exc:  # the run's own error matters more than its ledger's
                    context.log.warning(f"{spec.name}: could not record the run's figures: {exc}")
                    lag = None
            per_bucket = ledger.by_bucket()
            total = ledger.totals()
            run_figures = run_totals(total, metered.tokens, ledger.price, lag, len(buckets))
            _report_run(context, spec, run_figures)
            if outcome == "over_budget":
                raise dg.Failure(description=reason, metadata=run_figures)
            for pk, figures in partition_metadata(conn, table, per_bucket, buckets, ledger.price).items():
                context.add_asset_metadata(figures, partition_key=pk)
            sync_other_versions(context, conn, ledger_conn, live[1:], buckets, config.full_sweep,
                                config.retry_due_failures, trigger)
            if auto_promote(context, conn, declared) is not None:
                live = versions.live_tables(conn, declared)
                table = live[0].table
            metadata = {
                **backlog_metadata(*change_backlog(conn, table.queue)),
                "buckets": len(buckets),
                **store_metadata(table.spec, table),
                **version_metadata(conn, live),
            }
        return dg.MaterializeResult(metadata=metadata)

    return _embeddings


# Above this many chunks per bucket (by the planner's estimate) a materialization leaves out
# the partition's exact row count: counting it would cost a change run that wrote one row
# seconds of scanning.
EXACT_COUNT_UP_TO = 1_000_000
CONTINUOUS_EXACT_COUNT_UP_TO = 50_000


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


def _report_run(context: dg.AssetExecutionContext, spec: TableSpec, figures: dict) -> None:
    """Run-level figures where Dagster shows a run's: its tags (the Runs list and the run's
    page), its log, and an observation of the asset (its Events and Plots, over time)."""
    context.instance.add_run_tags(
        context.run.run_id, {f"vectorsync/{k.removeprefix('run_')}": str(v) for k, v in figures.items()}
    )
    context.log.info(f"{spec.name}: run totals " + ", ".join(f"{k.removeprefix('run_')}={v}" for k, v in figures.items()))
    context.log_event(
        dg.AssetObservation(
            asset_key=embeddings_asset_key(spec), description="the run's totals over all its buckets",
            metadata=figures,
        )
    )


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


def _sweep_buckets(
    context: dg.AssetExecutionContext, spec: TableSpec, engine: EmbeddingEngine, buckets: list[int],
    ledger: RunLedger, should_stop: Callable[[], bool], batch: bool | None = None, batch_wait_seconds: float = 0.0,
) -> None:
    # One engine call for all of the run's buckets: it sweeps them one at a time, each locked only
    # while it is worked on, with the provider kept busy across bucket boundaries.
    context.log.info(f"{spec.name}: sweeping buckets {buckets[0]}..{buckets[-1]}"
                     + (" through the batch API" if batch else ""))
    worked = engine.sync_buckets(buckets, full=True, should_stop=should_stop, batch=batch,
                                 batch_wait_seconds=batch_wait_seconds)
    if any(s.batches_submitted for s in worked.values()):
        context.log.info(f"{spec.name}: batch sent; its buckets are stored by the first run after it completes")
    ledger.settle(worked)
    for bucket, stats in sorted(worked.items()):
        context.log.info(
            f"{spec.name} bucket {bucket}: {stats.rows_written} rows written, {stats.rows_unchanged} "
            f"unchanged, {stats.rows_deleted} deleted, {stats.rows_failed} failed"
        )
    total = ledger.totals()
    context.log.info(
        f"{spec.name}: {total.rows_written} rows written in {total.seconds:.1f}s "
        f"({total.rows_written / max(total.seconds, 1e-9):.1f} rows/s)"
    )


def _follow_changes(
    context: dg.AssetExecutionContext, spec: TableSpec, engine: EmbeddingEngine,
    database: VectorsyncDatabase, buckets: list[int], config: EmbeddingRunConfig, ledger: RunLedger,
) -> None:
    # A bucket another run holds is skipped, not waited for: that run drains it, or a later pass.
    engine.lock_wait_seconds = 0.0
    listener = ChangeListener(database.resolved_url(), spec.name)

    def merge(worked: dict[int, SyncStats]) -> None:
        ledger.settle(worked)
        context.log.info(
            f"{spec.name}: drained buckets {sorted(worked)}: "
            f"{sum(s.rows_written for s in worked.values())} rows written, "
            f"{sum(s.rows_deleted for s in worked.values())} deleted"
        )

    try:
        follow_changes(
            engine, listener, merge, should_stop=lambda: bool(getattr(engine.provider, "exhausted", False)),
            buckets=set(buckets),
            quiet_seconds=config.linger_seconds, max_seconds=config.linger_max_seconds,
            poll_seconds=max(config.linger_seconds / 4, 0.5),
        )
    finally:
        listener.close()
