"""Sensors, one of each per code location however many tables it declares: the tables sensor,
which turns every table's change log into runs of the changed buckets and keeps each continuous
table's long-lived run alive, and the sensor that records every failed run in the control schema.

One sensor for all tables, not one per table: every tick of a sensor costs Dagster's sensor
daemon a dozen or more storage calls and a gRPC round trip, whatever the sensor does (and as many
new PostgreSQL connections where dagster-postgres's own storage is used: it does not pool them,
dagster-io/dagster#20325). A table adds a few queries on one pooled connection to a tick instead.
Each table still gets runs, run keys, tags, skip reasons and freshness events of its own; a table
is left out of the sensor with `sensor: false` in its declaration."""


import json
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import dagster as dg
import psycopg
from psycopg import sql

from assets.spec import TableSpec
from assets.status import estimated_rows
from assets.usage import budget_reached
from assets.wal_capture import drain_declared

from .keeper import in_flight, keep_continuous
from .names import (
    PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG, bucket_partition_key, embeddings_asset_key, source_asset_key,
)
from .resources import VectorsyncDatabase

TABLES_SENSOR = "vectorsync_tables"
# How often the tables sensor looks at the change logs and the continuous runs. 15 s keeps the
# sensor path within its freshness targets (p50 15 s, p95 30 s; a run then lingers for further
# changes), and a killed continuous run is replaced within 15 s. Freshness in seconds is
# continuous mode's job.
TABLES_SENSOR_SECONDS = 15
# A bucket whose changes are still pending this long after its last request, with no run covering
# it, is asked for again: the earlier run failed or was killed before it cleared them.
REREQUEST_AFTER_SECONDS = 60.0
# A bucket whose only pending entry is a sweep parked for its batch (assets/batch_fill.py) needs a
# run only to poll the batch, which takes minutes to a day: one every 5 minutes, not every minute.
BATCH_POLL_SECONDS = 300.0
# A change-triggered run keeps draining new changes in its buckets until they pause this long.
LINGER_SECONDS = 20.0
# A change run in flight longer than this no longer counts as covering its buckets: its process
# may have been killed, which Dagster's default run launcher does not notice.
CHANGE_RUN_TRUST_SECONDS = 300.0
# The source asset is observed at least this often (and whenever changes are requested).
SOURCE_OBSERVATION_SECONDS = 600.0
NO_NEW_CHANGES = "no new changes"
NOT_INSTALLED = "not installed; run `vectorsync install`"
# How often failed runs are copied into vectorsync.run_failures.
RUN_FAILURES_SENSOR_SECONDS = 60


class SensedTable(NamedTuple):
    """A table as the tables sensor sees it: its declaration and the jobs it launches for it."""

    spec: TableSpec
    changes_job: Any  # what dg.define_asset_job returns (its class is not public)
    continuous_job: dg.JobDefinition | None = None


class TableTick(NamedTuple):
    """One table's part of a tick: the runs to ask for, the events to record, and why no run."""

    requests: list[dg.RunRequest]
    events: list
    reason: str | None


def changes_job(spec: TableSpec) -> Any:
    """The job of the tables sensor's runs of one table: its embeddings asset, no checks (see
    _change_requests). A job of its own per table, because a sensor that also starts continuous
    runs must name a job in every run it asks for."""
    return dg.define_asset_job(
        name=f"{spec.name}_changes",
        selection=dg.AssetSelection.assets(embeddings_asset_key(spec)),
        description=f"Drains the change log of {spec.source.qualified} in the buckets the "
        f"{TABLES_SENSOR} sensor asks for, lingering up to {LINGER_SECONDS:.0f} s for further changes.",
        tags={"vectorsync/table": spec.name},
    )


def _buckets_of_run(run: dg.DagsterRun, spec: TableSpec) -> set[int]:
    if run.tags.get("vectorsync/trigger") == "continuous":
        return set(range(spec.buckets))
    start, end = run.tags.get(PARTITION_RANGE_START_TAG), run.tags.get(PARTITION_RANGE_END_TAG)
    if start is not None and end is not None:
        return set(range(int(start), int(end) + 1))
    partition = run.tags.get("dagster/partition")
    return {int(partition)} if partition is not None else set()


def _contiguous(buckets: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for b in sorted(buckets):
        if ranges and ranges[-1][1] == b - 1:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((b, b))
    return ranges


def observation_due(cursor: dict) -> bool:
    """Whether the source asset's periodic observation is due (see _source_observation)."""
    return time.time() - cursor.get("_observed", [0.0])[0] >= SOURCE_OBSERVATION_SECONDS


def tables_sensor(tables: Sequence[SensedTable], interval_seconds: int = TABLES_SENSOR_SECONDS) -> dg.SensorDefinition:
    """The one sensor of a code location's tables (see the module's docstring)."""
    jobs = [j for t in tables for j in (t.changes_job, t.continuous_job) if j is not None]

    @dg.sensor(
        name=TABLES_SENSOR,
        jobs=jobs,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="For every declared table: reads its change log and asks for one run per "
        "contiguous range of buckets with changes that no earlier or running run covers (each run "
        f"lingers up to {LINGER_SECONDS:.0f} s for further changes, so a steady stream of writes is "
        "served by one run); in continuous mode keeps one long-lived run alive, replacing a killed "
        "one and waiting 10 s, 20 s, 40 s, ... up to 10 min after failures in a row. Stopping this "
        "sensor stops both for every table; `sensor: false` in a declaration leaves one table out.",
    )
    def _sensor(context: dg.SensorEvaluationContext, database: VectorsyncDatabase) -> dg.SensorResult:
        # cursor: table -> its own cursor (see _table_changes); tables no longer declared drop out.
        cursor: dict[str, dict] = json.loads(context.cursor or "{}")
        cursor = {t.spec.name: cursor.get(t.spec.name, {}) for t in tables}
        requests: list[dg.RunRequest] = []
        events: list = []
        reasons: dict[str, list[str]] = {}
        for table in tables:
            name = table.spec.name
            try:
                tick = _table_tick(context, database, table, cursor[name])
            except Exception as exc:  # noqa: BLE001 - one table's failure must not stop the others
                context.log.exception(f"{name}: this tick failed")
                tick = TableTick([], [], f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            requests += tick.requests
            events += tick.events
            if tick.reason is not None:
                reasons.setdefault(tick.reason, []).append(name)
        # Each table's reason, in the tick's log; the idle one only in the skip reason, since a
        # log line on every tick would write a log file every 15 s.
        for reason, names in reasons.items():
            if reason != NO_NEW_CHANGES or requests:
                context.log.info(f"{', '.join(names)}: {reason}")
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor), asset_events=events)
        summary = "; ".join(f"{_listed(names)}: {reason}" for reason, names in reasons.items())
        return dg.SensorResult(skip_reason=summary or "no tables", cursor=json.dumps(cursor), asset_events=events)

    return _sensor


def _listed(names: list[str], at_most: int = 10) -> str:
    # A skip reason is shown in one line of the UI: a thousand idle tables are a count.
    return ", ".join(names) if len(names) <= at_most else f"{', '.join(names[:at_most])} and {len(names) - at_most} more"


def _table_tick(
    context: dg.SensorEvaluationContext, database: VectorsyncDatabase, table: SensedTable, cursor: dict
) -> TableTick:
    spec = table.spec
    if not spec.sensor:
        return TableTick([], [], "left out (`sensor: false` in its declaration)")
    changes = _table_changes(context, database, table, cursor)
    if table.continuous_job is None or changes.reason == NOT_INSTALLED:
        return changes
    started, kept = keep_continuous(context, database, spec, table.continuous_job.name)
    # The continuous run's state is the news; a stand-in change run is asked for only when it is down.
    return TableTick(changes.requests + started, changes.events, None if changes.requests or started else kept)


def _table_changes(
    context: dg.SensorEvaluationContext, database: VectorsyncDatabase, table: SensedTable, cursor: dict
) -> TableTick:
    """One table's change log, turned into run requests of the buckets that changed. `cursor`
    (the table's part of the sensor's, updated in place): bucket -> [highest change id already
    requested, when requested], and the freshness check's and the observation's state."""
    spec = table.spec
    with database.pooled() as conn:
        # The active model version's change log (assets/versions.py): capture writes every
        # change to each live version's log, so the active one names every changed bucket.
        registered = None
        if conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0] is not None:
            registered = conn.execute(
                """SELECT queue_table, fingerprint FROM vectorsync.embedding_tables
                   WHERE name = %s AND to_regclass('vectorsync.' || quote_ident(queue_table)) IS NOT NULL""",
                (spec.name,),
            ).fetchone()
        if registered is None:
            return TableTick([], [], NOT_INSTALLED)
        if spec.capture == "logical":
            drain_declared(conn, spec)  # the keys the WAL holds go to the change logs first
        queue = sql.Identifier("vectorsync", registered[0])
        pending = conn.execute(
            sql.SQL(
                # Keys, not entries: a bulk statement logs one entry per bucket for all its keys.
                """SELECT bucket, max(id), extract(epoch FROM now() - min(queued_at))::float8,
                          sum(coalesce(cardinality(row_keys), 1))::bigint
                   FROM {} GROUP BY bucket ORDER BY bucket"""
            ).format(queue)
        ).fetchall()
        parked = _parked_for_batch(conn, spec.name, registered[1], queue) if pending else set()
        observe = observation_due(cursor)
        source_rows = (estimated_rows(conn, sql.Identifier(spec.source.schema_, spec.source.table))
                       if pending or observe else None)
        # A run stopped at the table's budget today: another would only fail at its first
        # request, every minute until midnight. The backlog still ages, and backlog_age says so.
        over_budget = budget_reached(conn, spec) if pending and spec.budget else None
    all_pending = pending
    now = time.time()
    # Requests older than this are asked for again anyway: forgetting them keeps the cursor small.
    for bucket in [b for b, v in cursor.items() if b.isdigit() and now - v[1] >= REREQUEST_AFTER_SECONDS]:
        del cursor[bucket]
    events: list = _freshness_events(spec, all_pending, cursor, observe)
    if spec.continuous:
        # The continuous run drains the log; this only stands in when changes wait longer than
        # it would ever leave them (the run is down, or stopped on purpose).
        pending = [p for p in pending if p[2] > REREQUEST_AFTER_SECONDS]
    if parked:
        if now - cursor.get("_batch_poll", [0.0])[0] < BATCH_POLL_SECONDS:
            pending = [p for p in pending if p[0] not in parked]
        else:
            cursor["_batch_poll"] = [now]
    if over_budget:
        return TableTick([], events, over_budget)
    if not pending and not observe:
        # The common, idle tick: nothing to ask for, so the run storage is not read at all.
        return TableTick([], events, NO_NEW_CHANGES)
    covered: set[int] = set()
    for run in in_flight(context.instance, spec, {"changes", "continuous"}) if pending else []:
        record = context.instance.get_run_record_by_id(run.run_id)
        if record is not None and now - record.create_timestamp.timestamp() < CHANGE_RUN_TRUST_SECONDS:
            covered |= _buckets_of_run(run, spec)
    wanted: dict[int, int] = {}
    for bucket, max_id, _, _ in pending:
        requested_id, requested_at = cursor.get(str(bucket), (0, 0.0))
        if bucket in covered:
            continue
        if max_id <= requested_id and now - requested_at < REREQUEST_AFTER_SECONDS:
            continue
        wanted[bucket] = max_id
    requests = [_change_request(table, first, last, wanted, now, cursor) for first, last in _contiguous(wanted)]
    if requests or observe:
        events.append(_source_observation(spec, all_pending, source_rows))
        cursor["_observed"] = [now]
    if requests:
        return TableTick(requests, events, None)
    return TableTick([], events, NO_NEW_CHANGES if not pending else "every bucket with changes has a run")


def _parked_for_batch(conn: psycopg.Connection, name: str, fingerprint: str, queue: sql.Composable) -> set[int]:
    """Buckets of the active version waiting for a batch not yet collected, with no change by key
    pending (a change goes the ordinary way at once)."""
    if conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is None:
        return set()
    return {b for (b,) in conn.execute(sql.SQL(
        """SELECT DISTINCT b FROM vectorsync.batch_jobs j CROSS JOIN LATERAL unnest(j.buckets) AS b
           WHERE j.table_name = %s AND j.model = %s AND j.state IN ('preparing', 'uploaded', 'submitted')
             AND NOT EXISTS (SELECT 1 FROM {} q WHERE q.bucket = b AND q.row_keys IS NOT NULL)"""
    ).format(queue), (name, fingerprint))}


def _change_request(
    table: SensedTable, first: int, last: int, wanted: dict[int, int], now: float, cursor: dict
) -> dg.RunRequest:
    """The run of buckets first..last (one partition, or a range of them), noted in the cursor."""
    spec, key = table.spec, embeddings_asset_key(table.spec)
    for b in range(first, last + 1):
        cursor[str(b)] = [wanted[b], now]
    partition = (
        {"partition_key": bucket_partition_key(first)}
        if first == last
        else {"tags": {PARTITION_RANGE_START_TAG: bucket_partition_key(first),
                       PARTITION_RANGE_END_TAG: bucket_partition_key(last)}}
    )
    tags = {"vectorsync/table": spec.name, "vectorsync/trigger": "changes", **partition.pop("tags", {})}
    return dg.RunRequest(
        run_key=f"{spec.name}:{first}-{last}:{max(wanted[b] for b in range(first, last + 1))}:{now:.3f}",
        job_name=table.changes_job.name,
        asset_selection=[key],
        # No checks: several scan the whole store, which a run that drains a few changes must
        # not pay for every time. Backfills, the reconcile and retry schedules and runs from the
        # UI evaluate them.
        asset_check_keys=[],
        run_config=dg.RunConfig(
            ops={key.to_python_identifier(): {"config": {"full_sweep": False, "linger_seconds": LINGER_SECONDS}}}
        ),
        tags=tags,
        **partition,
    )


def _freshness_events(spec: TableSpec, pending: list, cursor: dict, due: bool) -> list[dg.AssetCheckEvaluation]:
    """The backlog_age check, as the sensor sees it on every tick: the table's freshness signal.
    It is evaluated when the oldest pending change passes max_backlog_seconds, when the backlog
    is back under it, and with the source's periodic observation, not on every tick (which
    would flood the event log). Runs and schedules evaluate it too, but a table whose runs keep
    failing, or whose runs are not started at all, would otherwise never show it late."""
    oldest = max((age for _, _, age, _ in pending), default=None)
    late = oldest is not None and oldest > spec.max_backlog_seconds
    was_late = bool(cursor.get("_backlog_late", [0])[0])
    if late == was_late and not due:
        return []
    cursor["_backlog_late"] = [int(late)]
    return [
        dg.AssetCheckEvaluation(
            asset_key=embeddings_asset_key(spec),
            check_name="backlog_age",
            passed=not late,
            metadata={
                "pending_changes": sum(n for *_, n in pending),
                "oldest_change_seconds": round(oldest or 0.0, 1),
                "max_backlog_seconds": spec.max_backlog_seconds,
                "evaluated_by": "change sensor",
            },
        )
    ]


def _source_observation(spec: TableSpec, pending: list, source_rows: int | None) -> dg.AssetObservation:
    """What the UI shows on the source asset: its size and its backlog. Recorded when changes
    are requested and otherwise every ten minutes, not on every tick, which would flood the
    event log."""
    metadata: dict = {
        "pending_changes": sum(n for *_, n in pending),
        "oldest_change_seconds": round(max((age for _, _, age, _ in pending), default=0.0), 1),
    }
    if source_rows is not None:
        metadata["dagster/row_count"] = source_rows  # the planner's estimate
    return dg.AssetObservation(asset_key=source_asset_key(spec), metadata=metadata)


def _error_chain(error) -> str:
    """The message of an error and of every error that caused it (a retried step's last failure
    reads "Exceeded max_retries"; the cause says why)."""
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause
    return " <- ".join(messages)


@dg.run_failure_sensor(
    name="vectorsync_run_failures",
    monitor_all_code_locations=False,
    # Dagster's default is 30 s; a failure report can wait a minute, and every tick costs the
    # daemon a dozen storage calls.
    minimum_interval_seconds=RUN_FAILURES_SENSOR_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every failed run in vectorsync.run_failures, so the SQL view "
    "vectorsync.failure_report shows run-level failures next to the failed rows.",
)
def record_run_failures(context: dg.RunFailureSensorContext, database: VectorsyncDatabase) -> None:
    run = context.dagster_run
    start, end = run.tags.get(PARTITION_RANGE_START_TAG), run.tags.get(PARTITION_RANGE_END_TAG)
    partitions = f"{start}..{end}" if start else run.tags.get("dagster/partition")
    step_errors = [
        f"{e.step_key}: {_error_chain(e.event_specific_data.error)}"
        for e in context.get_step_failure_events()
        if e.event_specific_data is not None and e.event_specific_data.error is not None
    ]
    message = "\n".join(step_errors) or context.failure_event.message or "run failed"
    with database.connect() as conn:
        conn.execute(
            """INSERT INTO vectorsync.run_failures (run_id, job_name, table_name, partitions, error)
               VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING""",
            (run.run_id, run.job_name, run.tags.get("vectorsync/table"), partitions, message[:4000]),
        )
