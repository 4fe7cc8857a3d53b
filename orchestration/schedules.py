"""Schedules: what pg_cron jobs and TimescaleDB background actions did, per table, visible in the UI.

reconcile       a full hash comparison of every bucket: repairs rows written with the triggers off
                or under session_replication_role = replica, rows older than the install, and
                store rows whose source row is gone
retry_failures  a run of the buckets whose failed rows are due for another attempt
index_upkeep    a run of the index job once the active version's store is large enough for its
                HNSW index, or once a previous model version's keep period is over (the job drops
                it and reports the bytes freed)
"""


import dagster as dg

from assets import versions
from assets.catalog import resolve
from assets.index import build_index, index_state
from assets.ledger import due_buckets
from assets.spec import TableSpec

from .names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG, bucket_partition_key, embeddings_asset_key
from .resources import VectorsyncDatabase
from .versions_dagster import drop_expired_versions, has_expired_versions, one_op_job


def _all_buckets(spec: TableSpec) -> dict[str, str]:
    return {
        PARTITION_RANGE_START_TAG: bucket_partition_key(0),
        PARTITION_RANGE_END_TAG: bucket_partition_key(spec.buckets - 1),
    }


def _installed(database: VectorsyncDatabase, spec: TableSpec) -> bool:
    # Schedules are evaluated in the long-lived code server: the pooled connection, not a new
    # PostgreSQL session for each of a table's ~19 ticks an hour.
    with database.pooled() as conn:
        if conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0] is None:
            return False
        return conn.execute(
            "SELECT 1 FROM vectorsync.embedding_tables WHERE name = %s", (spec.name,)
        ).fetchone() is not None


def reconcile_schedule(spec: TableSpec) -> dg.ScheduleDefinition:
    key = embeddings_asset_key(spec)

    @dg.schedule(
        name=f"{spec.name}_reconcile",
        cron_schedule=spec.schedules.reconcile,
        target=[key],
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Compares every row of {spec.source.qualified} with the store by text hash, "
        "bucket by bucket, in one run: embeds what the triggers could not see and deletes chunks "
        "whose row is gone.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, database: VectorsyncDatabase) -> dg.RunRequest | dg.SkipReason:
        if not _installed(database, spec):
            return dg.SkipReason(f"{spec.name} is not installed; run `vectorsync install`")
        return dg.RunRequest(
            run_key=None,
            asset_selection=[key],
            run_config=dg.RunConfig(ops={key.to_python_identifier(): {"config": {"full_sweep": True}}}),
            tags={**_all_buckets(spec), "vectorsync/table": spec.name, "vectorsync/trigger": "reconcile"},
        )

    return _schedule


def retry_schedule(spec: TableSpec) -> dg.ScheduleDefinition:
    key = embeddings_asset_key(spec)

    @dg.schedule(
        name=f"{spec.name}_retry_failures",
        cron_schedule=spec.schedules.retry_failures,
        target=[key],
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Asks for a run of the buckets of {spec.name} whose failed rows are due for "
        "another attempt (exponential backoff with jitter, recorded in vectorsync.failures).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, database: VectorsyncDatabase) -> dg.RunRequest | dg.SkipReason:
        if not _installed(database, spec):
            return dg.SkipReason(f"{spec.name} is not installed; run `vectorsync install`")
        with database.pooled() as conn:
            due = due_buckets(conn, spec.name)
        if not due:
            return dg.SkipReason(f"no failed row of {spec.name} is due for a retry")
        # One run from the first to the last due bucket: a bucket with nothing due costs a query.
        first, last = due[0], due[-1]
        partition = (
            {"partition_key": bucket_partition_key(first)}
            if first == last
            else {"tags": {PARTITION_RANGE_START_TAG: bucket_partition_key(first),
                           PARTITION_RANGE_END_TAG: bucket_partition_key(last)}}
        )
        return dg.RunRequest(
            asset_selection=[key],
            run_config=dg.RunConfig(
                ops={key.to_python_identifier(): {"config": {"full_sweep": False, "retry_due_failures": True}}}
            ),
            tags={"vectorsync/table": spec.name, "vectorsync/trigger": "retry", **partition.pop("tags", {})},
            **partition,
        )

    return _schedule


def index_upkeep_job(spec: TableSpec, origin: str) -> dg.JobDefinition:
    """The job that builds one table's vector index (one per table, so each table's definitions
    stand on their own)."""

    @dg.op(
        name=f"build_{spec.name}_vector_index",
        description=f"Builds the HNSW index of {spec.name}'s store with CREATE INDEX CONCURRENTLY "
        "(runs keep writing meanwhile), replacing an invalid index left by an interrupted build.",
        tags={"vectorsync/table": spec.name},
    )
    def build(context: dg.OpExecutionContext, database: VectorsyncDatabase) -> dg.Output:
        with database.connect() as conn:
            declared = resolve(conn, spec, origin)
            freed = drop_expired_versions(context, conn, declared)
            state = build_index(conn, versions.active_table(conn, declared))
        context.log.info(
            f"{spec.name}: index {state.index} exists={state.exists} valid={state.valid} "
            f"building elsewhere={state.building}"
        )
        if state.building:  # another run's build is under way; its own run reports how it ends
            return dg.Output(None, metadata={"bytes_freed": freed})
        if not (state.exists and state.valid) and state.store_rows_at_least >= state.min_rows:
            raise dg.Failure(f"table {spec.name}: index {state.index} is still missing or invalid")
        return dg.Output(None, metadata={"bytes_freed": freed})

    return one_op_job(spec, f"{spec.name}_vector_index",
                      f"Builds the vector index of {spec.name} once its store is large enough, and drops "
                      "previous model versions whose keep period is over.", build)


def index_upkeep_schedule(spec: TableSpec, origin: str, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"{spec.name}_index_upkeep",
        cron_schedule=spec.schedules.index_upkeep,
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Asks for the HNSW index of {spec.name} once its store holds "
        f"{spec.index.min_rows} chunks, and again if a build was interrupted.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, database: VectorsyncDatabase) -> dg.RunRequest | dg.SkipReason:
        if not _installed(database, spec):
            return dg.SkipReason(f"{spec.name} is not installed; run `vectorsync install`")
        with database.pooled() as conn:
            declared = resolve(conn, spec, origin)
            state = index_state(conn, versions.active_table(conn, declared))
            if has_expired_versions(conn, spec.name):
                return dg.RunRequest(tags={"vectorsync/table": spec.name, "vectorsync/trigger": "drop_expired"})
        if state.building:
            return dg.SkipReason(f"index {state.index} is being built by another run")
        if not state.needs_build:
            return dg.SkipReason(
                f"index {state.index}: exists={state.exists}, valid={state.valid}, "
                f"store has {'at least ' if state.store_rows_at_least >= state.min_rows else ''}"
                f"{state.store_rows_at_least} of the {state.min_rows} chunks needed"
            )
        return dg.RunRequest(tags={"vectorsync/table": spec.name, "vectorsync/trigger": "index_upkeep"},
        )

    return _schedule
