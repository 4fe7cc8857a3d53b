"""End to end through the Dagster daemon, with no manual step: rows are written, the change sensor
ticks, runs go through the queue and materialize, and the store follows; and continuous mode, whose
run the keeper sensor starts, follows changes with no sensor tick in between."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from openai_server import Fault, OpenAIServer
from orchestration.asset_metadata import REPORT_EVERY_SECONDS
from orchestration.instance import RUN_MONITORING_POLL_SECONDS
from orchestration.local_dagster import LocalDagster
from orchestration.names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG

from conftest import unique

KEY_ENV = "VECTORSYNC_DAEMON_TEST_KEY"
DIMENSIONS = 16


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(dimensions=DIMENSIONS) as srv:
        yield srv


def declare(conn: psycopg.Connection, tables_dir: Path, server: OpenAIServer, **fields) -> tuple[dict, sql.Identifier]:
    schema = unique("dmn")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "posts")
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text, likes int DEFAULT 0)").format(source))
    declaration = {
        "name": unique("dmn"), "source": f"{schema}.posts", "columns": ["body"], "buckets": 4,
        "provider": {"kind": "openai", "model": "test-embedder", "dimensions": DIMENSIONS,
                     "base_url": server.base_url, "api_key_env": KEY_ENV, "max_retries": 1},
        **fields,
    }
    tables_dir.mkdir(exist_ok=True)
    # Declared as users declare tables: an EmbeddingTable component in a folder of its own.
    folder = tables_dir / declaration["name"]
    folder.mkdir()
    component = {"type": "orchestration.components.EmbeddingTable", "attributes": declaration}
    (folder / "defs.yaml").write_text(yaml.safe_dump(component))
    return declaration, source


def install_dir(db_url: str, tables_dir: Path) -> None:
    from assets.install import install
    from assets.declarations import load_declarations
    from orchestration.database import connect

    with connect(db_url) as c:
        install(c, load_declarations(tables_dir))


def stored_bodies(conn: psycopg.Connection, decl: dict, schema: str) -> dict[int, str]:
    store = sql.Identifier(schema, f"{decl['name']}_embeddings_store")
    return dict(conn.execute(sql.SQL("SELECT id, chunk FROM {} WHERE chunk_seq = 0").format(store)).fetchall())


def source_bodies(conn: psycopg.Connection, source: sql.Identifier) -> dict[int, str]:
    return dict(conn.execute(sql.SQL("SELECT id, body FROM {}").format(source)).fetchall())


def wait_until(condition: Callable[[], bool], timeout: float, dagster: LocalDagster, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.25)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s; dagster log:\n{dagster.log_tail()}")


def runs_of(home: Path, table: str) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(tags={"vectorsync/table": table})))


def worker_pid(home: Path, run_id: str) -> int | None:
    """The pid of the process that works on the run, as the asset logs it."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for entry in instance.all_logs(run_id):
            match = re.search(r"run worker pid (\d+)", entry.user_message or "")
            if match:
                return int(match.group(1))
    return None


def test_changes_reach_the_store_through_sensor_queue_and_runs(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, server: OpenAIServer
) -> None:
    tables = tmp_path / "tables"
    decl, source = declare(conn, tables, server, backfill={"buckets_per_run": 2})
    schema = decl["source"].split(".")[0]
    install_dir(db_url, tables)
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'first post ' || i FROM generate_series(1, 30) i").format(source))
    with LocalDagster(db_url, tmp_path / "home", tables, env={KEY_ENV: "sk-daemon-test"}) as dagster:
        wait_until(lambda: stored_bodies(conn, decl, schema) == source_bodies(conn, source), 240, dagster,
                   "the first 30 rows reaching the store")
        conn.execute(sql.SQL("UPDATE {} SET body = 'edited post ' || id WHERE id <= 5").format(source))
        conn.execute(sql.SQL("DELETE FROM {} WHERE id BETWEEN 6 AND 8").format(source))
        conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'new post ' || i FROM generate_series(31, 35) i").format(source))
        # A column the text does not use: no change is logged, no run is needed for it.
        conn.execute(sql.SQL("UPDATE {} SET likes = likes + 1").format(source))
        seconds = wait_until(lambda: stored_bodies(conn, decl, schema) == source_bodies(conn, source), 120, dagster,
                             "the update, delete and insert reaching the store")
        queue = sql.Identifier("vectorsync", f"changes_{decl['name']}")
        wait_until(lambda: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(queue)).fetchone()[0] == 0, 60,
                   dagster, "the change log emptying")
        # A change run lingers for further changes, then ends by itself once writes pause.
        wait_until(lambda: all(r.is_finished for r in runs_of(tmp_path / "home", decl["name"])), 90, dagster,
                   "the change runs finishing once the writes stopped")
        runs = runs_of(tmp_path / "home", decl["name"])
        stored = stored_bodies(conn, decl, schema)
        assert stored[1] == "edited post 1" and 7 not in stored and stored[33] == "new post 33"

        # A backfill of every partition, as the UI launches one: Dagster's own backfill daemon
        # starts one run for all buckets (its passes are 30 s apart) and marks it done.
        from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

        from orchestration.definitions import build_definitions

        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, f"{decl['name']}_embeddings_store")))
        backfill_id = unique("bf")
        with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
            instance.add_backfill(PartitionBackfill.from_asset_partitions(
                backfill_id=backfill_id, asset_graph=build_definitions(tables).resolve_asset_graph(),
                partition_names=[f"{b:03d}" for b in range(decl["buckets"])],
                asset_selection=[dg.AssetKey(["embeddings", decl["name"]])], backfill_timestamp=time.time(),
                tags={}, dynamic_partitions_store=instance, all_partitions=False, title=None, description=None,
                run_config=None,
            ))
            wait_until(lambda: instance.get_backfill(backfill_id).status == BulkActionStatus.COMPLETED_SUCCESS,
                       180, dagster, "the backfill completing")
            backfill_runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert stored_bodies(conn, decl, schema) == source_bodies(conn, source)
        # backfill.buckets_per_run: 2 splits the 4 buckets into two ordinary runs.
        assert len(backfill_runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in backfill_runs)
        assert sorted((r.tags[PARTITION_RANGE_START_TAG], r.tags[PARTITION_RANGE_END_TAG]) for r in backfill_runs) == [
            ("000", "001"), ("002", "003")]
    assert runs and all(r.tags.get("vectorsync/trigger") == "changes" for r in runs)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
    print(f"second round reached the store in {seconds:.1f}s through {len(runs)} runs")


def test_continuous_run_follows_changes_without_sensor_ticks(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, server: OpenAIServer
) -> None:
    tables = tmp_path / "tables"
    decl, source = declare(conn, tables, server, continuous=True)
    schema = decl["source"].split(".")[0]
    install_dir(db_url, tables)
    home = tmp_path / "home"
    with LocalDagster(db_url, home, tables, env={KEY_ENV: "sk-daemon-test"}) as dagster:
        def continuous_started() -> bool:
            return any(r.status == dg.DagsterRunStatus.STARTED and r.tags.get("vectorsync/trigger") == "continuous"
                       for r in runs_of(home, decl["name"]))

        wait_until(continuous_started, 180, dagster, "the keeper sensor starting the continuous run")
        latencies = []
        for statement in (
            "INSERT INTO {} VALUES (1, 'hello continuous'), (2, 'second row')",
            "UPDATE {} SET body = 'updated continuous' WHERE id = 1",
            "DELETE FROM {} WHERE id = 2",
        ):
            conn.execute(sql.SQL(statement).format(source))
            latencies.append(wait_until(lambda: stored_bodies(conn, decl, schema) == source_bodies(conn, source),
                                        30, dagster, f"continuous mode applying {statement!r}"))
        runs = runs_of(home, decl["name"])
        assert [r.tags.get("vectorsync/trigger") for r in runs] == ["continuous"], "only the continuous run ran"
        def materializations() -> list:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                return instance.fetch_materializations(dg.AssetKey(["embeddings", decl["name"]]), limit=100).records

        def rows_recorded() -> int:
            # dagster/row_count is the partition's: the latest of each partition add up to the table's rows.
            latest = {}
            for record in materializations():  # newest first
                latest.setdefault(record.partition_key, record.asset_materialization.metadata["dagster/row_count"].value)
            return sum(latest.values())

        # Micro-batches are recorded at most every REPORT_EVERY_SECONDS, the last one too (on a quiet slice).
        waited = wait_until(lambda: rows_recorded() == 1, REPORT_EVERY_SECONDS + 15, dagster,
                            "the micro-batches' materializations adding up to the table's 1 row")
        print(f"the last micro-batch recorded {waited:.1f}s after the store had it")
        assert all(m.run_id == runs[0].run_id for m in materializations())
        assert stored_bodies(conn, decl, schema) == {1: "updated continuous"}
        # Each micro-batch says what a partition run says: the work, the backlog and the store.
        metadata = materializations()[0].asset_materialization.metadata
        for key in ("rows_written", "chunks_embedded", "pending_changes", "oldest_change_seconds", "buckets",
                    "rows_per_second", "dagster/row_count", "dagster/table_name"):
            assert key in metadata, key
        assert [c.name for c in metadata["dagster/column_schema"].value.columns] == [
            "id", "chunk_seq", "chunk", "text_hash", "model", "embedding"]
        assert {d.column_name for d in metadata["dagster/column_lineage"].value.deps_by_column["embedding"]} == {"body"}

        # SIGKILL the run's process in the middle of a micro-batch (its provider request still
        # unanswered): the claimed change rolls back, the keeper sees the lock is gone, marks the
        # run failed and starts another, which embeds the row and what was written meanwhile.
        server.fail_next(Fault(delay=60.0))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (3, 'claimed when the run was killed')").format(source))
        wait_until(lambda: any("claimed when the run" in t for r in server.requests for t in r.inputs), 30, dagster,
                   "the continuous run sending the new row to the provider")
        os.kill(int(runs[0].tags["vectorsync/pid"]), signal.SIGKILL)
        server.clear_faults()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (4, 'written while no run was alive')").format(source))
        recovered = wait_until(lambda: stored_bodies(conn, decl, schema) == source_bodies(conn, source), 150,
                               dagster, "a new continuous run embedding the rows of and after the kill")
        runs = runs_of(home, decl["name"])
        assert runs[-1].status == dg.DagsterRunStatus.FAILURE  # the killed one, oldest last
        live = [r for r in runs if r.status == dg.DagsterRunStatus.STARTED]
        assert [r.tags.get("vectorsync/trigger") for r in live] == ["continuous"]

        # Stopping it from the UI (a termination request) stops it within seconds.
        with dg.DagsterInstance.from_config(str(home)) as instance:
            asked = time.monotonic()
            assert instance.run_coordinator.cancel_run(live[0].run_id)
            wait_until(lambda: instance.get_run_by_id(live[0].run_id).status == dg.DagsterRunStatus.CANCELED,
                       30, dagster, "the continuous run stopping after a termination request")
            stopped = time.monotonic() - asked
    print(f"continuous mode: insert, update, delete stored after {', '.join(f'{s:.2f}s' for s in latencies)}; "
          f"recovered {recovered:.0f}s after a SIGKILL; stopped {stopped:.1f}s after a termination request")


def test_killed_run_workers_free_their_pool_slots_with_no_manual_step(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, server: OpenAIServer
) -> None:
    """SIGKILL a change run's worker process (as an OOM kill or a pod eviction would) in the middle
    of its provider request, twice in a row, with the default pool limit of 2: each run is marked
    failed within 30 s, its pool slot is freed, the sensor asks again for its buckets, and every
    change reaches the store, with no one touching the UI."""
    tables = tmp_path / "tables"
    decl, source = declare(conn, tables, server, buckets=1)
    schema = decl["source"].split(".")[0]
    install_dir(db_url, tables)
    home = tmp_path / "home"
    with LocalDagster(db_url, home, tables, env={KEY_ENV: "sk-daemon-test"}) as dagster:
        killed: list[tuple[str, float]] = []
        for round_ in (1, 2):
            # The provider holds the request for a minute: the run is mid-request when killed.
            server.fail_next(Fault(delay=60.0))
            text = f"row of kill round {round_}"
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(source), (round_, text))
            wait_until(lambda: any(text in t for r in server.requests for t in r.inputs), 120, dagster,
                       f"round {round_}: a change run sending the row to the provider")
            run = next(r for r in runs_of(home, decl["name"]) if r.status == dg.DagsterRunStatus.STARTED)
            pid = worker_pid(home, run.run_id)
            assert pid is not None and pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            killed.append((run.run_id, time.monotonic()))
            failed_after = wait_until(
                lambda: next(r for r in runs_of(home, decl["name"]) if r.run_id == run.run_id).status
                == dg.DagsterRunStatus.FAILURE, 30, dagster, f"round {round_}: the killed run being marked failed")
            print(f"round {round_}: killed run marked failed {failed_after:.1f}s after the SIGKILL")
        server.clear_faults()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (3, 'written after both kills')").format(source))
        # Both killed runs held a slot of the provider's pool (limit 2): later runs get one only
        # once run monitoring has freed them.
        recovered = wait_until(lambda: stored_bodies(conn, decl, schema) == source_bodies(conn, source), 180,
                               dagster, "every change reaching the store after two killed runs")
        with dg.DagsterInstance.from_config(str(home)) as instance:
            def held_by_killed() -> set[str]:
                info = instance.event_log_storage.get_concurrency_info("vectorsync_openai")
                return info.active_run_ids & {run_id for run_id, _ in killed}

            # The later run needed one freed slot; run monitoring frees the other at its next pass
            # (a run that ended less than free_slots_after_run_end_seconds before a pass waits for
            # the one after): both within two passes of the last kill.
            freed = wait_until(lambda: not held_by_killed(), 2 * RUN_MONITORING_POLL_SECONDS + 5, dagster,
                               "run monitoring freeing the killed runs' pool slots")
            freed_after_kill = time.monotonic() - killed[-1][1]
    assert stored_bodies(conn, decl, schema)[1] == "row of kill round 1"
    print(f"all changes stored {recovered:.1f}s after the last insert; the killed runs' slots free "
          f"{freed_after_kill:.1f}s after the last kill ({freed:.1f}s after the changes were stored)")
