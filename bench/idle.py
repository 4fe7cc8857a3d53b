"""idle. What the whole vectorsync stack costs while nothing changes: stock `dagster dev` (webserver,
daemon, code server) with its runs, and PostgreSQL, for 1 and for N tables, on the sensor path and
in continuous mode. After the stack is up (the UI answers, and in continuous mode every table's run
has started) it settles without writes, then the CPU of every process of the stack's process group
and of the PostgreSQL server (its postmaster, background processes and backends, those that ended
in the window included) is read over a window, in % of one core, by role. The busiest Dagster
processes are then sampled with py-spy, to say which functions take their CPU."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml
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
    forget_runs,
    free_port,
    postmaster_of,
    scratch_dir,
    sessions_and_commits,
    thread_times,
    thread_names,
    write_component,
)
from bench.remote import openai_server

KEY_ENV = "VECTORSYNC_BENCH_NO_KEY"
PROFILES_DIR = Path(__file__).resolve().parent / "results" / "idle"


def _graphql_up(port: int) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": "{ version }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return bool(json.loads(response.read()).get("data", {}).get("version"))
    except OSError:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1.0)
    raise RuntimeError(f"{what} did not happen within {timeout:.0f}s")


def _declare_tables(ctx: Context, tables_dir: Path, prefix: str, count: int, continuous: bool, base_url: str) -> list[str]:
    from assets.declarations import load_declarations
    from assets.install import install

    names = [f"{prefix}_{i:02d}" for i in range(count)]
    conn = ctx.connect()
    for name in names:
        create_source(conn, name, "id int PRIMARY KEY, body text")
        write_component(tables_dir, {
            "name": name, "source": f"{name}.docs", "columns": ["body"], "buckets": 16, "continuous": continuous,
            "provider": {"kind": "openai", "model": "bench-idle", "dimensions": 32, "base_url": base_url,
                         "api_key_env": KEY_ENV},
        })
    specs = load_declarations(tables_dir)
    install(conn, specs)
    # Empty tables, and no sweep markers left by the install: nothing for a change run to do.
    for spec, _ in specs:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier("vectorsync", spec.queue_name)))
    conn.close()
    return names


@contextlib.contextmanager
def _instance_settings(runs: int, overrides: dict[str, Any]) -> Iterator[None]:
    """The instance that LocalDagster writes allows 4 runs at once, fewer than one continuous run
    per table for 10 tables; for this benchmark it allows `runs`, so that every table follows.
    `overrides` (the `instance` parameter) are merged into dagster.yaml, to measure what a
    setting would save: e.g. -o 'idle.instance={"run_coordinator": {"config":
    {"dequeue_interval_seconds": 5}}}'."""
    import orchestration.local_dagster as local

    original = local.prepare_instance

    def merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    def prepare(url: str, home: Path | None = None) -> Path:
        home = original(url, home)
        path = home / "dagster.yaml"
        config = yaml.safe_load(path.read_text())
        config["concurrency"]["runs"]["max_concurrent_runs"] = max(
            runs, config["concurrency"]["runs"]["max_concurrent_runs"])
        merge(config, overrides)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return home

    local.prepare_instance = prepare
    try:
        yield
    finally:
        local.prepare_instance = original


def _started_runs(home: Path, names: list[str]) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        return [r for r in runs if r.tags.get("vectorsync/table") in names]


def _run_counts(home: Path) -> dict[str, int]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return dict(Counter(r.status.value for r in instance.get_runs()))


def _profile(pids: list[int], seconds: int, out: Path) -> dict[int, dict[str, Any]]:
    """py-spy on each pid at once for `seconds`: the functions its busy threads were in, as the
    share of samples where each is the innermost frame (self) and anywhere on the stack (total),
    and by part of Dagster (which daemon, which code-server call). A sample is taken only of a
    thread that is running (py-spy leaves idle threads out), so samples / (rate x seconds) is
    roughly the share of a core the process's Python used."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {pid: {"error": "py-spy is not installed in this environment"} for pid in pids}
    processes = {}
    for pid in pids:
        raw = out / f"py-spy-{pid}.txt"
        processes[pid] = (raw, subprocess.Popen(
            [str(spy), "record", "-d", str(seconds), "-r", str(PROFILE_RATE), "-f", "raw", "-o", str(raw),
             "--pid", str(pid), "--nonblocking"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    found: dict[int, dict[str, Any]] = {}
    for pid, (raw, process) in processes.items():
        output, _ = process.communicate(timeout=seconds + 60)
        if process.returncode != 0 or not raw.exists():
            found[pid] = {"error": output.strip()[-400:]}
            continue
        found[pid] = _read_profile(raw, seconds)
    return found


def _read_profile(raw: Path, seconds: float) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    connecting: Counter[str] = Counter()  # samples opening a PostgreSQL connection, by part
    samples = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames and frames[-1].startswith(WAITS):
            waiting += count
            continue
        samples += count
        if frames:
            self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
        part = next((m.group(0) for f in frames if (m := PART.match(f))), "other")
        parts[part] += count
        if any(f.startswith("connect (psycopg2") for f in frames):
            connecting[part] += count

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(f, round(100 * c / samples, 1)) for f, c in counter.most_common(n)] if samples else []

    return {"samples": samples, "waiting_samples_left_out": waiting,
            "busy_share_of_a_core": round(samples / (PROFILE_RATE * seconds), 4),
            "by_part": share(parts, 15), "opening_a_connection_by_part": share(connecting, 15),
            "self": share(self_counts, 15), "total": share(total_counts, 40),
            "raw": str(raw)}


# The outermost frame that says which part of Dagster a sample belongs to: one of the daemon's
# daemons (each a thread: SensorDaemon, QueuedRunCoordinatorDaemon, MonitoringDaemon, ...), a
# code-server call (DagsterApiServer.<method>), or a sensor's own function.
PART = re.compile(r"^((?!DagsterDaemon\.|IntervalDaemon\.)\w+Daemon\.\w+|DagsterApiServer\.\w+|"
                  r"\w*Watcher\w*\.\w+|_sensor \(orchestration/\w+\.py)")
PROFILE_RATE = 250
# py-spy leaves idle threads out, but not all of them: a thread that wakes every 0.1 s to wait
# again (grpc's wait_for_termination, Dagster's interval loops) is often caught "running" in a
# wait. Samples whose innermost frame is one of these waits are counted apart, as idle.
WAITS = ("Condition.wait ", "Event.wait ", "_serve (grpc/", "_channel_managed_call_management ", "_wait_once ",
         "Thread.join ", "sleep ", "select ", "_worker (concurrent/futures/thread.py:81)",
         "_UnaryUnaryMultiCallable._blocking (grpc/_channel.py:1152)")


def _connections(processes: dict[int, str], seconds: int, out: Path) -> dict[str, Any]:
    """New connections to PostgreSQL per minute, by role: connect() calls on PostgreSQL's socket,
    counted with strace for `seconds` (after the CPU window: strace slows what it traces)."""
    if not shutil.which("strace") or not processes:
        return {"error": "strace is not available"}
    log = out / "connects.txt"
    command = ["timeout", "-s", "INT", str(seconds), "strace", "-f", "-qq", "-e", "trace=connect",
               "-o", str(log)]
    for pid in processes:
        command += ["-p", str(pid)]
    threads: dict[int, int] = {}
    for pid in processes:
        with contextlib.suppress(psutil.Error):
            threads.update({t.id: pid for t in psutil.Process(pid).threads()})
    names = thread_names(list(processes))
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if not log.exists():
        return {"error": (result.stderr or "no output").strip()[-400:]}
    counts: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        if "PGSQL" not in line and ":5432" not in line:
            continue
        tid = int(line.split()[0])
        pid = threads.get(tid)
        if pid is None:
            with contextlib.suppress(OSError, ValueError, StopIteration):
                status = Path(f"/proc/{tid}/status").read_text().splitlines()
                pid = int(next(s for s in status if s.startswith("Tgid:")).split()[1])
        role = processes.get(pid, f"pid {pid} (a child)")
        # The daemon runs each of its daemons in a thread of its own ("dagster-daemon-SENSOR").
        counts[f"{role}: {names[tid]}" if tid in names else role] += 1
    return {who: round(60 * n / seconds, 1) for who, n in counts.most_common()}


def _short(frame: str) -> str:
    """`function (path/to/module.py:line)` -> `function (module.py:line)`, site-packages paths cut."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


def _configuration(ctx: Context, base_url: str, work: Path, tables: int, continuous: bool, index: int) -> dict[str, Any]:
    from orchestration.local_dagster import LocalDagster

    from bench.helm_layout import HelmLayout

    p = ctx.params
    stack_class = HelmLayout if p["layout"] == "helm" else LocalDagster
    mode = "continuous" if continuous else "sensor"
    label = f"{mode}, {tables} table{'s' if tables > 1 else ''}"
    root = work / f"{mode}_{tables}_{index}"
    tables_dir, home = root / "tables", root / "home"
    # py-spy's and strace's raw output outlive the benchmark's temporary home, for a closer look.
    out = PROFILES_DIR / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{mode}-{tables}"
    out.mkdir(parents=True, exist_ok=True)
    names = _declare_tables(ctx, tables_dir, f"bench_idle_{mode[0]}{tables}", tables, continuous, base_url)
    port = free_port()
    began = time.monotonic()
    with _instance_settings(tables + 4, p["instance"]), \
            stack_class(ctx.url, home, tables_dir, env={KEY_ENV: "sk-bench"}, port=port) as dagster:
        _wait(lambda: _graphql_up(port), 300, "the webserver answering")
        if continuous:
            _wait(lambda: len(_started_runs(home, names)) >= tables, 600, f"{tables} continuous runs starting")
        up = time.monotonic() - began
        ctx.log(f"{label}: stack up after {up:.0f}s; settling {p['settle_seconds']}s")
        time.sleep(p["settle_seconds"])
        stack, postmaster = psutil.Process(dagster.process.pid), postmaster_of(ctx.url)
        with ctx.connect() as conn:
            sessions_before = sessions_and_commits(conn)
        before = cpu_snapshot(stack, postmaster)
        threads_before = thread_times(stack)
        started = time.monotonic()
        time.sleep(p["seconds"])
        after = cpu_snapshot(stack, postmaster)
        threads_after = thread_times(stack)
        window = time.monotonic() - started
        with ctx.connect() as conn:
            sessions_after = sessions_and_commits(conn)
        load = list(psutil.getloadavg())
        used = cpu_used(before, after)
        percent = {role: round(100 * s / window, 2) for role, s in by_role(used).items()}
        pg = round(sum(v for k, v in percent.items() if k.startswith("postgres")), 2)
        total = round(sum(percent.values()), 2)
        per_process = sorted(
            ((pid, role, round(100 * s / window, 2)) for (pid, role), s in used.items()
             if pid > 0 and not role.startswith("postgres")),
            key=lambda x: -x[2])
        commands = {}
        for pid, role, _ in per_process:
            with contextlib.suppress(psutil.Error):
                commands[pid] = " ".join(psutil.Process(pid).cmdline())[:200]
        busiest = [pid for pid, _, share in per_process[: p["profile_processes"]] if share > 0]
        by_thread = cpu_by_thread(threads_before, threads_after, window, {pid: role for pid, role, _ in per_process})
        ctx.log(f"{label}: {total}% of a core in all ({pg}% PostgreSQL) over {window:.0f}s, load {load}; "
                f"by role {percent}")
        ctx.log(f"  by thread (% of a core): {dict(list(by_thread.items())[:14])}")
        profiles: dict[int, dict[str, Any]] = {}
        connects: dict[str, Any] = {}
        if p["profile_seconds"]:
            traced = {pid: role for pid, role, _ in per_process if "log capture" not in role}
            # One after the other: a process stopped at each of its system calls by strace would
            # not look to py-spy the way it runs.
            profiles = _profile(busiest, p["profile_seconds"], out)
            connects = _connections(traced, p["profile_seconds"], out)
            ctx.log(f"  new PostgreSQL connections per minute, by role (strace): {connects}")
        for pid, found in profiles.items():
            role = next(r for q, r, _ in per_process if q == pid)
            ctx.log(f"  py-spy {role} ({pid}): {json.dumps({k: v for k, v in found.items() if k not in ('total', 'raw')})}")
        runs = _run_counts(home)
    forget_runs(home)
    sessions = {d: {"sessions_per_minute": round(60 * (sessions_after[d][0] - sessions_before.get(d, (0, 0))[0]) / window, 1),
                    "commits_per_minute": round(60 * (sessions_after[d][1] - sessions_before.get(d, (0, 0))[1]) / window, 1)}
                for d in sessions_after}
    return {
        "label": label, "tables": names, "stack_up_seconds": round(up, 1), "window_seconds": round(window, 1),
        "percent_of_a_core": {"total": total, "postgres": pg, "dagster and runs": round(total - pg, 2),
                              "by_role": percent},
        "per_process": [{"pid": pid, "role": role, "percent": share, "command": commands.get(pid, "")}
                        for pid, role, share in per_process],
        "postgres_sessions_and_commits": sessions, "runs": runs, "load_average": load,
        "new_postgres_connections_per_minute": connects,
        "percent_of_a_core_by_thread": by_thread,
        "py_spy": {str(pid): found for pid, found in profiles.items()},
    }


def run(ctx: Context) -> Result:
    p = ctx.params
    work = scratch_dir("vs-bench-idle-")
    # pooled_storage=true: the instance names the opt-in pooled storage classes
    # (orchestration/instance.py, POOLED_STORAGE_ENV), as a user who sets the variable gets.
    from orchestration.instance import POOLED_STORAGE_ENV

    if p.get("pooled_storage"):
        os.environ[POOLED_STORAGE_ENV] = "1"
    else:
        os.environ.pop(POOLED_STORAGE_ENV, None)
    configurations: list[dict[str, Any]] = []
    errors: list[str] = []
    with openai_server(32, 0.0) as (base_url, _):
        for continuous in [mode == "continuous" for mode in p["modes"]]:
            for index, tables in enumerate(p["tables_list"] or (1, p["tables"])):
                try:
                    configurations.append(_configuration(ctx, base_url, work, tables, continuous, index))
                except Exception as exc:  # noqa: BLE001 - the other configurations' figures still count
                    ctx.log(f"{'continuous' if continuous else 'sensor'}, {tables} tables: {type(exc).__name__}: {exc}")
                    errors.append(f"{'continuous' if continuous else 'sensor'}, {tables} tables: {exc}")
    measures: list[Measure] = []
    for mode in ("sensor", "continuous"):
        found = [c for c in configurations if c["label"].startswith(mode)]
        # Rounds of one configuration (tables_list=[1, 1, 1]) give one measure with their median.
        by_count: dict[int, list[dict[str, Any]]] = {}
        for c in found:
            by_count.setdefault(len(c["tables"]), []).append(c)
        totals = {n: [c["percent_of_a_core"]["total"] for c in cs] for n, cs in by_count.items()}
        if 1 in totals:
            measures.append(Measure(f"{mode}: whole stack idle, 1 table", "% of a core", totals[1], target="<= 5"))
        for n in sorted(t for t in totals if t > 1):
            if 1 in totals:
                per_table = (statistics.median(totals[n]) - statistics.median(totals[1])) / (n - 1)
                measures.append(Measure(f"{mode}: each further table (1 -> {n} tables)", "% of a core",
                                        [round(per_table, 2)], target="<= 0.5"))
        for n, cs in sorted(by_count.items()):
            label = cs[0]["label"]
            # New sessions are what costs PostgreSQL most here, and unlike CPU they do not depend
            # on what else the machine runs.
            measures.append(Measure(f"{label}: new PostgreSQL sessions", "per minute", [round(sum(
                d["sessions_per_minute"] for d in c["postgres_sessions_and_commits"].values()), 1) for c in cs]))
            measures.append(Measure(f"{label}: PostgreSQL", "% of a core", [c["percent_of_a_core"]["postgres"] for c in cs]))
            for role in ("daemon", "code server", "code server proxy", "webserver", "run worker", "dagster dev"):
                shares = [c["percent_of_a_core"]["by_role"][role] for c in cs if role in c["percent_of_a_core"]["by_role"]]
                if shares:
                    measures.append(Measure(f"{label}: {role}", "% of a core", shares))
    targets = {"<= 5": 5.0, "<= 0.5": 0.5}
    return Result(
        measures=measures, params=p,
        extra={"configurations": configurations, "errors": errors},
        notes=[("the Helm chart's processes (dagster api grpc, dagster-daemon, dagster-webserver; no dagster dev "
                "proxy; bench/helm_layout.py)" if p["layout"] == "helm" else
                "stock `dagster dev` (webserver, daemon, code server behind dev's proxy)")
               + f"; default run launcher; settled "
               f"{p['settle_seconds']} s after the webserver answered (and every continuous run started), "
               f"then CPU over {p['seconds']} s without writes; one round per entry of tables_list (1 and "
               f"{p['tables']} tables unless given), a measure the median of its rounds",
               "PostgreSQL = the postmaster, its background processes and its backends, those that ended "
               "within the window included (the postmaster's children times)",
               f"the instance allows tables + 4 runs at once (LocalDagster's dagster.yaml allows 4, fewer "
               f"than {n} continuous runs)",
               "the machine is shared: see load_average per configuration",
               *([f"dagster.yaml changed for this measure: {p['instance']}"] if p["instance"] else [])],
    ).check(lambda m: m.subject_median <= targets[m.target])


BENCHMARK = Benchmark(
    name="idle", title="idle CPU of the whole stack (Dagster and PostgreSQL), 1 and 10 tables, both modes",
    target="<= 5% of a core for one table; <= +0.5% per further table; sensor path and continuous mode",
    run=run,
    defaults={"tables": 10, "settle_seconds": 60, "seconds": 60, "profile_seconds": 20, "profile_processes": 3,
              "modes": ["sensor", "continuous"], "instance": {}, "pooled_storage": False,
              # "dev": `dagster dev`; "helm": the Helm chart's processes (bench/helm_layout.py)
              "layout": "dev", "tables_list": None},
    quick={"tables": 3, "settle_seconds": 15, "seconds": 20, "profile_seconds": 5},
    rounds=1,
)
