"""Backfilling every partition through Dagster, launched the way the UI launches it (the webserver's
GraphQL `launchPartitionBackfill`, then the backfill daemon), against the engine making the same
rows current in one process. The provider is an OpenAI-compatible server on 127.0.0.1 that answers
at once, so both sides pay the same provider cost and what differs is the orchestration: the
backfill daemon's tick, the run queue, the run's process start and code load."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import dagster as dg
import psutil
from psycopg import sql

from bench.common import (
    RUN_WORKER,
    Benchmark,
    Context,
    Measure,
    Result,
    body_text,
    create_source,
    dagster_role,
    drop_hnsw,
    free_port,
    load_rows,
    reset_store,
    scratch_dir,
    sync_all,
    timed,
    write_component,
)
from bench.remote import openai_server

KEY_ENV = "VECTORSYNC_BENCH_NO_KEY"
LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
  }
}"""


def _graphql(port: int, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _wait_for_ui(port: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = _graphql(port, "{ version }", {})
            if answer.get("data", {}).get("version"):
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the Dagster webserver on port {port} did not answer within {timeout:.0f}s")


def _step_seconds(log: list) -> tuple[float, dict[str, float]]:
    """From the first step's start to the last step's end (the asset, then its checks), and each
    step's own seconds, from a run's event log."""
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for entry in log:
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            ends[event.step_key] = entry.timestamp
    if not starts or not ends:
        return float("nan"), {}
    each = {key: round(ends[key] - start, 2) for key, start in starts.items() if key in ends}
    return max(ends.values()) - min(starts.values()), each


def _resident_cpu(root: int, before: dict[tuple[int, str], float] | None = None) -> Any:
    """CPU seconds of Dagster's long-lived processes (`dagster dev`, webserver, daemon, code
    server), by pid and role; given an earlier reading, the seconds each role used since. Run
    workers come and go within a backfill, so they are not in it: what is left is what competes
    with the run."""
    now: dict[tuple[int, str], float] = {}
    for process in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            role = dagster_role(process)
            if role == RUN_WORKER:
                continue
            times = process.cpu_times()
            now[(process.pid, role)] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    if before is None:
        return now
    used: dict[str, float] = {}
    for (pid, role), seconds in now.items():
        used[role] = round(used.get(role, 0.0) + seconds - before.get((pid, role), 0.0), 2)
    return used


def _start_cost(
    instance: dg.DagsterInstance, run_id: str, log: list, launched_at: float
) -> dict[str, float]:
    """Where the time before the engine started went: until the backfill daemon created the run,
    in the run queue until the run launcher took it, from there until the run worker (a process
    the code server starts) had loaded the code and begun the run, to the first step, and in the
    step until the engine began its sweep (resolving the table, building the provider)."""
    record = instance.get_run_record_by_id(run_id)
    first: dict[str, float] = {}  # the log is in order: the first entry of each kind is its earliest
    for entry in log:
        kind = entry.dagster_event.event_type_value if entry.dagster_event is not None else None
        if "sweeping buckets" in (entry.user_message or ""):
            kind = "sweep"
        if kind in ("PIPELINE_STARTING", "PIPELINE_START", "STEP_START", "sweep"):
            first.setdefault(kind, entry.timestamp)
    created = record.create_timestamp.timestamp()
    launched, began, first_step, sweep = (
        first.get(k, float("nan")) for k in ("PIPELINE_STARTING", "PIPELINE_START", "STEP_START", "sweep")
    )
    return {
        "launch_to_run_created": round(created - launched_at, 2),
        "queued": round(launched - created, 2),
        "worker_start_and_code_load": round(began - launched, 2),
        "run_start_to_first_step": round(first_step - began, 2),
        "first_step_to_engine_start": round(sweep - first_step, 2),
    }


def _timeline(instance: dg.DagsterInstance, runs: list, logs: dict[str, list], launched_at: float) -> list[dict[str, Any]]:
    """Each run of a backfill, in the order the backfill daemon created them: seconds after the
    launch at which it was created, launched, began in its worker, began its first step and ended."""
    rows = []
    for run in runs:
        record = instance.get_run_record_by_id(run.run_id)
        first: dict[str, float] = {}
        for entry in logs[run.run_id]:
            kind = entry.dagster_event.event_type_value if entry.dagster_event is not None else None
            if kind in ("PIPELINE_STARTING", "PIPELINE_START", "STEP_START", "PIPELINE_SUCCESS", "PIPELINE_FAILURE"):
                first.setdefault(kind, entry.timestamp)
        rows.append({
            "partitions": run.tags.get("dagster/partition")
            or f"{run.tags.get('dagster/asset_partition_range_start')}..{run.tags.get('dagster/asset_partition_range_end')}",
            "created": round(record.create_timestamp.timestamp() - launched_at, 2),
            **{name: round(first[kind] - launched_at, 2) for name, kind in (
                ("launched", "PIPELINE_STARTING"), ("worker_began", "PIPELINE_START"),
                ("first_step", "STEP_START"), ("ended", "PIPELINE_SUCCESS")) if kind in first},
        })
    return sorted(rows, key=lambda row: row["created"])


def run(ctx: Context) -> Result:
    from assets.catalog import resolve
    from assets.engine import EmbeddingEngine
    from assets.install import install
    from assets.providers import build_provider
    from assets.declarations import load_declarations
    from orchestration.local_dagster import LocalDagster

    p = ctx.params
    work = scratch_dir("vs-bench-uibackfill-")
    name = "bench_ui_backfill"
    conn = ctx.connect()
    engine_samples: list[float] = []
    dagster_samples: list[float] = []
    step_samples: list[float] = []
    runs_per_backfill: list[int] = []
    steps_per_round: list[dict[str, float]] = []
    start_costs: list[dict[str, float]] = []
    timelines: list[list[dict[str, Any]]] = []
    resident_cpu: list[dict[str, float]] = []
    resident_cpu_alone: list[dict[str, float]] = []
    with openai_server(p["dimensions"], 0.0) as (base_url, _):
        create_source(conn, name, "id int PRIMARY KEY, body text")
        load_rows(conn, name, [(i, body_text(i, p["chars"])) for i in range(p["rows"])], ["id", "body"])
        tables_dir = work / "tables"
        declaration = {
            "name": name, "source": f"{name}.docs", "columns": ["body"], "buckets": 16, "chunking": None,
            # No scheduled run may land in the middle of a measurement, and no HNSW index may be built
            # between rounds: writes into one cost several times more than into a plain table.
            "schedules": {"reconcile": "0 0 1 1 *", "index_upkeep": "0 0 1 1 *", "retry_failures": "0 0 1 1 *"},
            "provider": {"kind": "openai", "model": "bench-backfill", "dimensions": p["dimensions"],
                         "base_url": base_url, "api_key_env": KEY_ENV, "max_concurrency": 4},
        }
        write_component(tables_dir, declaration)
        specs = load_declarations(tables_dir)
        install(conn, specs)
        spec, origin = specs[0]
        table = resolve(conn, spec, origin)
        queue = sql.Identifier("vectorsync", spec.queue_name)
        conn.execute(sql.SQL("TRUNCATE {}").format(queue))  # no change run before the first round
        home = work / "home"
        port = free_port()
        with LocalDagster(ctx.url, home, tables_dir, env={KEY_ENV: "sk-bench"}, port=port) as dagster:
            _wait_for_ui(port)
            # Each side starts from an empty store and an empty change log (the install's sweep
            # markers included), so the change sensor has nothing to race the backfill for.
            with dg.DagsterInstance.from_config(str(home)) as instance:
                for r in range(ctx.rounds):
                    conn.execute(sql.SQL("TRUNCATE {}").format(queue))
                    drop_hnsw(conn, spec)
                    reset_store(conn, table)
                    engine = EmbeddingEngine(conn, table, build_provider(spec.provider))
                    resident = _resident_cpu(dagster.process.pid)
                    seconds, stats = timed(lambda: sync_all(engine, spec.buckets, full=True))  # noqa: B023
                    resident_cpu_alone.append(_resident_cpu(dagster.process.pid, resident))
                    engine.close()
                    assert stats.rows_written == p["rows"], stats
                    engine_samples.append(seconds)

                    reset_store(conn, table)
                    conn.execute(sql.SQL("TRUNCATE {}").format(queue))
                    resident = _resident_cpu(dagster.process.pid)
                    started = time.perf_counter()
                    launched_at = time.time()
                    answer = _graphql(port, LAUNCH, {"params": {
                        "partitionNames": [f"{b:03d}" for b in range(spec.buckets)],
                        "assetSelection": [{"path": ["embeddings", name]}],
                        "fromFailure": False,
                    }})
                    launched = answer["data"]["launchPartitionBackfill"]
                    if launched["__typename"] != "LaunchBackfillSuccess":
                        raise RuntimeError(f"launching the backfill failed: {launched}")
                    backfill_id = launched["backfillId"]
                    # Done when the backfill's runs have all finished: the rows are current then,
                    # whenever the backfill daemon next marks the backfill itself completed.
                    deadline = time.monotonic() + p["timeout"]
                    while True:
                        runs = list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))
                        if runs and all(run.is_finished for run in runs):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"backfill {backfill_id} unfinished after {p['timeout']}s; "
                                               f"log:\n{dagster.log_tail()}")
                        time.sleep(0.2)
                    total = time.perf_counter() - started
                    resident_cpu.append(_resident_cpu(dagster.process.pid, resident))
                    stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.store)).fetchone()[0]
                    if stored != p["rows"] or not all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs):
                        raise RuntimeError(f"backfill {backfill_id} ended with {stored} rows "
                                           f"stored; runs {[(r.run_id, r.status) for r in runs]}")
                    dagster_samples.append(total)
                    runs_per_backfill.append(len(runs))
                    logs = {run.run_id: instance.all_logs(run.run_id) for run in runs}
                    steps = [_step_seconds(logs[run.run_id]) for run in runs]
                    step_samples.append(sum(total_s for total_s, _ in steps))
                    steps_per_round.append({k: v for _, each in steps for k, v in each.items()})
                    # The first run the backfill daemon created: what a user waits for before work begins.
                    first_run = min(runs, key=lambda run: instance.get_run_record_by_id(run.run_id).create_timestamp)
                    start_costs.append(_start_cost(instance, first_run.run_id, logs[first_run.run_id], launched_at))
                    timelines.append(_timeline(instance, runs, logs, launched_at))
                    ctx.log(f"round {r + 1}: engine {seconds:.1f}s; UI backfill {total:.1f}s end to end in "
                            f"{len(runs)} run(s), of which the engine's step took {step_samples[-1]:.1f}s")
    conn.close()
    overhead = [t - s for t, s in zip(dagster_samples, step_samples)]
    return Result(
        measures=[
            Measure(f"backfill of all 16 partitions, {p['rows']:,} rows of {p['chars']} chars", "s",
                    dagster_samples, engine_samples, "ratio <= 1.25"),
            Measure("the same backfill: time inside the run's steps (asset and checks)", "s", step_samples,
                    engine_samples),
            Measure("per-backfill start cost (end to end - step)", "s", overhead),
            *[Measure(f"first run's start: {part.replace('_', ' ')}", "s", [c[part] for c in start_costs])
              for part in (start_costs[0] if start_costs else {})],
        ],
        params=p,
        extra={"runs_per_backfill": runs_per_backfill, "seconds_per_step": steps_per_round,
               "start_cost_parts": start_costs, "run_timelines": timelines,
               "cpu_seconds_of_dagster_outside_the_run": resident_cpu,
               "cpu_seconds_of_dagster_while_the_engine_ran_alone": resident_cpu_alone},
        notes=["UI side: GraphQL launchPartitionBackfill on `dagster dev`, timed until every run of the "
               "backfill finished; engine side: sync_all over the 16 buckets in this process",
               "both sides embed through the same OpenAI-compatible server (0 ms) with concurrency 4"],
    ).check(lambda m: m.ratio is not None and m.ratio <= 1.25)


BENCHMARK = Benchmark(
    name="ui_backfill", title="backfill of all partitions launched as the UI does, vs the engine alone",
    target="end-to-end time <= 1.25 x the engine's own time",
    run=run,
    defaults={"rows": 100_000, "chars": 500, "dimensions": 32, "timeout": 1800},
    quick={"rows": 5_000},
)
