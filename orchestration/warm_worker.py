"""A warm parent for run workers: imports Dagster and the heavy libraries once, then forks a run
worker per request, which starts executing at once instead of after 3 to 4 s of imports.

Started by orchestration.run_launcher.WarmRunLauncher in the daemon, with two pipe descriptors:

    python -m orchestration.warm_worker REQUEST_FD REPLY_FD MODULE [MODULE ...]

It writes "ready" once the modules are imported, then reads one line per run (the serialized
ExecuteRunArgs of `dagster api execute_run`), forks, and writes back the child's pid. The child
runs exactly what `dagster api execute_run` runs. It exits when the request pipe closes (the
daemon ended); run workers already started go on, as they do when a code server ends.

Only third-party modules are imported here: vectorsync's own code and declarations are read from
disk by each run, as a freshly spawned process would, so a run never executes stale code.
"""

from __future__ import annotations

import importlib
import os
import random
import signal
import sys


def _run_worker(execute_run_args: str) -> int:
    from dagster._cli import main as dagster_main

    sys.argv = ["dagster", "api", "execute_run", execute_run_args]
    try:
        dagster_main()
    except SystemExit as exc:  # click ends every command with one
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _child(execute_run_args: str, request: object, reply: object) -> None:
    code = 1
    try:
        request.close()  # type: ignore[attr-defined]
        reply.close()  # type: ignore[attr-defined]
        # The defaults a freshly started interpreter would have.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        random.seed()  # forked children would otherwise draw the same jitter
        code = _run_worker(execute_run_args)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> None:
    request_fd, reply_fd, modules = int(argv[0]), int(argv[1]), argv[2:]
    # The daemon's Ctrl-C reaches the whole process group: this process ends on EOF instead, after
    # the daemon, so it never dies mid-fork. Children are reaped by the kernel (no zombies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # an optional library (the local model's) that is not installed: runs import what they use
    with os.fdopen(request_fd, "r", encoding="utf-8") as request, os.fdopen(reply_fd, "w", encoding="utf-8") as reply:
        reply.write("ready\n")
        reply.flush()
        for line in request:
            execute_run_args = line.strip()
            if not execute_run_args:
                continue
            pid = os.fork()
            if pid == 0:
                _child(execute_run_args, request, reply)
            reply.write(f"{pid}\n")
            reply.flush()
    # The daemon is gone: leave at once, without the seconds an interpreter holding torch and
    # Dagster takes to tear down, during which its process group would still look alive to
    # whatever stopped the daemon.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
