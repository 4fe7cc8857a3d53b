"""Backfills through the OpenAI Batch API (assets/batch_fill.py, assets/batch_api.py), against the
files and batches endpoints of the test server (tests/openai_batches.py), with the real openai
client: completion, failed lines, expired and failed batches, a killed process, rows changed and
deleted while their batch was pending, and the cost at the batch rate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
import yaml
from conftest import TableFixture, unique
from openai_server import EMBEDDING_PATHS, OpenAIServer
from psycopg import sql

from assets.providers.openai_compatible import OpenAICompatibleProvider
from assets.spec import parse_spec
from assets.usage import spend_by_table

PROJECT = Path(__file__).resolve().parent.parent
KEY_ENV = "VECTORSYNC_TEST_NO_KEY"
SMALL_PRICE = 0.02  # text-embedding-3-small's list price; the batch price is half


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(dimensions=8) as s:
        yield s


def _declaration(schema: str, name: str, base_url: str, **extra: object) -> dict:
    return {
        "name": name, "source": {"schema": schema, "table": "docs"}, "columns": ["body"], "buckets": 4,
        "page_size": 50,
        "provider": {"kind": "openai", "model": "text-embedding-3-small", "dimensions": 8,
                     "base_url": base_url, "api_key_env": KEY_ENV, "batch_size": 64},
        **extra,
    }


@pytest.fixture
def make_batch_table(conn: psycopg.Connection, server: OpenAIServer):
    """A table of `rows` rows ('row i says ...'), installed, with an engine on the test server."""
    made: list[tuple[TableFixture, OpenAICompatibleProvider]] = []

    def make(rows: int = 100, prefix: str = "''", **extra: object) -> TableFixture:
        schema = unique("bat")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
        conn.execute(sql.SQL("INSERT INTO {} SELECT i, " + prefix + " || 'row ' || i || ' says something worth "
                             "finding' FROM generate_series(1, %s) i").format(sql.Identifier(schema, "docs")), (rows,))
        spec = parse_spec(_declaration(schema, unique("bat"), server.base_url, **extra), "test")
        provider = OpenAICompatibleProvider(spec.provider)
        table = TableFixture(conn, provider, spec)
        made.append((table, provider))
        return table

    yield make
    for table, provider in made:
        table.engine.close()
        provider.close()


def _embedded_texts(server: OpenAIServer) -> list[str]:
    """Every text sent to the ordinary (synchronous) embeddings endpoint."""
    return [t for r in server.requests if r.path in EMBEDDING_PATHS for t in r.inputs]


def _sync_all(table: TableFixture, **kwargs: object) -> dict:
    return table.engine.sync_buckets(range(table.spec.buckets), **kwargs)


def _sync_until_collected(table: TableFixture, rounds: int = 5) -> None:
    """Ordinary runs, as the change sensor would start them, until no batch is pending."""
    for _ in range(rounds):
        _sync_all(table)
        if not _jobs(table.conn, table.spec.name, "state IN ('preparing', 'uploaded', 'submitted')"):
            return
    raise AssertionError("the batch was never collected")


def _jobs(conn: psycopg.Connection, name: str, where: str = "true") -> list[dict]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(f"SELECT * FROM vectorsync.batch_jobs WHERE table_name = %s AND {where} ORDER BY id",
                       (name,)).fetchall()


def _stored_vectors(table: TableFixture) -> dict[int, tuple[str, np.ndarray]]:
    rows = table.conn.execute(
        sql.SQL("SELECT id, chunk, embedding FROM {} WHERE chunk_seq = 0").format(table.table.store)).fetchall()
    return {i: (chunk, np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32))
            for i, chunk, v in rows}


def _source_text(table: TableFixture, key: int) -> str | None:
    found = table.conn.execute(sql.SQL("SELECT body FROM {} WHERE id = %s").format(table.table.source), (key,)).fetchone()
    return found and found[0]


def test_a_completed_batch_stores_the_synchronous_vectors_without_a_synchronous_call(
    make_batch_table, server: OpenAIServer
) -> None:
    table = make_batch_table(100)
    submitted = _sync_all(table, full=True, batch=True)
    assert sum(s.batches_submitted for s in submitted.values()) == 1
    assert sum(s.rows_written for s in submitted.values()) == 0
    assert table.stored() == {}
    assert table.pending() > 0  # the sweep requests stay, parked until the batch ends
    (job,) = _jobs(table.conn, table.spec.name)
    assert job["state"] == "submitted" and job["items"] == 100 and job["batch_id"]

    _sync_until_collected(table)
    stored = _stored_vectors(table)
    assert len(stored) == 100
    for key, (chunk, vector) in stored.items():
        assert chunk == _source_text(table, key)
        np.testing.assert_allclose(vector, server.vector_for(chunk), rtol=1e-6)
    assert _embedded_texts(server) == []  # not one text went the synchronous way
    assert server.batches.lines_embedded == 100 and len(server.batches.created()) == 1
    assert table.pending() == 0
    (job,) = _jobs(table.conn, table.spec.name)
    assert job["state"] == "done" and job["lines_ok"] == 100 and job["provider_status"] == "completed"
    cached = table.conn.execute("SELECT count(*) FROM vectorsync.batch_vectors WHERE job_id = %s", (job["id"],))
    assert cached.fetchone()[0] == 0  # the cache of a finished job is dropped

    # A second backfill finds everything stored: no batch, no request.
    again = _sync_all(table, full=True, batch=True)
    assert sum(s.batches_submitted for s in again.values()) == 0
    assert len(server.batches.created()) == 1 and _embedded_texts(server) == []


def test_batch_lines_are_billed_at_half_the_list_price(make_batch_table, server: OpenAIServer) -> None:
    table = make_batch_table(60, budget={"daily_usd": 1.0})
    _sync_all(table, full=True, batch=True)
    figures: dict = {}
    for _ in range(5):
        for bucket, s in _sync_all(table).items():
            figures[bucket] = figures.get(bucket, 0) + s.batch_tokens
    (job,) = _jobs(table.conn, table.spec.name)
    # The test server counts a whitespace-split word as a token: 6 per row here.
    assert job["tokens"] == 60 * 6 == sum(figures.values())
    assert job["price_per_million_tokens"] == SMALL_PRICE / 2
    assert job["cost_usd"] == pytest.approx(job["tokens"] * SMALL_PRICE / 2 / 1e6)
    spend = spend_by_table(table.conn)[table.spec.name]
    assert spend.tokens_day == job["tokens"]
    assert spend.cost_day == pytest.approx(job["cost_usd"])
    assert spend.saved_month == pytest.approx(job["tokens"] * SMALL_PRICE / 2 / 1e6)
    # The daily budget counts the batch's cost as today's spend.
    from assets.run_ledger import RunLedger

    ledger = RunLedger(table.conn, unique("run"), table.spec, "test", [0])
    assert ledger.metered(table.engine.provider).spent_elsewhere == pytest.approx(job["cost_usd"])


def test_a_failed_line_goes_the_ordinary_way_and_a_bad_input_to_the_ledger(
    make_batch_table, server: OpenAIServer
) -> None:
    table = make_batch_table(40, prefix="CASE WHEN i = 7 THEN 'poison ' ELSE '' END")
    server.poison = lambda text: text.startswith("poison")  # rejected by the batch and the endpoint alike
    server.batches.line_fails = lambda text: text.startswith("row 3 ")  # a line the batch failed once
    _sync_all(table, full=True, batch=True)
    _sync_until_collected(table)
    sent = _embedded_texts(server)
    # Only the failed lines are sent again as ordinary requests (row 3 twice: its request also
    # carried the poison input, and was halved to isolate it).
    assert {t for t in sent if not t.startswith("poison")} == {"row 3 says something worth finding"}
    stored = _stored_vectors(table)
    assert sorted(stored) == [k for k in range(1, 41) if k != 7]
    assert stored[3][0] == "row 3 says something worth finding"
    failure = table.conn.execute(
        "SELECT row_key::text, error_kind, last_error FROM vectorsync.failures WHERE table_name = %s",
        (table.spec.name,)).fetchone()
    assert failure[0] == "[7]" and failure[1] == "bad_request" and f"row [7]" in failure[2]
    (job,) = _jobs(table.conn, table.spec.name)
    assert job["lines_ok"] == 38 and job["lines_failed"] == 2
    errors = table.conn.execute("SELECT count(*) FROM vectorsync.batch_items WHERE job_id = %s AND error IS NOT NULL",
                                (job["id"],)).fetchone()[0]
    assert errors in (0, 2)  # 0 once the job is done and its items dropped


@pytest.mark.parametrize("outcome", ["expired", "failed", "cancelled"])
def test_a_batch_that_ends_early_leaves_the_rest_to_the_ordinary_path(
    make_batch_table, server: OpenAIServer, outcome: str
) -> None:
    table = make_batch_table(50)
    server.batches.outcome = outcome
    server.batches.expire_after_lines = 20  # an expired batch keeps the lines it finished
    _sync_all(table, full=True, batch=True)
    _sync_until_collected(table)
    finished = 20 if outcome == "expired" else 0
    assert len(_embedded_texts(server)) == 50 - finished
    assert server.batches.lines_embedded == finished
    stored = _stored_vectors(table)
    assert len(stored) == 50 and all(chunk == _source_text(table, k) for k, (chunk, _) in stored.items())
    (job,) = _jobs(table.conn, table.spec.name)
    assert job["provider_status"] == outcome and job["reason"].startswith(f"batch {outcome}")
    assert job["lines_ok"] == finished and job["state"] == "done"


def test_rows_changed_or_deleted_while_their_batch_is_pending(make_batch_table, server: OpenAIServer) -> None:
    table = make_batch_table(30)
    server.batches.hold = True
    _sync_all(table, full=True, batch=True)
    source = table.table.source
    table.conn.execute(sql.SQL("UPDATE {} SET body = 'row 5 was rewritten' WHERE id = 5").format(source))
    table.conn.execute(sql.SQL("DELETE FROM {} WHERE id = 6").format(source))
    table.conn.execute(sql.SQL("INSERT INTO {} VALUES (31, 'row 31 arrived late')").format(source))
    # Changes by key go the ordinary way at once; the parked sweeps are not run, even by a full
    # run that is not in batch mode (the hourly reconcile), so nothing is paid twice.
    _sync_all(table)
    _sync_all(table, full=True)
    assert sorted(_embedded_texts(server)) == ["row 31 arrived late", "row 5 was rewritten"]
    assert sorted(_stored_vectors(table)) == [5, 31]
    server.batches.hold = False
    _sync_until_collected(table)
    stored = _stored_vectors(table)
    assert sorted(stored) == [k for k in range(1, 32) if k != 6]
    chunk, vector = stored[5]
    assert chunk == "row 5 was rewritten"  # never overwritten by the batch's older result
    np.testing.assert_allclose(vector, server.vector_for("row 5 was rewritten"), rtol=1e-6)
    assert len(_embedded_texts(server)) == 2 and server.batches.lines_embedded == 30
    assert table.pending() == 0


def test_a_job_whose_upload_never_happened_is_dropped_and_sent_anew(make_batch_table, server: OpenAIServer) -> None:
    """A run that died (here: failed) before its upload leaves a job with nothing sent: the next
    run drops it and sends its own, and no text is paid for twice."""
    from assets.providers.base import ProviderError

    table = make_batch_table(20)
    server.batches.refuse_uploads = 1
    with pytest.raises(ProviderError, match="upload refusal"):
        _sync_all(table, full=True, batch=True)
    (job,) = _jobs(table.conn, table.spec.name)
    assert job["state"] == "preparing" and not server.batches.created()
    _sync_all(table, full=True, batch=True)
    (job,) = _jobs(table.conn, table.spec.name)
    assert job["state"] == "submitted" and len(server.batches.created()) == 1
    _sync_until_collected(table)
    assert len(_stored_vectors(table)) == 20 and _embedded_texts(server) == []


def test_the_least_privilege_run_role_can_send_and_collect_a_batch(
    make_batch_table, server: OpenAIServer, conn: psycopg.Connection, db_url: str
) -> None:
    from psycopg.conninfo import make_conninfo

    from assets.engine import EmbeddingEngine
    from assets.grants import grant_run_role

    table = make_batch_table(20)
    role = unique("vs_batch_runner")
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        grant_run_role(conn, [table.table], role)
        with psycopg.connect(make_conninfo(db_url, user=role), autocommit=True) as as_role:
            provider = OpenAICompatibleProvider(table.spec.provider)
            engine = EmbeddingEngine(as_role, table.table, provider)
            try:
                engine.sync_buckets(range(4), full=True, batch=True)
                for _ in range(3):
                    engine.sync_buckets(range(4))
            finally:
                engine.close()
                provider.close()
        assert len(_stored_vectors(table)) == 20 and _embedded_texts(server) == []
        assert _jobs(conn, table.spec.name)[0]["state"] == "done"
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_batch_mode_is_refused_for_a_provider_without_a_batch_api() -> None:
    from assets.spec import SpecError

    with pytest.raises(SpecError, match="backfill.mode: batch needs provider.kind openai"):
        parse_spec({"name": "local_batch", "source": "public.docs", "columns": ["body"],
                    "backfill": {"mode": "batch"}}, "test.yaml")


@pytest.mark.parametrize("window", ["while_creating", "while_waiting"])
def test_a_killed_run_is_resumed_with_the_same_batch(
    tmp_path: Path, db_url: str, conn: psycopg.Connection, server: OpenAIServer, window: str
) -> None:
    """SIGKILL a real `vectorsync sync --batch --wait` process after its batch was made: while the
    create call was still unanswered (the id never reached the database), or while it polled.
    The next run finds the same batch; the server saw one."""
    schema, name = unique("kill"), unique("kill")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'row ' || i || ' says something' FROM generate_series(1, 80) i")
                 .format(sql.Identifier(schema, "docs")))
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "docs.yaml").write_text(yaml.safe_dump(_declaration(schema, name, server.base_url)))
    env = {**os.environ, "DATABASE_URL": db_url}
    cli = [sys.executable, "-m", "orchestration.cli", "--tables", str(tables)]
    subprocess.run([*cli, "install"], env=env, cwd=PROJECT, check=True, capture_output=True, timeout=120)
    release = threading.Event()
    if window == "while_creating":
        server.batches.hold_create = release
    server.batches.hold = True
    worker = subprocess.Popen([*cli, "sync", name, "--batch", "--wait", "120"], env=env, cwd=PROJECT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not server.batches.created() or (window == "while_waiting" and not _polled(server)):
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline, "the run never created its batch"
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
        release.set()
    (job,) = _jobs(conn, name)
    assert job["state"] == ("uploaded" if window == "while_creating" else "submitted")
    server.batches.hold = False
    done = subprocess.run([*cli, "sync", name, "--batch", "--wait", "60"], env=env, cwd=PROJECT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (made,) = server.batches.created()
    (job,) = _jobs(conn, name)
    assert job["batch_id"] == made["id"] and job["state"] == "done"
    assert server.batches.lines_embedded == 80 and _embedded_texts(server) == []
    spec = parse_spec(_declaration(schema, name, server.base_url), "test")
    store = sql.Identifier(spec.store_schema, spec.store_name)
    assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(store)).fetchone()[0] == 80


def _polled(server: OpenAIServer) -> bool:
    return any(r.method == "GET" and r.path.startswith("/v1/batches/") for r in server.requests)


def test_a_dagster_run_tagged_for_batch_mode_sends_a_batch_and_the_next_run_stores_it(
    db_url: str, conn: psycopg.Connection, server: OpenAIServer, tmp_path: Path
) -> None:
    """The tag vectorsync/mode=batch (what a UI backfill carries to each of its runs) sends the
    partition's rows as a batch; the next run stores them and shows their cost at the batch rate."""
    import dagster as dg

    from assets.install import install
    from orchestration.embedding_assets import BATCH_MODE_TAG, embeddings_asset
    from orchestration.names import embeddings_asset_key
    from orchestration.instance import prepare_instance
    from orchestration.resources import VectorsyncDatabase

    schema = unique("dgb")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'row ' || i || ' says something' FROM generate_series(1, 30) i")
                 .format(sql.Identifier(schema, "docs")))
    spec = parse_spec(_declaration(schema, unique("dgb"), server.base_url, buckets=1), "test.yaml")
    install(conn, [(spec, "test.yaml")])
    asset = embeddings_asset(spec, "test.yaml")
    resources = {"database": VectorsyncDatabase(url=db_url)}
    home = prepare_instance(db_url, tmp_path / "dagster_home")
    server.batches.hold = True
    with dg.DagsterInstance.from_config(str(home)) as instance:
        sent = dg.materialize([asset], instance=instance, partition_key="000", resources=resources,
                              tags={BATCH_MODE_TAG: "batch"})
        assert sent.success
        assert instance.get_run_by_id(sent.run_id).tags["vectorsync/batches_submitted"] == "1"
        assert len(server.batches.created()) == 1 and _embedded_texts(server) == []
        server.batches.hold = False
        for _ in range(3):  # the ordinary runs after it: poll, then collect and store
            stored = dg.materialize([asset], instance=instance, partition_key="000", resources=resources)
            assert stored.success
            if instance.get_run_by_id(stored.run_id).tags["vectorsync/rows_written"] == "30":
                break
        else:
            raise AssertionError("the batch was never stored")
        tags = instance.get_run_by_id(stored.run_id).tags
        (job,) = _jobs(conn, spec.name)
        assert int(tags["vectorsync/batch_tokens"]) == job["tokens"] == 30 * 4
        half = round(job["tokens"] * SMALL_PRICE / 2 / 1e6, 6)  # figures keep six decimals
        assert float(tags["vectorsync/batch_cost_usd"]) == float(tags["vectorsync/batch_saved_usd"]) == half
        materialization = instance.get_latest_materialization_event(embeddings_asset_key(spec))
        metadata = materialization.asset_materialization.metadata
        assert metadata["batch_tokens"].value == job["tokens"]
    assert _embedded_texts(server) == []


def test_the_tables_sensor_polls_a_pending_batch_every_few_minutes_not_every_minute(
    make_batch_table, server: OpenAIServer, db_url: str, tmp_path: Path
) -> None:
    """While a batch is pending, its buckets' sweep requests stay in the log: the tables sensor asks
    for a run to poll it once per BATCH_POLL_SECONDS instead of every minute, and a change by key in
    such a bucket is still asked for at once."""
    import json
    import time

    import dagster as dg

    from orchestration.embedding_assets import embeddings_asset
    from orchestration.instance import prepare_instance
    from orchestration.resources import VectorsyncDatabase
    from orchestration.sensors import BATCH_POLL_SECONDS, SensedTable, changes_job, tables_sensor

    server.batches.hold = True
    table = make_batch_table(40)
    assert sum(s.batches_submitted for s in _sync_all(table, full=True, batch=True).values()) == 1
    spec = table.spec
    sensor = tables_sensor([SensedTable(spec, changes_job(spec))])
    resources = {"database": VectorsyncDatabase(url=db_url)}
    defs = dg.Definitions(assets=[embeddings_asset(spec, "test")], sensors=[sensor], resources=resources)
    home = prepare_instance(db_url, tmp_path / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)) as instance:

        def tick(cursor: dict | None) -> dg.SensorResult:
            with dg.build_sensor_context(instance=instance, definitions=defs, resources=resources,
                                         cursor=None if cursor is None else json.dumps(cursor)) as context:
                return sensor(context)

        def a_minute_later(cursor: str) -> dict:
            # As if every bucket had been asked for over a minute ago (when an ordinary change is
            # asked for again).
            state = json.loads(cursor)
            state[spec.name] = {k: [v[0], v[1] - 61] if k.isdigit() else v for k, v in state[spec.name].items()}
            return state

        first = tick(None)
        assert first.run_requests  # one run polls the batch
        assert tick(a_minute_later(first.cursor)).run_requests == []  # polled just now: no run
        later = a_minute_later(first.cursor)
        later[spec.name]["_batch_poll"] = [time.time() - BATCH_POLL_SECONDS - 1]
        polled = tick(later)
        assert polled.run_requests  # a poll is due again
        table.conn.execute(sql.SQL("UPDATE {} SET body = body || ' changed' WHERE id = 1").format(table.table.source))
        changed = tick(a_minute_later(polled.cursor))
        assert changed.run_requests  # a change by key is not held back by the pending batch


def test_a_batch_is_not_sent_past_the_daily_budget_counting_batches_in_flight(
    make_batch_table, server: OpenAIServer
) -> None:
    """A batch is paid for when it completes: sending one that would pass the day's budget, with
    the batches still in flight counted as spent, is refused like an ordinary request would be."""
    from dataclasses import replace

    from assets.engine import EmbeddingEngine
    from assets.spec_sections import Budget
    from assets.usage import BudgetExceeded

    tiny = make_batch_table(60, budget={"daily_usd": 1e-9})
    with pytest.raises(BudgetExceeded, match=f"table {tiny.spec.name}: daily budget"):
        _sync_all(tiny, full=True, batch=True)
    assert server.batches.created() == [] and _jobs(tiny.conn, tiny.spec.name) == []
    assert tiny.stored() == {} and tiny.pending() > 0  # nothing lost: the sweeps still wait

    table = make_batch_table(60, budget={"daily_usd": 1.0})
    table.engine.sync_buckets([0, 1], full=True, batch=True)
    (first,) = _jobs(table.conn, table.spec.name)
    assert first["state"] == "submitted"
    first_cost = table.conn.execute("SELECT sum(tokens) FROM vectorsync.batch_items WHERE job_id = %s",
                                    (first["id"],)).fetchone()[0] * SMALL_PRICE / 2 / 1e6
    # A budget the first batch alone fits in: the second half of the rows would pass it.
    tight = table.spec.model_copy(update={"budget": Budget(daily_usd=first_cost * 1.5)})
    engine = EmbeddingEngine(table.conn, replace(table.table, spec=tight), table.engine.provider)
    try:
        with pytest.raises(BudgetExceeded):
            engine.sync_buckets([2, 3], full=True, batch=True)
    finally:
        engine.close()
    assert len(_jobs(table.conn, table.spec.name)) == 1
