"""Continuous mode in Dagster: one long-lived run per table that drains its changes as they
commit (LISTEN/NOTIFY, assets/continuous.py) and records each micro-batch as a materialization of
the partitions it touched; the lock by which the tables sensor tells a live run from a dead one."""


import os
import queue
import threading
import time
from collections.abc import Callable

import dagster as dg
import psycopg

from assets import versions
from assets.catalog import ResolvedTable, resolve
from assets.continuous import CHANNEL, ChangeListener, follow_changes
from assets.engine import EmbeddingEngine, SyncStats, retry_policy
from assets.locks import held_elsewhere, try_lock
from assets.providers import provider_for
from assets.run_ledger import RunLedger
from assets.spec import TableSpec
from assets.status import change_backlog
from assets.usage import BudgetExceeded, price_per_million

from .asset_metadata import (
    CONTINUOUS_EXACT_COUNT_UP_TO, REPORT_EVERY_SECONDS, BatchThrottle, backlog_metadata, partition_metadata,
    store_metadata, work_metadata,
)
from .names import bucket_partition_key, embeddings_asset_key
from .resources import VectorsyncDatabase


def continuous_job(spec: TableSpec, origin: str) -> dg.JobDefinition:
    """Continuous mode: one long-lived run that drains the table's changes as they commit and
    records each micro-batch as a materialization of the partitions it touched."""
    key = embeddings_asset_key(spec)

    @dg.op(
        name=f"follow_{spec.name}",
        description=f"Waits on LISTEN/NOTIFY for changes to {spec.source.qualified} and embeds them "
        "in micro-batches; stopping the run stops it within about a second.",
        tags={"vectorsync/table": spec.name},
    )
    def follow(context: dg.OpExecutionContext, database: VectorsyncDatabase) -> None:
        with database.connect() as conn, database.connect() as ledger_conn:
            # The active model version as the run starts (a candidate fills by partition runs; a
            # promotion takes effect here when the keeper restarts this run).
            table = versions.active_table(conn, resolve(conn, spec, origin))
            _hold_continuous_lock(conn, spec.name)
            ledger = RunLedger(ledger_conn, context.run_id, table.spec, "continuous", list(range(spec.buckets)))
            metered = ledger.metered(provider_for(table.spec.provider))
            engine = EmbeddingEngine(conn, table, metered, retry=retry_policy(spec), lock_wait_seconds=0.0)
            listener = ChangeListener(database.resolved_url(), spec.name)

            # The pid lets an operator (or a benchmark) find the process; the lock above is how
            # the tables sensor tells a live run from one whose process was killed.
            context.instance.add_run_tags(context.run_id, {"vectorsync/pid": str(os.getpid())})
            context.log.info(f"{spec.name}: following changes (LISTEN {CHANNEL})")
            try:
                # The reporter's own connection: the engine's is busy in the loop, on another thread.
                with database.connect() as report_conn:
                    reporter = _BatchReporter(
                        context, key, describe=lambda batch: _continuous_metadata(report_conn, spec, table, batch),
                    )

                    def add(worked: dict[int, SyncStats]) -> None:
                        ledger.settle(worked)
                        reporter.add(worked)

                    switched = _VersionWatch(report_conn, spec.name, table.spec.version)
                    outcome, reason = "failed", None
                    try:
                        follow_changes(engine, listener, add, should_stop=lambda: metered.exhausted or switched(),
                                       on_idle=reporter.flush)
                        if switched.changed:
                            context.log.info(f"{spec.name}: model version {table.spec.version} is no longer the "
                                             "active one (a promotion or rollback): this run ends, and the tables "
                                             "sensor starts one on the active version")
                        outcome = "succeeded"
                    except BudgetExceeded as exc:
                        outcome, reason = "over_budget", str(exc)
                        raise dg.Failure(description=reason) from exc
                    finally:
                        reporter.close()
                        ledger.finish(outcome, reason)
            finally:
                listener.close()
                engine.close()

    @dg.job(
        name=f"{spec.name}_continuous",
        description=f"Continuous mode for {spec.name}: kept running by the vectorsync_tables sensor; "
        "with `sensor: false` in the declaration (or that sensor stopped, for every table) a run that "
        "ends is not replaced.",
        tags={"vectorsync/table": spec.name, "vectorsync/trigger": "continuous"},
        executor_def=dg.in_process_executor,
    )
    def _job() -> None:
        follow()

    return _job


class _VersionWatch:
    """Whether the table's active model version is still the one a continuous run follows: a
    promotion or rollback ends the run (the tables sensor starts one on the new active version), so
    no one has to restart it by hand. Asked on every loop turn, it reads the registry at most every
    CHECK_SECONDS."""

    CHECK_SECONDS = 5.0

    def __init__(self, conn: psycopg.Connection, name: str, version: int) -> None:
        self.conn, self.name, self.version = conn, name, version
        self.changed = False
        self._next = time.monotonic() + self.CHECK_SECONDS

    def __call__(self) -> bool:
        if self.changed or time.monotonic() < self._next:
            return self.changed
        self._next = time.monotonic() + self.CHECK_SECONDS
        if versions.installed(self.conn):
            found = self.conn.execute("SELECT version FROM vectorsync.embedding_tables WHERE name = %s",
                                      (self.name,)).fetchone()
            self.changed = found is not None and found[0] != self.version
        return self.changed


def _continuous_metadata(
    conn: psycopg.Connection, spec: TableSpec, table: ResolvedTable, batch: dict[int, SyncStats]
) -> tuple[dict[str, dict], dict]:
    """Each partition's figures for a micro-batch, and what all of them share (backlog, store)."""
    price = price_per_million(spec.provider)
    buckets = sorted(batch)
    per_partition = partition_metadata(conn, table, batch, buckets, price, CONTINUOUS_EXACT_COUNT_UP_TO)
    shared = {**backlog_metadata(*change_backlog(conn, table.queue)), "buckets": len(buckets)}
    return per_partition, {**shared, **store_metadata(spec, table)}


class _BatchReporter:
    """Records micro-batches as materializations of the partitions they touched, at most every
    `every_seconds` (REPORT_EVERY_SECONDS), from a thread of its own: writing a dozen events to
    the instance's storage takes longer than embedding a micro-batch, and the loop must not wait
    for it. Each carries the same metadata as a partition run's: `describe` gives each
    partition's (its bucket's work and size) and what they share (the backlog's, the store's),
    read once per write."""

    def __init__(
        self, context: dg.OpExecutionContext, key: dg.AssetKey,
        describe: Callable[[dict[int, SyncStats]], tuple[dict[str, dict], dict]] | None = None,
        every_seconds: float = REPORT_EVERY_SECONDS,
    ) -> None:
        self.context, self.key = context, key
        self.describe = describe
        self.outbox: queue.Queue[dict[int, SyncStats] | None] = queue.Queue()
        self.batches = BatchThrottle(self.outbox.put, every_seconds)
        self.writer = threading.Thread(target=self._write, name="vectorsync-reporter", daemon=True)
        self.writer.start()

    def add(self, worked: dict[int, SyncStats]) -> None:
        self.batches.add(worked)

    def flush(self) -> None:
        self.batches.flush()

    def close(self) -> None:
        """Record what is left and wait until every event is written."""
        self.batches.flush(force=True)
        self.outbox.put(None)
        self.writer.join(timeout=30)

    def _described(self, batch: dict[int, SyncStats]) -> tuple[dict[str, dict], dict]:
        if self.describe is not None:
            try:
                return self.describe(batch)
            except psycopg.Error as exc:
                # The batches are still recorded, without the store's figures: they are the audit trail.
                self.context.log.warning(f"{self.key.to_user_string()}: could not read the store's figures: {exc}")
        return {bucket_partition_key(b): work_metadata(s, 0.0) for b, s in batch.items()}, {}

    def _write(self) -> None:
        while (batch := self.outbox.get()) is not None:
            per_partition, shared = self._described(batch)
            for bucket in sorted(batch):
                pk = bucket_partition_key(bucket)
                self.context.log_event(
                    dg.AssetMaterialization(
                        asset_key=self.key,
                        partition=pk,
                        description="continuous mode micro-batches",
                        metadata={**shared, **per_partition[pk], "trigger": "continuous"},
                    )
                )
            # log_event writes each event to the event log at once, and the op context also keeps
            # it until the op returns, which a run that follows changes for weeks never does.
            for _ in self.context.consume_events():
                pass


def continuous_lock_held(conn: psycopg.Connection, name: str) -> bool:
    """Whether a live continuous run holds the table's lock: a killed run's lock goes with its
    connection."""
    return held_elsewhere(conn, f"vectorsync-continuous:{name}")


def _hold_continuous_lock(conn: psycopg.Connection, name: str, wait_seconds: float = 60.0) -> None:
    """Never two continuous runs of one table: a replaced run may still be shutting down."""
    deadline = time.monotonic() + wait_seconds
    while not try_lock(conn, f"vectorsync-continuous:{name}"):
        if time.monotonic() > deadline:
            raise dg.Failure(f"table {name}: another continuous run is still running")
        time.sleep(1.0)
