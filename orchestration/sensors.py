"""Sensors: per table, one that turns the change log into runs of the changed buckets and one that
keeps the continuous-mode run alive; and one that records every failed run in the control schema."""


import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import dagster as dg
from psycopg import sql

from orchestration.embedding_assets import bucket_partition_key, continuous_lock_held, embeddings_asset_key, source_asset_key
from assets.spec import TableSpec
from assets.status import estimated_rows
from assets.usage import budget_reached

from .database import PROJECT_DIR, tables_dir
from .instance import IN_FLIGHT
from .names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
from .resources import VectorsyncDatabase

# How often the change sensor looks at the change log. Each tick costs Dagster's sensor daemon
# a dozen or more new PostgreSQL connections (its storage does not pool them): measured idle, a
# table with a 5 s sensor cost 1.3-1.5 % of a core. 15 s keeps the sensor path within its
# freshness targets (p50 15 s, p95 30 s; a run then lingers for further changes) at a third of
# that. Freshness in seconds is continuous mode's job.
CHANGES_SENSOR_SECONDS = 15
# In continuous mode the change sensor only stands in for a run that is down (REREQUEST_AFTER_SECONDS).
CONTINUOUS_CHANGES_SENSOR_SECONDS = 30
# How often the keeper checks the continuous run: a killed run is failed at once by its code
# server, and replaced at the keeper's next tick.
KEEPER_SECONDS = 15
# A bucket whose changes are still pending this long after its last request, with no run covering
# it, is asked for again: the earlier run failed or was killed before it cleared them.
REREQUEST_AFTER_SECONDS = 60.0
# A change-triggered run keeps draining new changes in its buckets until they pause this long.
LINGER_SECONDS = 20.0
# A continuous run has this long after it starts to take its lock before it is judged dead.
CONTINUOUS_START_GRACE_SECONDS = 20.0
# A change run in flight longer than this no longer counts as covering its buckets: its process
# may have been killed, which Dagster's default run launcher does not notice.
CHANGE_RUN_TRUST_SECONDS = 300.0
# The source asset is observed at least this often (and whenever changes are requested).
SOURCE_OBSERVATION_SECONDS = 600.0
# A continuous run that fails is restarted at once (its process may just have been killed); one
# that keeps failing is restarted after a pause that doubles with each further failure in a row,
# from the first to the last of these: a broken declaration or an unreachable database must not
# start a run every few seconds and flood the run list.
CONTINUOUS_RESTART_FIRST_SECONDS = 10.0
CONTINUOUS_RESTART_MAX_SECONDS = 600.0


def code_fingerprint(project: Path = PROJECT_DIR, declarations: Path | None = None) -> str:
    """Identifies the code and declarations a code location loaded: vectorsync's Python and SQL,
    the YAML declarations and Dagster's version. A continuous run started under another
    fingerprint is replaced, so it runs what is now in effect; a reload (or a code server
    restarted by Dagster) that changed none of them keeps the run."""
    digest = hashlib.sha256(dg.__version__.encode())
    files = [p for folder in ("assets", "orchestration", "sql") for p in (project / folder).rglob("*")
             if p.suffix in (".py", ".sql") and p.is_file()]
    declarations = declarations or tables_dir()
    files += [p for p in declarations.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()]
    for path in sorted(files):
        digest.update(str(path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


CODE_LOAD_ID = code_fingerprint()


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


def _in_flight(instance: dg.DagsterInstance, spec: TableSpec, triggers: set[str]) -> list[dg.DagsterRun]:
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT, tags={"vectorsync/table": spec.name}))
    return [r for r in runs if r.tags.get("vectorsync/trigger") in triggers]


def observation_due(cursor: dict) -> bool:
    """Whether the source asset's periodic observation is due (see _source_observation)."""
    return time.time() - cursor.get("_observed", [0.0])[0] >= SOURCE_OBSERVATION_SECONDS


def changes_sensor(spec: TableSpec, interval_seconds: int | None = None) -> dg.SensorDefinition:
    key = embeddings_asset_key(spec)

    @dg.sensor(
        name=f"{spec.name}_changes",
        asset_selection=[key],
        minimum_interval_seconds=interval_seconds or (
            CONTINUOUS_CHANGES_SENSOR_SECONDS if spec.continuous else CHANGES_SENSOR_SECONDS),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Reads the change log of {spec.source.qualified} and asks for one run per "
        "contiguous range of buckets with changes that no earlier or running run covers. Each run "
        f"lingers up to {LINGER_SECONDS:.0f} s for further changes, so a steady stream of writes "
        "is served by one run instead of a run per change.",
    )
    def _sensor(context: dg.SensorEvaluationContext, database: VectorsyncDatabase) -> dg.SensorResult:
        # cursor: bucket -> [highest change id already requested, when requested]
        cursor: dict[str, list[float]] = json.loads(context.cursor or "{}")
        with database.pooled() as conn:
            # The active model version's change log (assets/versions.py): capture writes every
            # change to each live version's log, so the active one names every changed bucket.
            registered = None
            if conn.execute("SELECT to_regclass('vectorsync.embedding_tables')").fetchone()[0] is not None:
                registered = conn.execute(
                    """SELECT queue_table FROM vectorsync.embedding_tables
                       WHERE name = %s AND to_regclass('vectorsync.' || quote_ident(queue_table)) IS NOT NULL""",
                    (spec.name,),
                ).fetchone()
            if registered is None:
                return dg.SensorResult(skip_reason=f"{spec.name} is not installed; run `vectorsync install`")
            queue = sql.Identifier("vectorsync", registered[0])
            pending = conn.execute(
                sql.SQL(
                    # Keys, not entries: a bulk statement logs one entry per bucket for all its keys.
                    """SELECT bucket, max(id), extract(epoch FROM now() - min(queued_at))::float8,
                              sum(coalesce(cardinality(row_keys), 1))::bigint
                       FROM {} GROUP BY bucket ORDER BY bucket"""
                ).format(queue)
            ).fetchall()
            observe = observation_due(cursor)
            source_rows = (estimated_rows(conn, sql.Identifier(spec.source.schema_, spec.source.table))
                           if pending or observe else None)
            # A run stopped at the table's budget today: another would only fail at its first
            # request, every minute until midnight. The backlog still ages, and backlog_age says so.
            over_budget = budget_reached(conn, spec) if pending and spec.budget else None
        all_pending = pending
        freshness = _freshness_events(spec, all_pending, cursor, observation_due(cursor))
        if spec.continuous:
            # The continuous run drains the log; this sensor only stands in when changes wait
            # longer than it would ever leave them (the run is down, or stopped on purpose).
            pending = [p for p in pending if p[2] > REREQUEST_AFTER_SECONDS]
        if over_budget:
            return dg.SensorResult(skip_reason=over_budget, cursor=json.dumps(cursor), asset_events=freshness)
        if not pending and not observe:
            # The common, idle tick: nothing to ask for, so the run storage is not read at all.
            return dg.SensorResult(skip_reason="no new changes", cursor=json.dumps(cursor), asset_events=freshness)
        covered: set[int] = set()
        for run in _in_flight(context.instance, spec, {"changes", "continuous"}) if pending else []:
            record = context.instance.get_run_record_by_id(run.run_id)
            if record is not None and time.time() - record.create_timestamp.timestamp() < CHANGE_RUN_TRUST_SECONDS:
                covered |= _buckets_of_run(run, spec)
        now = time.time()
        wanted: dict[int, int] = {}
        for bucket, max_id, _, _ in pending:
            requested_id, requested_at = cursor.get(str(bucket), (0, 0.0))
            if bucket in covered:
                continue
            if max_id <= requested_id and now - requested_at < REREQUEST_AFTER_SECONDS:
                continue
            wanted[bucket] = max_id
        requests = []
        for first, last in _contiguous(wanted):
            for b in range(first, last + 1):
                cursor[str(b)] = [wanted[b], now]
            partition = (
                {"partition_key": bucket_partition_key(first)}
                if first == last
                else {"tags": {PARTITION_RANGE_START_TAG: bucket_partition_key(first),
                               PARTITION_RANGE_END_TAG: bucket_partition_key(last)}}
            )
            tags = {"vectorsync/table": spec.name, "vectorsync/trigger": "changes", **partition.pop("tags", {})}
            requests.append(
                dg.RunRequest(
                    run_key=f"{spec.name}:{first}-{last}:{max(wanted[b] for b in range(first, last + 1))}:{now:.3f}",
                    asset_selection=[key],
                    # No checks: several scan the whole store, which a run that drains a few
                    # changes must not pay for every time. Backfills, the reconcile and retry
                    # schedules and runs from the UI evaluate them.
                    asset_check_keys=[],
                    run_config=dg.RunConfig(
                        ops={key.to_python_identifier(): {"config": {"full_sweep": False, "linger_seconds": LINGER_SECONDS}}}
                    ),
                    tags=tags,
                    **partition,
                )
            )
        events: list = list(freshness)
        if requests or observe:
            events.append(_source_observation(spec, all_pending, source_rows))
            cursor["_observed"] = [now]
        if not requests:
            return dg.SensorResult(
                skip_reason="no new changes" if not pending else "every bucket with changes has a run",
                cursor=json.dumps(cursor), asset_events=events,
            )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor), asset_events=events)

    return _sensor


def _continuous_run_is_dead(
    context: dg.SensorEvaluationContext, database: VectorsyncDatabase, spec: TableSpec, run: dg.DagsterRun
) -> bool:
    """A run that has been started a while but holds no continuous lock lost its process (killed,
    or its machine died). Run monitoring notices a dead local worker only at its next pass (every
    120 s), and not at all under launchers without health checks, so the keeper marks it failed."""
    if run.status != dg.DagsterRunStatus.STARTED:
        return False
    record = context.instance.get_run_record_by_id(run.run_id)
    if record is None or record.start_time is None or time.time() - record.start_time < CONTINUOUS_START_GRACE_SECONDS:
        return False
    with database.pooled() as conn:
        if continuous_lock_held(conn, spec.name):
            return False
    context.instance.report_run_failed(run, f"table {spec.name}: the continuous run's process is gone")
    return True


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


def continuous_restart_delay(failures_in_a_row: int) -> float:
    """Seconds to wait after the last of `failures_in_a_row` failed continuous runs."""
    if failures_in_a_row <= 1:
        return 0.0
    return min(CONTINUOUS_RESTART_FIRST_SECONDS * 2 ** (failures_in_a_row - 2), CONTINUOUS_RESTART_MAX_SECONDS)


def _restart_wait(instance: dg.DagsterInstance, job_name: str, now: float) -> tuple[int, float]:
    """How many of the job's latest runs failed in a row, and how long until the next may start.
    A run that succeeded or was canceled (replaced, or stopped from the UI) ends the streak."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=job_name,
            statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.CANCELED],
        ),
        limit=8,
    )
    failures = 0
    for record in records:
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            break
        failures += 1
    if not failures:
        return 0, 0.0
    ended = records[0].end_time or records[0].update_timestamp.timestamp()
    return failures, max(0.0, ended + continuous_restart_delay(failures) - now)


# table -> the continuous run of this code load last seen running. Sensors are evaluated in the
# long-lived code server, so this spares the run storage a read on every tick while that run
# holds its lock; a run that loses its lock (killed, stopped) sends the keeper down the full path.
_current_continuous_run: dict[str, str] = {}


def continuous_keeper(spec: TableSpec, job: dg.JobDefinition, interval_seconds: int = KEEPER_SECONDS) -> dg.SensorDefinition:
    """Keeps exactly one continuous run of the table: starts it when missing, replaces it when the
    code or the declarations changed since it started (code_fingerprint), and waits longer after
    each failure in a row.
    (A run stuck starting or canceling is failed by Dagster's run monitoring; see instance.py.)"""

    @dg.sensor(
        name=f"{spec.name}_continuous_keeper",
        job=job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Keeps one continuous-mode run of {spec.name} alive: starts it when none is "
        "running and replaces a run started under other code or declarations. Stop this sensor to "
        "stop continuous mode. A failed run is replaced at once; after two or more failures in a row "
        "it waits 10 s, 20 s, 40 s, ... up to 10 min.",
    )
    def _sensor(context: dg.SensorEvaluationContext, database: VectorsyncDatabase) -> dg.SensorResult:
        known = _current_continuous_run.get(spec.name)
        if known is not None:
            with database.pooled() as conn:
                if continuous_lock_held(conn, spec.name):
                    # The run this code load started (or adopted) still holds the table's lock:
                    # alive, and current. The common tick, answered without reading run storage.
                    return dg.SensorResult(skip_reason=f"continuous run {known[:8]} is running")
            _current_continuous_run.pop(spec.name, None)
        runs = _in_flight(context.instance, spec, {"continuous"})
        runs = [r for r in runs if not _continuous_run_is_dead(context, database, spec, r)]
        current = [r for r in runs if r.tags.get("vectorsync/code_load") == CODE_LOAD_ID]
        for run in runs:
            if run not in current and run.status != dg.DagsterRunStatus.CANCELING:
                context.instance.run_coordinator.cancel_run(run.run_id)
        if current:
            if current[0].status == dg.DagsterRunStatus.STARTED:
                _current_continuous_run[spec.name] = current[0].run_id
            return dg.SensorResult(
                skip_reason=f"continuous run {current[0].run_id[:8]} is {current[0].status.value.lower()}"
            )
        if runs:
            return dg.SensorResult(skip_reason="waiting for the earlier continuous run to stop")
        if spec.budget is not None:
            # A run stopped at the budget today: a new one would stop at its first paid request.
            with database.pooled() as conn:
                over_budget = budget_reached(conn, spec)
            if over_budget:
                return dg.SensorResult(skip_reason=over_budget)
        failures, wait = _restart_wait(context.instance, job.name, time.time())
        if wait > 0:
            return dg.SensorResult(
                skip_reason=f"the last {failures} continuous run(s) failed; the next starts in {wait:.0f}s"
            )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{spec.name}:continuous:{uuid.uuid4().hex}",
                    tags={"vectorsync/table": spec.name, "vectorsync/trigger": "continuous",
                          "vectorsync/code_load": CODE_LOAD_ID},
                )
            ]
        )

    return _sensor


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
