"""The Dagster daemon, with a backfill loop that notices a new backfill within seconds.

Dagster's backfill daemon makes a pass over the backfills every 30 s, a constant it offers no
setting for (dagster 1.13; dagster-io/dagster#11860 proposed a shorter loop and was never
merged). A backfill launched from the UI therefore waits 15 s on average, 30 s at worst, before
its first run is even queued: for a table that embeds in half a minute, that is most of the
orchestration cost (measured: 2.1x the engine's time end to end, benchmark ui_backfill).

Making every pass 2 s apart is no cure: a pass over a backfill whose run is in progress costs a
fraction of a second of CPU, which on a small machine the run itself then lacks (measured: the
run's step took 3 to 4 s longer over 35 s). So this loop looks every second, cheaply, for a backfill
that waits on the daemon (requested or canceling, with no run queued or running), and makes a
pass at once when it finds one, and otherwise every 30 s as Dagster does. The passes themselves
are Dagster's own `execute_backfill_iteration`, unchanged.

    python -m orchestration.daemon run -w workspace.yaml     # instead of: dagster-daemon run ...
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

LOOK_ENV = "VECTORSYNC_BACKFILL_LOOK_SECONDS"
DEFAULT_LOOK_SECONDS = 1.0
# Dagster's own interval: passes over backfills in progress are no more frequent than before.
PASS_SECONDS = 30.0

log = logging.getLogger(__name__)


def look_seconds() -> float:
    raw = os.environ.get(LOOK_ENV, "")
    if not raw:
        return DEFAULT_LOOK_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{LOOK_ENV}={raw!r}: expected a number of seconds") from None
    if not 0.2 <= seconds <= PASS_SECONDS:
        raise ValueError(f"{LOOK_ENV}={raw!r}: expected between 0.2 and {PASS_SECONDS:.0f} seconds")
    return seconds


def backfills_waiting_on_the_daemon(instance: Any) -> list[str]:
    """Ids of backfills that only a pass of the backfill daemon moves on: requested (new, or
    between runs) or canceling, with no run of theirs queued, starting or running."""
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    from .instance import IN_FLIGHT

    backfills = instance.get_backfills(
        filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING])
    )
    return [
        b.backfill_id for b in backfills
        if not instance.get_run_ids(filters=dg.RunsFilter(tags={"dagster/backfill": b.backfill_id},
                                                          statuses=IN_FLIGHT), limit=1)
    ]


def responsive_backfill_loop(
    workspace_process_context: Any,
    logger: logging.Logger,
    shutdown_event: threading.Event,
    until: float | None = None,
    threadpool_executor: Any = None,
    submit_threadpool_executor: Any = None,
) -> Iterator[Any]:
    """Stands in for dagster's `execute_backfill_iteration_loop` (same arguments, same yields:
    span markers around each pass, errors, and None between passes for the heartbeat)."""
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster._daemon.daemon import SpanMarker
    from dagster._daemon.utils import DaemonErrorCapture

    every = look_seconds()
    futures: dict = {}
    last_pass = float("-inf")
    while not shutdown_event.is_set():
        now = time.monotonic()
        if until is not None and time.time() >= until:
            break
        due = now - last_pass >= PASS_SECONDS
        if not due:
            try:
                due = bool(backfills_waiting_on_the_daemon(workspace_process_context.instance))
            except Exception:  # the instance's database is away: the next pass reports it
                logger.exception("looking for backfills waiting on the daemon failed")
        if due:
            last_pass = now
            yield SpanMarker.START_SPAN
            try:
                yield from execute_backfill_iteration(
                    workspace_process_context, logger, threadpool_executor=threadpool_executor,
                    submit_threadpool_executor=submit_threadpool_executor, backfill_futures=futures,
                )
            except Exception:
                yield DaemonErrorCapture.process_exception(
                    exc_info=sys.exc_info(), logger=logger, log_message="BackfillDaemon caught an error"
                )
            yield SpanMarker.END_SPAN
        shutdown_event.wait(every)
        yield None


def install_responsive_backfill_loop() -> bool:
    """Have the backfill daemon run `responsive_backfill_loop`. Returns False, and leaves Dagster
    as it is, when this Dagster's loop is not the one this was written against."""
    try:
        from dagster._daemon import backfill, daemon
    except ImportError:
        return False
    original = getattr(daemon, "execute_backfill_iteration_loop", None)
    expected = {"workspace_process_context", "logger", "shutdown_event", "threadpool_executor",
                "submit_threadpool_executor"}
    if (
        original is None
        or not hasattr(backfill, "execute_backfill_iteration")
        or not expected <= set(inspect.signature(original).parameters)
        or not {"threadpool_executor", "submit_threadpool_executor", "backfill_futures"}
        <= set(inspect.signature(backfill.execute_backfill_iteration).parameters)
    ):
        log.warning("this Dagster's backfill loop is not the expected one: it keeps its own 30 s interval")
        return False
    daemon.execute_backfill_iteration_loop = responsive_backfill_loop
    return True


def install_pooled_connections() -> bool:
    """Have the daemon keep its database connections open between queries, as the webserver does.

    dagster-postgres opens a new connection for every query outside the webserver (a NullPool,
    so that short-lived processes hold none). The daemon is long-lived and queries several times
    a second (sensors, the run queue, run monitoring, the backfill loop): measured with py-spy,
    29% of its CPU went to opening connections, and each one also forks a PostgreSQL backend.
    Returns False, and leaves Dagster as it is, when its daemon command is not the expected one."""
    try:
        from dagster._daemon import cli
    except ImportError:
        return False
    original = getattr(cli, "_daemon_run_command", None)
    if original is None or "instance" not in inspect.signature(original).parameters:
        log.warning("this Dagster's daemon command is not the expected one: it opens a connection per query")
        return False

    def pooled_daemon_run_command(instance: Any, *args: Any, **kwargs: Any) -> Any:
        # No statement timeout (a backfill pass may run long queries); connections recycled hourly.
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=10)
        return original(instance, *args, **kwargs)

    cli._daemon_run_command = pooled_daemon_run_command
    return True


def main(argv: list[str] | None = None) -> None:
    install_responsive_backfill_loop()
    install_pooled_connections()
    from .run_launcher import keep_warm_parent

    keep_warm_parent()
    from dagster._daemon.cli import cli as dagster_daemon

    dagster_daemon(args=sys.argv[1:] if argv is None else argv, prog_name="dagster-daemon", obj={})


if __name__ == "__main__":
    main()
