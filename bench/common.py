"""What every benchmark shares: the registry entry, the embedded database, table set-up, timing
rounds and the shape of a result."""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import yaml
from psycopg import sql

from assets.catalog import ResolvedTable, resolve
from assets.install import install
from assets.providers.base import EmbeddingProvider, Embeddings
from assets.spec import TableSpec, parse_spec


@dataclass(frozen=True)
class Benchmark:
    """One benchmark, found by bench/__main__.py in any module of this package that defines
    `BENCHMARK`. `defaults` are the issue's sizes; `quick` overrides them for a smoke check;
    `rounds` per side, more for a quick benchmark whose rounds vary more than its target's margin."""

    name: str
    title: str
    target: str
    run: Callable[[Context], Result]
    defaults: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3


@dataclass
class Context:
    url: str
    rounds: int
    params: dict[str, Any]
    quick: bool

    def connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute("SET application_name = 'vectorsync-bench'")
        return conn

    def log(self, message: str) -> None:
        print(f"  {time.strftime('%H:%M:%S')} {message}", flush=True)


@dataclass
class Measure:
    """One compared figure: the subject's samples, its baseline's, and whether the target holds."""

    label: str
    unit: str
    subject: list[float]
    baseline: list[float] | None = None
    target: str = ""
    met: bool | None = None
    # "subject/baseline" or "baseline/subject": written so the target reads naturally.
    ratio_of: str = "subject/baseline"

    @property
    def subject_median(self) -> float:
        return statistics.median(self.subject)

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline) if self.baseline else None

    @property
    def ratio(self) -> float | None:
        base = self.baseline_median
        if base is None:
            return None
        if self.ratio_of == "subject/baseline":
            return self.subject_median / base if base else None
        return base / self.subject_median if self.subject_median else None

    @property
    def paired_ratio_median(self) -> float | None:
        """The median of each round's own ratio: on a shared machine a busy neighbour slows both
        sides of one round alike, so this is steadier than the ratio of the medians."""
        if not self.baseline or len(self.baseline) != len(self.subject):
            return None
        pairs = zip(self.subject, self.baseline)
        if self.ratio_of == "subject/baseline":
            return statistics.median(s / b for s, b in pairs if b)
        return statistics.median(b / s for s, b in pairs if s)

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label, "unit": self.unit, "subject_median": self.subject_median,
            "baseline_median": self.baseline_median, "ratio": self.ratio, "ratio_of": self.ratio_of,
            "paired_ratio_median": self.paired_ratio_median,
            "target": self.target, "met": self.met, "subject_samples": self.subject,
            "baseline_samples": self.baseline,
        }


@dataclass
class Result:
    measures: list[Measure]
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, predicate: Callable[[Measure], bool]) -> Result:
        """Judge every measure that has a target."""
        for m in self.measures:
            if m.target:
                m.met = bool(predicate(m))
        return self

    @property
    def met(self) -> bool | None:
        verdicts = [m.met for m in self.measures if m.met is not None]
        return all(verdicts) if verdicts else None


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = action()
    return time.perf_counter() - started, value


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# Tables ---------------------------------------------------------------------------------------

def create_source(conn: psycopg.Connection, schema: str, columns_sql: str, table: str = "docs") -> None:
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (" + columns_sql + ")").format(sql.Identifier(schema, table)))


def declare(conn: psycopg.Connection, schema: str, table: str = "docs", **fields: Any) -> tuple[TableSpec, ResolvedTable]:
    """Declare and install an embedding table over schema.table, as `vectorsync install` does."""
    fields.setdefault("name", schema)
    spec = parse_spec({"source": {"schema": schema, "table": table}, **fields}, "bench")
    install(conn, [(spec, "bench")])
    return spec, resolve(conn, spec, "bench")


def write_component(tables_dir: Path, declaration: dict[str, Any]) -> Path:
    """Declare a table the way users do: an EmbeddingTable component, `<tables_dir>/<name>/defs.yaml`."""
    from assets.declarations import COMPONENT_TYPE

    folder = tables_dir / declaration["name"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "defs.yaml"
    path.write_text(yaml.safe_dump({"type": COMPONENT_TYPE, "attributes": declaration}, sort_keys=False))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_commit_timestamps(url: str) -> bool:
    """Turn on track_commit_timestamp, so that pg_xact_commit_timestamp(xmin) gives each row's
    commit time (the embedded server is restarted with it; see ensure_server_settings)."""
    from orchestration.database import ensure_server_settings

    return ensure_server_settings(url, {"track_commit_timestamp": "on"})


# Processes: who uses the CPU -------------------------------------------------------------------

RUN_WORKER = "run worker"


def dagster_role(process: psutil.Process) -> str:
    """What a process of a stock `dagster dev` / `dagster-daemon` stack is, by its command line
    (up to its options: an --instance-ref's JSON names other parts of the stack)."""
    args = process.cmdline()
    command = " ".join(args[: next((i for i, a in enumerate(args) if a.startswith("--")), len(args))])
    if "execute_run" in command or "execute_step" in command or "multiprocessing" in command:
        return RUN_WORKER
    if command.startswith("tail -F") or "watch_orphans" in command:
        return "run worker's log capture"
    if "dagster-daemon" in command or "dagster._daemon" in command or "dagster_daemon" in command:
        return "daemon"
    if "dagster-webserver" in command or "dagster_webserver" in command:
        return "webserver"
    if "api grpc" in command:
        return "code server"
    if "code-server" in command:
        return "code server proxy"
    if " dev " in f"{command} ":
        return "dagster dev"
    return "other: " + " ".join(process.cmdline()[:3])[:60]


def postgres_role(process: psutil.Process) -> str:
    """Which part of PostgreSQL a child of the postmaster is: a client's backend, or one of the
    server's own background processes (checkpointer, WAL writer, autovacuum, ...)."""
    title = " ".join(process.cmdline())
    background = ("checkpointer", "background writer", "walwriter", "autovacuum", "logical replication",
                  "io worker", "archiver", "stats", "walsummarizer", "startup")
    return "postgres: background" if any(b in title for b in background) else "postgres: live backends"


def postmaster_of(url: str) -> psutil.Process | None:
    """The postmaster of the server at `url`, when it runs on this machine: the parent of a backend."""
    with psycopg.connect(url, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # While the connection is open: its backend ends with it.
        try:
            return psutil.Process(backend).parent()
        except psutil.Error:
            return None


def cpu_snapshot(root: psutil.Process, postmaster: psutil.Process | None) -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) used so far, keyed by (pid, role): every process of the group
    under `root` and of PostgreSQL. Processes that already ended (a run worker, a backend that
    served one connection) count under their parent's children times, with the role they had:
    a code server's ended children are run workers, the postmaster's are backends and autovacuum
    workers (keyed by the parent's pid negated). The difference of two snapshots (cpu_used) is
    what each role used in between."""
    now: dict[tuple[int, str], float] = {}

    def add(process: psutil.Process, role: str, reaped_role: str | None) -> None:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return
        now[(process.pid, role)] = now.get((process.pid, role), 0.0) + times.user + times.system
        if reaped_role is not None:
            # Keyed by -pid: the time of this process's ended children, not of the process.
            now[(-process.pid, reaped_role)] = times.children_user + times.children_system

    processes = [root]
    try:
        processes += root.children(recursive=True)
    except psutil.Error:
        pass
    for process in processes:
        try:
            role = dagster_role(process)
        except psutil.Error:
            continue
        reaped = RUN_WORKER if role == "code server" else f"{role} (ended children)"
        add(process, role, reaped)
    if postmaster is not None:
        add(postmaster, "postgres: postmaster", "postgres: ended backends and autovacuum workers")
        try:
            children = postmaster.children()
        except psutil.Error:
            children = []
        for child in children:
            try:
                add(child, postgres_role(child), None)
            except psutil.Error:
                pass
    return now


def cpu_used(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]) -> dict[tuple[int, str], float]:
    """CPU seconds per (pid, role) between two snapshots; a process seen only in `before` ended
    in between, and its time moved to its parent's ended children."""
    used = {key: seconds - before.get(key, 0.0) for key, seconds in after.items()}
    for key, seconds in before.items():
        if key not in after:
            used[key] = -seconds
    return used


def by_role(used: dict[tuple[int, str], float]) -> dict[str, float]:
    roles: dict[str, float] = {}
    for (_, role), seconds in used.items():
        roles[role] = roles.get(role, 0.0) + seconds
    return {role: round(seconds, 3) for role, seconds in sorted(roles.items(), key=lambda kv: -kv[1])
            if abs(seconds) >= 0.0005}


def forget_runs(home: Path) -> None:
    """Delete every run of the Dagster instance in `home` once its stack has stopped: the runs it
    killed stay STARTED otherwise, and the next benchmark's daemon (same database) would keep
    checking on them."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        for run in instance.get_runs():
            instance.delete_run(run.run_id)


def sessions_and_commits(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    """Per database: sessions opened so far and transactions committed."""
    # Statistics are cached per transaction; autocommit reads fresh ones.
    return {d: (s, x) for d, s, x in conn.execute(
        "SELECT datname, sessions, xact_commit FROM pg_stat_database WHERE datname IS NOT NULL")}


def thread_times(stack: psutil.Process) -> dict[int, dict[int, float]]:
    """CPU seconds of each thread of each process in the stack's group."""
    times: dict[int, dict[int, float]] = {}
    for process in [stack, *stack.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times[process.pid] = {t.id: t.user_time + t.system_time for t in process.threads()}
    return times


def cpu_by_thread(before: dict[int, dict[int, float]], after: dict[int, dict[int, float]], window: float,
               roles: dict[int, str]) -> dict[str, float]:
    """% of a core per named thread over the window ("daemon: dagster-daemon-SENSOR"); a thread
    that ended within the window is not in it (its process's total still is)."""
    names = thread_names([pid for pid in after if pid in roles and "log capture" not in roles[pid]])
    shares: dict[str, float] = {}
    for pid, threads in after.items():
        role = roles.get(pid, str(pid))
        for tid, seconds in threads.items():
            used = seconds - before.get(pid, {}).get(tid, 0.0)
            name = names.get(tid, "a short-lived thread" if tid not in before.get(pid, {}) else f"thread {tid}")
            key = f"{role}: {name}"
            shares[key] = shares.get(key, 0.0) + 100 * used / window
    return {k: round(v, 2) for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def thread_names(pids: list[int]) -> dict[int, str]:
    """Python thread names by OS thread id, from `py-spy dump` (without stopping the process)."""
    spy = Path(sys.executable).parent / "py-spy"
    names: dict[int, str] = {}
    if not spy.exists():
        return names
    for pid in pids:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            dump = subprocess.run([str(spy), "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                                  text=True, timeout=30).stdout
            for match in re.finditer(r'^Thread (\d+) \([^)]*\): "(.*)"$', dump, re.MULTILINE):
                names[int(match.group(1))] = match.group(2)
    return names


def drop_hnsw(conn: psycopg.Connection, spec: TableSpec) -> None:
    conn.execute(
        sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(spec.store_schema, f"{spec.store_name}_hnsw"))
    )


def scratch_dir(prefix: str) -> Path:
    """A folder for one benchmark's files, inside the benchmark's temporary home (removed when the
    command exits), or the system's temporary folder when the home is the user's own."""
    home = os.environ.get("VECTORSYNC_HOME")
    inside = home if home and Path(home).name.startswith("vs-bench-") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=inside))


def reset_store(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """Forget every embedding and pending change of a table, so the next full run embeds all rows."""
    conn.execute(sql.SQL("TRUNCATE {}, {}").format(table.store, table.queue))
    conn.execute("DELETE FROM vectorsync.failures WHERE table_name = %s", (table.spec.name,))
    conn.execute("CHECKPOINT")


def count(conn: psycopg.Connection, relation: sql.Composable) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(relation)).fetchone()[0]


def body_text(i: int, chars: int) -> str:
    """Distinct prose-like text of about `chars` characters: words vary with i, so no two rows
    share a chunk and the embedding cache never short-cuts a benchmark."""
    rng = np.random.default_rng(i)
    words = WORDS[rng.integers(0, len(WORDS), size=chars // 5 + 8)]
    text = f"Document {i}. " + " ".join(words)
    return text[:chars]


WORDS = np.array(
    ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "an", "were", "are", "which", "this", "be", "or", "has", "had", "not", "but", "first", "one", "their", "its", "new", "after", "who", "they", "two", "her", "she", "been", "other", "when", "there", "all", "during", "into", "school", "time", "may", "years", "more", "most", "only", "over", "city", "some", "world", "would", "where", "later", "up", "such", "used", "many", "can", "state", "about", "national", "out", "known", "university", "united", "then", "made", "also", "under", "embedding", "vector", "database", "table", "row", "column", "index", "query", "search", "model", "text", "change", "update", "insert", "delete", "commit", "partition", "bucket", "sensor", "schedule", "backfill", "worker", "provider", "latency"]
)


# A provider that costs nothing ---------------------------------------------------------------

class FreeProvider(EmbeddingProvider):
    """Returns valid unit vectors at no cost, so what is measured is the engine alone."""

    def __init__(self, dimensions: int = 384, batch_size: int = 256) -> None:
        self.dimensions = dimensions
        self.max_inputs_per_request = batch_size
        self.max_tokens_per_request = 10**9
        self.max_tokens_per_input = 10**9
        self.max_concurrency = 1
        rng = np.random.default_rng(0)
        pool = rng.standard_normal((4096, dimensions)).astype(np.float32)
        self.pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
        self.calls = 0
        self.inputs = 0

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t) // 4 + 1 for t in texts]

    def embed(self, texts: Sequence[str]) -> Embeddings:
        self.calls += 1
        self.inputs += len(texts)
        n = len(texts)
        reps = -(-n // len(self.pool))
        vectors = np.tile(self.pool, (reps, 1))[:n] if reps > 1 else self.pool[:n]
        return Embeddings(vectors, n)


def machine_info(url: str) -> dict[str, Any]:
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    except OSError:
        pass
    memory_gb = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    with psycopg.connect(url, autocommit=True) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        pgvector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        settings = dict(conn.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
            (["shared_buffers", "synchronous_commit", "fsync", "max_wal_size", "work_mem"],),
        ).fetchall())
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": memory_gb,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": server,
        "pgvector": pgvector,
        "postgres_settings": settings,
    }


def sync_all(engine: Any, buckets: int, full: bool = True) -> Any:
    """Make every bucket of a table current in this process, the way one run over all partitions
    does: one pass over many buckets when the engine offers it, else bucket by bucket."""
    from assets.engine import SyncStats

    many = getattr(engine, "sync_buckets", None)
    if many is not None:
        total = SyncStats()
        for stats in many(list(range(buckets)), full=full).values():
            total.merge(stats)
        return total
    total = SyncStats()
    for bucket in range(buckets):
        total.merge(engine.sync_bucket(bucket, full=full))
    return total


def load_rows(conn: psycopg.Connection, schema: str, rows: Sequence[tuple[Any, ...]], columns: Sequence[str],
              table: str = "docs") -> None:
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
    ) as copy:
        for row in rows:
            copy.write_row(row)
