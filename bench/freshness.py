"""f. Freshness through Dagster: rows inserted at a steady rate while stock `dagster dev` (webserver,
daemon, code server) runs, measured from each source row's commit to the commit of its embedding,
both read with pg_xact_commit_timestamp (track_commit_timestamp, turned on here). Two paths side by
side: the change sensor (sensor tick, run queue, a run that lingers for further changes) and
continuous mode (one long-lived run woken by LISTEN/NOTIFY). The provider is an OpenAI-compatible
server on 127.0.0.1 answering at once, so what is measured is the orchestration. Also: the CPU the
idle continuous run uses, and the start cost of a change-triggered run (queued to started)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import psutil
from psycopg import sql

from bench.common import (
    Benchmark,
    Context,
    Measure,
    Result,
    by_role,
    cpu_by_thread,
    cpu_snapshot,
    cpu_used,
    create_source,
    ensure_commit_timestamps,
    forget_runs,
    free_port,
    postmaster_of,
    scratch_dir,
    sessions_and_commits,
    thread_times,
    write_component,
)
from bench.remote import openai_server

KEY_ENV = "VECTORSYNC_BENCH_NO_KEY"


def _declare(ctx: Context, tables_dir: Path, name: str, base_url: str, continuous: bool) -> sql.Identifier:
    from assets.install import install
    from assets.declarations import load_declarations

    conn = ctx.connect()
    create_source(conn, name, "id int PRIMARY KEY, body text, inserted_at timestamptz")
    declaration = {
        "name": name, "source": f"{name}.docs", "columns": ["body"], "buckets": 16, "continuous": continuous,
        # capture=logical: keys read back from the WAL (the server runs with wal_level = logical).
        "capture": ctx.params.get("capture", "triggers"),
        "provider": {"kind": "openai", "model": "bench-fresh", "dimensions": 32, "base_url": base_url,
                     "api_key_env": KEY_ENV},
    }
    write_component(tables_dir, declaration)
    install(conn, load_declarations(tables_dir))
    conn.close()
    return sql.Identifier(name, "docs")


def _runs(home: Path, table: str) -> list[Any]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_run_records(filters=dg.RunsFilter(tags={"vectorsync/table": table})))


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not happen within {timeout:.0f}s")


def _continuous_process(home: Path, table: str) -> psutil.Process | None:
    """The continuous run's process, from the pid it records in its run tags."""
    for record in _runs(home, table):
        pid = record.dagster_run.tags.get("vectorsync/pid")
        if pid and record.dagster_run.status == dg.DagsterRunStatus.STARTED:
            return psutil.Process(int(pid))
    return None


def _phase(ctx: Context, base_url: str, continuous: bool, work: Path, commit_times: bool) -> dict[str, Any]:
    from orchestration.local_dagster import LocalDagster

    p = ctx.params
    name = "bench_fresh_continuous" if continuous else "bench_fresh_sensor"
    tables_dir = work / name / "tables"
    source = _declare(ctx, tables_dir, name, base_url, continuous)
    home = work / name / "home"
    conn = ctx.connect()
    store = sql.Identifier(name, f"{name}_embeddings_store")
    began = time.monotonic()
    with LocalDagster(ctx.url, home, tables_dir, env={KEY_ENV: "sk-bench"}, port=free_port()) as dagster:
        if continuous:
            _wait(lambda: any(r.dagster_run.status == dg.DagsterRunStatus.STARTED for r in _runs(home, name)),
                  240, "the continuous run starting")
        else:
            # The install left sweep markers in the change log: the sensor's first run for them
            # shows that the daemon, the code server and the sensor are all up.
            _wait(lambda: bool(_runs(home, name)), 240, "the change sensor's first run")
        ctx.log(f"stack up after {time.monotonic() - began:.0f}s")
        ctx.log(f"{'continuous' if continuous else 'sensor'} path: inserting {p['rate']}/s for {p['seconds']}s")
        interval = 1.0 / p["rate"]
        total = int(p["rate"] * p["seconds"])
        stack, postmaster = psutil.Process(dagster.process.pid), postmaster_of(ctx.url)
        cpu_before = cpu_snapshot(stack, postmaster)
        threads_before, sessions_before = thread_times(stack), sessions_and_commits(conn)
        started = time.monotonic()
        for i in range(total):
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, clock_timestamp())").format(source),
                         (i, f"row {i} inserted for the freshness benchmark, at a steady rate"))
        insert_seconds = time.monotonic() - started
        achieved = total / insert_seconds
        # CPU while the rows came in (PostgreSQL's includes the inserts themselves).
        cpu_after = cpu_snapshot(stack, postmaster)
        threads_after, sessions_after = thread_times(stack), sessions_and_commits(conn)
        cpu_inserting = by_role(cpu_used(cpu_before, cpu_after))
        roles = {pid: role for (pid, role) in cpu_after if pid > 0 and not role.startswith("postgres")}
        # In % of a core: which thread of which process (the run worker's loop, its event
        # reporter, the daemon's daemons) used the CPU while rows came in.
        threads_used = dict(list(cpu_by_thread(threads_before, threads_after, insert_seconds, roles).items())[:20])
        sessions = {db: {"new sessions": after[0] - sessions_before.get(db, (0, 0))[0],
                         "commits": after[1] - sessions_before.get(db, (0, 0))[1]}
                    for db, after in sessions_after.items() if db in ("dagster", "postgres")}
        ctx.log(f"CPU seconds over the {insert_seconds:.0f}s of inserts, by role: {cpu_inserting}")
        ctx.log(f"  by thread (% of a core): {threads_used}")
        ctx.log(f"  PostgreSQL sessions opened and commits, by database: {sessions}")
        try:
            _wait(lambda: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(store)).fetchone()[0] >= total,
                  120, "every inserted row reaching the store")
        except RuntimeError as exc:
            ctx.log(str(exc))
        # Commit to commit: the source row's insert and the store row's write, each by the commit
        # timestamp of the transaction that wrote it (its xmin). Without track_commit_timestamp, the
        # older measure: the write transaction's start (embedded_at) - the insert's clock_timestamp().
        rows = conn.execute(
            sql.SQL("""SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin) - pg_xact_commit_timestamp(s.xmin)),
                              extract(epoch FROM e.embedded_at - s.inserted_at)
                       FROM {} s JOIN {} e ON e.id = s.id AND e.chunk_seq = 0""" if commit_times else
                    """SELECT NULL::float8, extract(epoch FROM e.embedded_at - s.inserted_at)
                       FROM {} s JOIN {} e ON e.id = s.id AND e.chunk_seq = 0""").format(source, store)
        ).fetchall()
        lags = [float(c) for c, _ in rows] if commit_times else [float(o) for _, o in rows]
        start_lags = [float(o) for _, o in rows]
        missing = total - len(lags)
        idle_cpu = None
        if continuous:
            worker = _continuous_process(home, name)
            try:
                if worker is not None:
                    before = worker.cpu_times()
                    time.sleep(p["idle_seconds"])
                    after = worker.cpu_times()
                    idle_cpu = 100.0 * ((after.user + after.system) - (before.user + before.system)) / p["idle_seconds"]
            except psutil.NoSuchProcess:
                # Reported as missing, with the runs' statuses, rather than ending the benchmark.
                ctx.log(f"the continuous run's process {worker.pid} ended while idle; runs: "
                        f"{[(r.dagster_run.run_id[:8], r.dagster_run.status.value) for r in _runs(home, name)]}; "
                        f"log: {dagster.log_tail(1500)}")
        else:
            time.sleep(25)  # the last change run lingers, then ends by itself
        records = _runs(home, name)
    conn.close()
    forget_runs(home)
    starts = [r.start_time - r.create_timestamp.timestamp() for r in records if r.start_time]
    return {"lags": lags, "start_lags": start_lags, "missing": missing, "rate": achieved, "runs": len(records),
            "idle_cpu": idle_cpu, "run_start_seconds": starts, "cpu_inserting": cpu_inserting,
            "cpu_by_thread": threads_used, "sessions": sessions,
            "insert_seconds": insert_seconds}


def run(ctx: Context) -> Result:
    work = scratch_dir("vs-bench-fresh-")
    commit_times = ensure_commit_timestamps(ctx.url)
    if ctx.params.get("capture", "triggers") == "logical":
        from orchestration.database import ensure_server_settings

        if not ensure_server_settings(ctx.url, {"wal_level": "logical"}):
            raise RuntimeError("capture=logical needs wal_level = logical on the server of DATABASE_URL")
    what = "commit to commit" if commit_times else "insert to embedding"
    if not commit_times:
        ctx.log("track_commit_timestamp is off on this server (DATABASE_URL): measuring insert to write start")
    with openai_server(32, 0.0) as (base_url, _):
        sensor = _phase(ctx, base_url, continuous=False, work=work, commit_times=commit_times)
        continuous = _phase(ctx, base_url, continuous=True, work=work, commit_times=commit_times)
    measures = []
    percentiles: dict[str, Any] = {}
    for label, phase, p50_target, p95_target in (
        ("sensor path", sensor, "<= 15.0", "<= 30.0"), ("continuous mode", continuous, "", "<= 0.25")
    ):
        lags = phase["lags"] + [float("inf")] * phase["missing"]
        p50, p95 = float(np.percentile(lags, 50)), float(np.percentile(lags, 95))
        older = phase["start_lags"] + [float("inf")] * phase["missing"]
        percentiles[label] = {
            f"{what}": {q: round(float(np.percentile(lags, q)), 4) for q in (50, 95, 99, 100)},
            "insert clock to write start (the earlier measure)":
                {q: round(float(np.percentile(older, q)), 4) for q in (50, 95, 99, 100)},
        }
        ctx.log(f"{label}: {what} p50 {p50:.3f}s, p95 {p95:.3f}s over {len(lags)} rows at {phase['rate']:.1f}/s, "
                f"{phase['runs']} runs, {phase['missing']} missing; {percentiles[label]}")
        measures.append(Measure(f"{label}: {what}, p50", "s", [p50], target=p50_target))
        measures.append(Measure(f"{label}: {what}, p95", "s", [p95], target=p95_target))
    if continuous["idle_cpu"] is not None:
        measures.append(Measure("continuous run idle CPU", "% of a core", [continuous["idle_cpu"]], target="< 2"))
    for label, phase in (("sensor path", sensor), ("continuous mode", continuous)):
        roles = phase["cpu_inserting"]
        pg = sum(v for k, v in roles.items() if k.startswith("postgres"))
        measures.append(Measure(f"{label}: PostgreSQL CPU over the {phase['insert_seconds']:.0f} s of inserts",
                                "s", [round(pg, 2)]))
        measures.append(Measure(f"{label}: Dagster stack CPU over the {phase['insert_seconds']:.0f} s of inserts",
                                "s", [round(sum(roles.values()) - pg, 2)]))
    if sensor["run_start_seconds"]:
        measures.append(Measure("change run start cost (queued to started)", "s",
                                sensor["run_start_seconds"]))
    targets = {m.label: m.target for m in measures}

    def meets(m: Measure) -> bool:
        limit = float(targets[m.label].split()[-1])
        return m.subject_median < limit if targets[m.label].startswith("<") and "=" not in targets[m.label] \
            else m.subject_median <= limit

    return Result(
        measures=measures, params=ctx.params,
        extra={"percentiles": percentiles, "commit_timestamps": commit_times,
               "cpu_seconds_while_inserting": {"sensor": sensor["cpu_inserting"],
                                               "continuous": continuous["cpu_inserting"]},
               "percent_of_a_core_by_thread_while_inserting": {"sensor": sensor["cpu_by_thread"],
                                                               "continuous": continuous["cpu_by_thread"]},
               "postgres_sessions_and_commits_while_inserting": {"sensor": sensor["sessions"],
                                                                 "continuous": continuous["sessions"]},
               "sensor_runs": sensor["runs"], "continuous_runs": continuous["runs"],
               "sensor_rate": sensor["rate"], "continuous_rate": continuous["rate"],
               "missing": {"sensor": sensor["missing"], "continuous": continuous["missing"]}},
        notes=["one round per path (each is minutes long); percentiles are over every inserted row",
               "lag = pg_xact_commit_timestamp(store row's xmin) - pg_xact_commit_timestamp(source row's xmin)"
               if commit_times else
               "lag = store.embedded_at (the write transaction's start) - the insert's clock_timestamp()",
               "both paths run under stock `dagster dev` (webserver, daemon, code server; runs launched by "
               "the default run launcher) on this machine, one after the other"],
    ).check(meets)


BENCHMARK = Benchmark(
    name="f", title="freshness through the Dagster daemon: sensor path and continuous mode",
    target="commit to commit: sensor p50 <= 15 s, p95 <= 30 s; continuous p95 <= 0.25 s; idle run < 2% of a core",
    run=run,
    defaults={"rate": 20, "seconds": 120, "idle_seconds": 30, "capture": "triggers"},
    quick={"seconds": 20, "idle_seconds": 10},
)
