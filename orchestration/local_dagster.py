"""Dagster running in the background on this machine: the UI and the daemon, or the daemon
alone, for end-to-end tests and benchmarks that go through sensors, the run queue and real runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .database import PROJECT_DIR
from .instance import prepare_instance


class LocalDagster:
    """Starts Dagster with its instance on the database at `url` and the tables declared in
    `tables_dir`; `stop()` ends the whole process group (the daemon, code servers and runs)."""

    def __init__(
        self,
        url: str,
        home: Path,
        tables_dir: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.url, self.home, self.port = url, home, port
        self.tables_dir = tables_dir
        self.extra_env = env or {}
        self.log_path = log_path or home / "dagster.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalDagster:
        prepare_instance(self.url, self.home)
        command = self.command(Path(sys.executable).parent)
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "DATABASE_URL": self.url, **self.extra_env}
        if self.tables_dir is not None:
            env["VECTORSYNC_TABLES"] = str(self.tables_dir)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it until stop()
        # Started in the background, dagster ignores SIGINT/SIGTERM unless their defaults are restored.
        self.process = subprocess.Popen(
            ["env", "--default-signal=INT,TERM", *command],
            cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def command(self, bin_dir: Path) -> list[str]:
        """Stock Dagster, as users run it: the daemon alone, or `dagster dev` (webserver + daemon)."""
        if self.port is None:
            return [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"]
        return [str(bin_dir / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)  # whatever is left of the group: code servers, runs
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> LocalDagster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
