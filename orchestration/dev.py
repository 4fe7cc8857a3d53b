"""Dagster's webserver and daemon on this machine, as `dagster dev` runs them, but with vectorsync's
daemon (orchestration/daemon.py), which notices a new backfill within a second instead of up to
30 s, keeps its database connections open and forks runs from a warm parent:

    python -m orchestration.dev -w workspace.yaml -h 127.0.0.1 -p 3000

Both run in this process's group, so a Ctrl-C or a signal to the group reaches each of them once,
as it reaches `dagster dev`'s children; a signal to this process alone is passed on after a
moment. When either child ends, the other is stopped and its status is returned."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

# How long the children get to stop on a signal they received themselves, before this process
# passes one on, and then before it kills them.
GRACE_SECONDS = 3.0
STOP_SECONDS = 30.0


def prepare_child() -> None:
    """In a child, before exec: default SIGINT/SIGTERM (a shell's background job inherits them
    ignored, and Dagster would then ignore its stop signal), and have Linux send SIGTERM if the
    parent dies, even by SIGKILL, so no child outlives its supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_commands(workspace: str, host: str, port: int) -> list[list[str]]:
    webserver = str(Path(sys.executable).parent / "dagster-webserver")
    return [
        [webserver, "-w", workspace, "-h", host, "-p", str(port)],
        [sys.executable, "-m", "orchestration.daemon", "run", "-w", workspace],
    ]


def _stop(children: list[subprocess.Popen]) -> None:
    for sig, wait in ((None, GRACE_SECONDS), (signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, None)):
        alive = [c for c in children if c.poll() is None]
        if not alive:
            return
        for child in alive:
            if sig is not None:
                child.send_signal(sig)
        deadline = time.monotonic() + (wait or 0)
        while wait is not None and time.monotonic() < deadline and any(c.poll() is None for c in alive):
            time.sleep(0.1)
    for child in children:
        child.wait()


def run(workspace: str, host: str, port: int) -> int:
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    children = [subprocess.Popen(command, preexec_fn=prepare_child)
                for command in child_commands(workspace, host, port)]
    ended: subprocess.Popen | None = None
    try:
        while not stop_requested and ended is None:
            ended = next((c for c in children if c.poll() is not None), None)
            time.sleep(0.2)
    finally:
        _stop(children)
    if ended is None or stop_requested:
        return 0
    print(f"{' '.join(ended.args[:3])} ended with status {ended.returncode}; stopped the rest", file=sys.stderr)
    return ended.returncode or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.dev", description=__doc__.splitlines()[0],
                                     add_help=False)
    parser.add_argument("-w", "--workspace", default="workspace.yaml")
    parser.add_argument("-h", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=3000)
    parser.add_argument("--help", action="help")
    args = parser.parse_args(argv)
    return run(args.workspace, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
