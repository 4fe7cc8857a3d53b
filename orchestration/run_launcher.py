"""A run launcher whose runs start in a fraction of a second instead of 3 to 4 s.

Dagster's default launcher asks the code server to spawn each run worker, a new interpreter that
imports Dagster, SQLAlchemy and the provider clients before it does anything: measured at 3.4 to
4.3 s from the run process's start to its first step, plus ~1 s of `import openai` in the step,
for every run (benchmarks f and ui_backfill). Here the daemon keeps one warm parent
(orchestration/warm_worker.py) that has imported those libraries once, and each run worker is a
fork of it running exactly `dagster api execute_run`, the entry point every Dagster launcher
(Docker, Kubernetes, ECS) starts runs with. Until the warm parent is ready, or if it fails, a run
is started the cold way: the same command in a new interpreter.

Run workers are local processes, so the launcher can also answer run monitoring's health checks
(a worker killed with SIGKILL is noticed and its run failed) and stop a run from the UI (SIGINT,
which Dagster's run worker turns into a clean cancellation, as the code server does).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

# The run worker's process, as "pid@start time", so a recycled pid is never taken for it.
WORKER_TAG = "vectorsync/run_worker"
# Imported once by the warm parent: what every run imports and costs seconds (see also
# preload_for_declarations). Never vectorsync's own modules (a run must read the code on disk);
# optional ones that are missing are skipped.
DEFAULT_PRELOAD = [
    "dagster", "dagster._cli", "dagster._cli.api", "dagster._core.execution.api", "dagster_postgres",
    "openai", "psycopg", "pgvector.psycopg", "numpy", "yaml", "psutil",
]
READY_WAIT_SECONDS = 0.0  # a launch never waits for the warm parent to finish importing
REPLY_WAIT_SECONDS = 10.0


class WarmParent:
    """The warm parent process and the two pipes to it. Only the daemon, which launches the runs,
    keeps one (every process that loads the instance builds a launcher: the webserver, code
    servers, the runs themselves)."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self._preload = list(preload)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._request: Any = None
        self._reply: Any = None
        self._ready = False

    def fork(self, execute_run_args: str) -> int | None:
        """The pid of a run worker forked for these arguments, or None when the parent is not
        ready (still importing, or broken: it is then restarted for the next run)."""
        with self._lock:
            try:
                if self._process is None or self._process.poll() is not None:
                    self._start()
                    return None
                if not self._ready:
                    if not _readable(self._reply, READY_WAIT_SECONDS):
                        return None
                    self._ready = self._reply.readline().strip() == b"ready"
                    if not self._ready:
                        self._stop()
                        return None
                self._request.write(execute_run_args + "\n")
                self._request.flush()
                if not _readable(self._reply, REPLY_WAIT_SECONDS):
                    self._stop()
                    return None
                return int(self._reply.readline())
            except (OSError, ValueError):
                self._stop()
                return None

    def start(self) -> None:
        with self._lock:
            if self._process is None:
                self._start()

    def _start(self) -> None:
        self._stop()
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "orchestration.warm_worker", str(request_read), str(reply_write),
                 *self._preload],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._request = os.fdopen(request_write, "w", encoding="utf-8")
        # Unbuffered, so select() on it never misses a line already read into a buffer.
        self._reply = os.fdopen(reply_read, "rb", buffering=0)
        self._ready = False

    def _stop(self) -> None:
        for pipe in (self._request, self._reply):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if self._process is not None and self._process.poll() is None:
            self._process.kill()  # only the parent: its run workers go on
            self._process.wait()
        self._process = self._request = self._reply = None
        self._ready = False


_warm_parent: WarmParent | None = None


def keep_warm_parent() -> None:
    """Start this process's warm parent now (it takes a few seconds to import), so that the first
    run is already forked from it. Called by orchestration.daemon."""
    global _warm_parent
    if not sys.platform.startswith("linux"):
        return  # fork() after these imports is only known safe on Linux; elsewhere runs start cold
    if _warm_parent is None:
        _warm_parent = WarmParent(preload_for_declarations())
    _warm_parent.start()


def preload_for_declarations() -> list[str]:
    """DEFAULT_PRELOAD, plus the local model's libraries when a declared table uses them: torch
    and sentence-transformers take ~12 s to import, which every run of such a table would pay.
    Only imported, never run, in the parent: torch starts its thread pools at first use, so the
    forked workers start theirs afresh."""
    try:
        from assets.spec import load_spec_dir

        from .database import tables_dir

        specs = load_spec_dir(tables_dir())
    except Exception:  # noqa: BLE001 - a broken declaration is the code location's to report
        return list(DEFAULT_PRELOAD)
    if any(spec.provider.kind == "sentence-transformers" for spec, _ in specs):
        return [*DEFAULT_PRELOAD, "torch", "sentence_transformers"]
    return list(DEFAULT_PRELOAD)


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    def __init__(self, inst_data: ConfigurableClassData | None = None):
        self._inst_data = inst_data
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> WarmRunLauncher:
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if run.job_code_origin is None:
            raise dg.DagsterInvariantViolationError(f"run {run.run_id} has no code origin to load its job from")
        args = serialize_value(
            ExecuteRunArgs(job_origin=run.job_code_origin, run_id=run.run_id, instance_ref=self._instance.get_ref())
        )
        pid = _warm_parent.fork(args) if _warm_parent is not None else None
        how = "forked from the warm parent"
        if pid is None:
            how = "started cold"
            pid = subprocess.Popen([sys.executable, "-m", "dagster", "api", "execute_run", args]).pid
        self._instance.add_run_tags(run.run_id, {WORKER_TAG: _identity(pid)})
        self._instance.report_engine_event(f"Run worker {how} (pid {pid}).", run, cls=self.__class__)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        identity = run.tags.get(WORKER_TAG)
        if identity is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "launched before this launcher recorded workers")
        if _alive(identity):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=identity)
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"run worker process {identity.split('@')[0]} is gone", run_worker_id=identity
        )

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        identity = run.tags.get(WORKER_TAG)
        if identity is None or not _alive(identity):
            self._instance.report_engine_event("No live run worker to send the termination to.", run, cls=self.__class__)
            return False
        # SIGINT is what Dagster's run worker turns into a clean cancellation (the code server's
        # cancel_execution sends the same).
        os.kill(int(identity.split("@")[0]), signal.SIGINT)
        return True


def _identity(pid: int) -> str:
    try:
        return f"{pid}@{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return f"{pid}@0"


def _alive(identity: str) -> bool:
    pid, _, started = identity.partition("@")
    try:
        process = psutil.Process(int(pid))
        return f"{process.create_time():.2f}" == started and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def _readable(pipe: Any, timeout: float) -> bool:
    ready, _, _ = select.select([pipe], [], [], timeout)
    return bool(ready)
