"""Continuous mode's keeper: exactly one live continuous run per table. The tables sensor
(orchestration/sensors.py) asks it on every tick, for every continuous table, what to do."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import dagster as dg

from assets.spec import TableSpec
from assets.usage import budget_reached

from .database import PROJECT_DIR, tables_dir
from .continuous_job import continuous_lock_held
from .instance import IN_FLIGHT
from .resources import VectorsyncDatabase

# A continuous run has this long after it starts to take its lock before it is judged dead.
CONTINUOUS_START_GRACE_SECONDS = 20.0
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


def in_flight(instance: dg.DagsterInstance, spec: TableSpec, triggers: set[str]) -> list[dg.DagsterRun]:
    """The table's runs that are not over, of the given `vectorsync/trigger`s."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT, tags={"vectorsync/table": spec.name}))
    return [r for r in runs if r.tags.get("vectorsync/trigger") in triggers]


def _continuous_run_is_dead(
    context: dg.SensorEvaluationContext, database: VectorsyncDatabase, spec: TableSpec, run: dg.DagsterRun
) -> bool:
    """A run that has been started a while but holds no continuous lock lost its process (killed,
    or its machine died). Run monitoring notices a dead local worker only at its next pass, and
    not at all under launchers without health checks, so the keeper marks it failed."""
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


def continuous_alive(database: VectorsyncDatabase, spec: TableSpec) -> str | None:
    """The id of the table's continuous run when this code load knows it and it still holds its
    lock: the common tick, answered with one query and no read of the run storage."""
    known = _current_continuous_run.get(spec.name)
    if known is None:
        return None
    with database.pooled() as conn:
        if continuous_lock_held(conn, spec.name):
            return known
    _current_continuous_run.pop(spec.name, None)
    return None


def keep_continuous(
    context: dg.SensorEvaluationContext, database: VectorsyncDatabase, spec: TableSpec, job_name: str
) -> tuple[list[dg.RunRequest], str]:
    """Keeps exactly one continuous run of the table: starts it when missing, replaces it when the
    code or the declarations changed since it started (code_fingerprint), and waits longer after
    each failure in a row. Returns the run to ask for, if any, and what was found.
    (A run stuck starting or canceling is failed by Dagster's run monitoring; see instance.py.)"""
    known = continuous_alive(database, spec)
    if known is not None:
        return [], f"continuous run {known[:8]} is running"
    runs = in_flight(context.instance, spec, {"continuous"})
    runs = [r for r in runs if not _continuous_run_is_dead(context, database, spec, r)]
    current = [r for r in runs if r.tags.get("vectorsync/code_load") == CODE_LOAD_ID]
    for run in runs:
        if run not in current and run.status != dg.DagsterRunStatus.CANCELING:
            context.instance.run_coordinator.cancel_run(run.run_id)
    if current:
        if current[0].status == dg.DagsterRunStatus.STARTED:
            _current_continuous_run[spec.name] = current[0].run_id
        return [], f"continuous run {current[0].run_id[:8]} is {current[0].status.value.lower()}"
    if runs:
        return [], "waiting for the earlier continuous run to stop"
    if spec.budget is not None:
        # A run stopped at the budget today: a new one would stop at its first paid request.
        with database.pooled() as conn:
            over_budget = budget_reached(conn, spec)
        if over_budget:
            return [], over_budget
    failures, wait = _restart_wait(context.instance, job_name, time.time())
    if wait > 0:
        return [], f"the last {failures} continuous run(s) failed; the next starts in {wait:.0f}s"
    request = dg.RunRequest(
        run_key=f"{spec.name}:continuous:{uuid.uuid4().hex}",
        job_name=job_name,
        tags={"vectorsync/table": spec.name, "vectorsync/trigger": "continuous", "vectorsync/code_load": CODE_LOAD_ID},
    )
    return [request], "starting its continuous run"
