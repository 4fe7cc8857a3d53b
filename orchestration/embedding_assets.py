"""The Dagster side of one declared table: its source asset, its embeddings asset and its checks."""


import os
import random
from collections.abc import Callable

import dagster as dg
import psycopg
from pydantic import Field

from assets import versions
from assets.catalog import resolve
from assets.continuous import ChangeListener, follow_changes
from assets.engine import BucketBusy, EmbeddingEngine, SyncStats, retry_policy
from assets.providers import provider_for
from assets.run_ledger import RunLedger
from assets.spec import TableSpec
from assets.status import change_backlog
from assets.usage import BudgetExceeded, rows_to_visit

from .asset_metadata import BatchThrottle, backlog_metadata, partition_metadata, run_totals, store_metadata
from .names import bucket_partition_key, embeddings_asset_key, source_asset_key
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


def partitions_for(spec: TableSpec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([bucket_partition_key(b) for b in range(spec.buckets)])


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

    def log_drained(batch: dict[int, SyncStats]) -> None:
        total = SyncStats()
        for stats in batch.values():
            total.merge(stats)
        context.log.info(f"{spec.name}: drained buckets {sorted(batch)}: {total.rows_written} rows written, "
                         f"{total.rows_deleted} deleted")

    # One log line at most every REPORT_EVERY_SECONDS, not one per drain: each is an event-log
    # write, and a steady stream of writes drains many times a second.
    drained = BatchThrottle(log_drained, first_at_once=True)

    def merge(worked: dict[int, SyncStats]) -> None:
        ledger.settle(worked)
        drained.add(worked)

    try:
        follow_changes(
            engine, listener, merge, should_stop=lambda: bool(getattr(engine.provider, "exhausted", False)),
            buckets=set(buckets),
            quiet_seconds=config.linger_seconds, max_seconds=config.linger_max_seconds,
            poll_seconds=max(config.linger_seconds / 4, 0.5), on_idle=drained.flush,
        )
    finally:
        listener.close()
        drained.flush(force=True)
