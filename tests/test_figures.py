"""What a run reports: each partition's own figures, run totals where Dagster shows a run's, cost
from tokens at the declared price, the daily budget, the commit-to-embedding lag, and the
backlog_age freshness check as the change sensor evaluates it."""

from __future__ import annotations

import time

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from assets.install import install
from assets.spec import parse_spec
from assets.spec_sections import ProviderSpec
from assets.usage import lag_of, price_per_million
from orchestration.embedding_assets import embeddings_asset, source_asset_spec
from orchestration.instance import prepare_instance
from orchestration.names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG, embeddings_asset_key
from orchestration.resources import VectorsyncDatabase
from orchestration.sensors import SensedTable, changes_job, tables_sensor

from conftest import unique

BUCKETS = 4


@pytest.fixture(scope="module")
def instance(db_url: str, tmp_path_factory: pytest.TempPathFactory):
    home = prepare_instance(db_url, tmp_path_factory.mktemp("dagster_home"))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst


def declare(conn: psycopg.Connection, rows: int = 40, **fields):
    schema = unique("fig")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, title text, body text)").format(
        sql.Identifier(schema, "articles")))
    spec = parse_spec({"name": unique("fig"), "source": f"{schema}.articles", "template": "{title}\n{body}",
                       "buckets": BUCKETS, **fields}, "test.yaml")
    install(conn, [(spec, "test.yaml")])
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'title ' || i, repeat('body text ', i %% 7 + 1) || i "
                         "FROM generate_series(1, %s) i").format(sql.Identifier(schema, "articles")), (rows,))
    return spec


def rows_per_bucket(conn: psycopg.Connection, spec) -> dict[str, int]:
    found = conn.execute(
        sql.SQL("SELECT vectorsync.bucket_of(jsonb_build_array(id), %s), count(*) FROM {} GROUP BY 1").format(
            sql.Identifier(spec.source.schema_, spec.source.table)), (BUCKETS,)).fetchall()
    return {f"{b:03d}": n for b, n in found}


def backfill(instance, spec, db_url: str, **kwargs) -> dg.ExecuteInProcessResult:
    """One run over every bucket, as a UI backfill's run (a partition range) is."""
    return dg.materialize(
        [embeddings_asset(spec, "test.yaml")], instance=instance,
        resources={"database": VectorsyncDatabase(url=db_url)},
        tags={PARTITION_RANGE_START_TAG: "000", PARTITION_RANGE_END_TAG: f"{BUCKETS - 1:03d}"}, **kwargs,
    )


def partition_figures(result: dg.ExecuteInProcessResult, spec) -> dict[str, dict]:
    node = embeddings_asset_key(spec).to_python_identifier()
    return {m.partition: {k: v.value for k, v in m.metadata.items()}
            for m in result.asset_materializations_for_node(node)}


def test_each_partition_of_a_backfill_run_carries_its_own_figures(instance, db_url: str, conn) -> None:
    spec = declare(conn)
    result = backfill(instance, spec, db_url)
    assert result.success
    figures = partition_figures(result, spec)
    expected = rows_per_bucket(conn, spec)
    assert set(figures) == {f"{b:03d}" for b in range(BUCKETS)}
    # each partition: its own bucket's rows, not the run's totals
    assert {pk: f["rows_written"] for pk, f in figures.items()} == expected
    assert {pk: f["dagster/row_count"] for pk, f in figures.items()} == expected  # source rows, not chunks
    assert len({f["rows_written"] for f in figures.values()}) > 1  # the plots are not flat
    assert len({f["tokens"] for f in figures.values()}) > 1
    for f in figures.values():
        assert f["chunks"] >= f["dagster/row_count"]  # chunks have their own key
        assert f["chunks_embedded"] + f["chunks_reused"] >= f["rows_written"]
        # rounded for display
        assert f["seconds"] == round(f["seconds"], 2) and f["provider_seconds"] == round(f["provider_seconds"], 2)
        assert f["cost_usd"] == 0.0  # the local model
    assert sum(f["rows_written"] for f in figures.values()) == 40

    # the run's totals: in its tags, its log and an observation of the asset, once
    run = instance.get_run_by_id(result.run_id)
    assert run.tags["vectorsync/rows_written"] == "40"
    assert int(run.tags["vectorsync/tokens"]) == sum(f["tokens"] for f in figures.values())
    observations = [e.asset_observation_data.asset_observation for e in result.all_events
                    if e.event_type_value == "ASSET_OBSERVATION"]
    assert [o.metadata["run_rows_written"].value for o in observations] == [40]
    # and in the control schema, per run and per bucket
    status, rows_written, rows_seen, rows_expected = conn.execute(
        "SELECT status, rows_written, rows_seen, rows_expected FROM vectorsync.runs WHERE run_id = %s",
        (result.run_id,)).fetchone()
    # the 40 inserts drained, then the sweep reads the 40 rows again
    assert (status, rows_written, rows_seen, rows_expected) == ("succeeded", 40, 80, 80)
    by_bucket = dict(conn.execute(
        "SELECT bucket, rows_written FROM vectorsync.run_buckets WHERE run_id = %s", (result.run_id,)).fetchall())
    assert {f"{b:03d}": n for b, n in by_bucket.items()} == expected


def test_cost_is_tokens_at_the_declared_price_per_partition_and_per_run(instance, db_url: str, conn) -> None:
    # $2,000 per million tokens: a price that makes a few hundred local tokens visible in dollars
    spec = declare(conn, provider={"price_per_million_tokens": 2000})
    result = backfill(instance, spec, db_url)
    figures = partition_figures(result, spec)
    for f in figures.values():
        assert f["cost_usd"] == round(f["tokens"] * 2000 / 1_000_000, 6)
    tokens, cost = conn.execute("SELECT tokens, cost_usd FROM vectorsync.runs WHERE run_id = %s",
                                (result.run_id,)).fetchone()
    assert tokens == sum(f["tokens"] for f in figures.values()) > 0
    assert cost == pytest.approx(tokens * 0.002)
    run = instance.get_run_by_id(result.run_id)
    assert float(run.tags["vectorsync/cost_usd"]) == pytest.approx(cost, abs=1e-6)
    # the status command's figures
    from assets.usage import spend_by_table

    spend = spend_by_table(conn)[spec.name]
    assert spend.tokens_day == spend.tokens_month == tokens
    assert spend.cost_day == pytest.approx(cost)


def test_list_prices_of_openai_models_and_zero_for_local() -> None:
    def price(**fields) -> float:
        return price_per_million(ProviderSpec(**fields))

    assert price(kind="openai", model="text-embedding-3-small", dimensions=1536) == 0.02
    assert price(kind="openai", model="text-embedding-3-large", dimensions=3072) == 0.13
    assert price(kind="openai", model="text-embedding-ada-002", dimensions=1536) == 0.10
    assert price(kind="openai", model="openai/text-embedding-3-small", dimensions=1536) == 0.02  # via a proxy
    assert price() == 0.0
    assert price(kind="openai", model="nomic-embed-text", dimensions=768) == 0.0  # a server of your own
    assert price(kind="openai", model="text-embedding-3-small", dimensions=1536, price_per_million_tokens=0.01) == 0.01


def test_a_run_that_would_pass_the_daily_budget_stops_and_leaves_the_rest_in_the_log(
    instance, db_url: str, conn
) -> None:
    # Small requests (4 texts) at $0.01 a token: a budget of $2 pays for a few requests only.
    spec = declare(conn, rows=60, page_size=8, provider={"batch_size": 4, "price_per_million_tokens": 10_000},
                   budget={"daily_usd": 2.0})
    queue = sql.Identifier("vectorsync", spec.queue_name)
    result = backfill(instance, spec, db_url, raise_on_error=False,
                      run_config={"ops": {embeddings_asset_key(spec).to_python_identifier():
                                          {"config": {"full_sweep": False}}}})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert spec.name in message and "daily budget of $2.00" in message and "spent today" in message
    written = conn.execute(sql.SQL("SELECT count(DISTINCT id) FROM {}").format(
        sql.Identifier(spec.store_schema, spec.store_name))).fetchone()[0]
    assert 0 < written < 60  # it stopped part way
    pending = conn.execute(sql.SQL("SELECT coalesce(sum(cardinality(row_keys)), 0) FROM {}").format(queue)).fetchone()[0]
    assert pending >= 60 - written  # what it did not write is still in the change log
    status, reason, cost = conn.execute(
        "SELECT status, reason, cost_usd FROM vectorsync.runs WHERE run_id = %s", (result.run_id,)).fetchone()
    assert status == "over_budget" and spec.name in reason
    assert 0 < cost <= 2.0

    # The next run the same day stops before its first request: the spend is the day's.
    again = backfill(instance, spec, db_url, raise_on_error=False,
                     run_config={"ops": {embeddings_asset_key(spec).to_python_identifier():
                                         {"config": {"full_sweep": False}}}})
    assert not again.success
    assert conn.execute(sql.SQL("SELECT count(DISTINCT id) FROM {}").format(
        sql.Identifier(spec.store_schema, spec.store_name))).fetchone()[0] == written

    # ...and the change sensor asks for no run that would only fail, until a higher budget
    resources = {"database": VectorsyncDatabase(url=db_url)}

    def tick(declared):
        sensor = tables_sensor([SensedTable(declared, changes_job(declared))])
        defs = dg.Definitions(assets=[source_asset_spec(declared), embeddings_asset(declared, "test.yaml")],
                              sensors=[sensor], resources=resources)
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
            return sensor(context)

    held = tick(spec)
    assert held.run_requests == [] and "daily budget of $2.00 reached" in held.skip_reason.skip_message
    raised = spec.model_copy(update={"budget": spec.budget.model_copy(update={"daily_usd": 50.0})})
    assert tick(raised).run_requests


def test_a_change_run_records_the_commit_to_embedding_lag(instance, db_url: str, conn) -> None:
    spec = declare(conn)
    time.sleep(1.5)  # the changes wait in the log
    result = backfill(instance, spec, db_url, run_config={
        "ops": {embeddings_asset_key(spec).to_python_identifier(): {"config": {"full_sweep": False}}}})
    figures = partition_figures(result, spec)
    for f in figures.values():
        assert 1.5 <= f["lag_p50_seconds"] <= f["lag_p95_seconds"] <= f["lag_max_seconds"] < 120
    p50, p95, lag_max, cleared = conn.execute(
        "SELECT lag_p50_seconds, lag_p95_seconds, lag_max_seconds, changes_cleared FROM vectorsync.runs "
        "WHERE run_id = %s", (result.run_id,)).fetchone()
    assert 1.5 <= p50 <= p95 <= lag_max and cleared > 0
    run = instance.get_run_by_id(result.run_id)
    assert float(run.tags["vectorsync/lag_p95_seconds"]) == pytest.approx(p95, abs=0.01)


def test_lag_percentiles_weigh_each_entry_by_its_keys() -> None:
    lag = lag_of([(1.0, 1), (10.0, 98), (100.0, 1)])
    assert (lag.p50, lag.p95, lag.max, lag.changes) == (10.0, 10.0, 100.0, 100)
    assert lag_of([]) is None


def test_the_change_sensor_fails_backlog_age_once_the_backlog_is_older_than_its_limit(
    instance, db_url: str, conn
) -> None:
    spec = declare(conn, rows=3, max_backlog_seconds=1)
    sensor = tables_sensor([SensedTable(spec, changes_job(spec))])
    resources = {"database": VectorsyncDatabase(url=db_url)}
    defs = dg.Definitions(assets=[source_asset_spec(spec), embeddings_asset(spec, "test.yaml")], sensors=[sensor],
                          resources=resources)

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor,
                                     resources=resources) as context:
            return sensor(context)

    def freshness(result) -> list[bool]:
        return [e.passed for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]

    first = tick()
    assert freshness(first) == [True]
    time.sleep(1.5)
    late = tick(first.cursor)
    assert freshness(late) == [False]
    [evaluation] = [e for e in late.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert evaluation.check_name == "backlog_age" and evaluation.metadata["oldest_change_seconds"].value > 1
    assert freshness(tick(late.cursor)) == []  # said once, not on every tick
    # the change log drained: passed again
    conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier("vectorsync", spec.queue_name)))
    assert freshness(tick(late.cursor)) == [True]


def test_vectorsync_sync_shows_progress_and_records_its_run(tmp_path, db_url: str, conn) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    schema = unique("cli")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "notes")))
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'note ' || i FROM generate_series(1, 30) i").format(
        sql.Identifier(schema, "notes")))
    name = unique("notes")
    (tmp_path / "notes.yaml").write_text(
        f"name: {name}\nsource: {schema}.notes\ncolumns: [body]\nbuckets: 2\n"
        "provider: {batch_size: 8, price_per_million_tokens: 1000}\n")
    env = {**os.environ, "DATABASE_URL": db_url}
    cli = [sys.executable, "-m", "orchestration.cli", "--tables", str(tmp_path)]
    project = Path(__file__).resolve().parent.parent
    for command in (["install"], ["sync", name]):
        done = subprocess.run([*cli, *command], env=env, cwd=project, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    # not a terminal: plain progress lines on stderr, the last one at the end
    last = [line for line in done.stderr.splitlines() if line.startswith("  progress:")][-1]
    assert "30/30 rows (100%)" in last and "30 chunks" in last and "rows/s" in last
    tokens, cost, expected, status = conn.execute(
        "SELECT tokens, cost_usd, rows_expected, status FROM vectorsync.runs WHERE table_name = %s", (name,)).fetchone()
    assert (expected, status) == (30, "succeeded") and cost == pytest.approx(tokens / 1000)
    assert f"cost_usd={cost:.6f}" in done.stdout


def test_a_continuous_run_stops_at_the_budget_and_its_keeper_starts_no_other(instance, db_url: str, conn) -> None:
    from assets.usage import budget_reached
    from orchestration.continuous_job import continuous_job

    # $10 a token: the first request (a few tokens) already passes a budget of $1.
    spec = declare(conn, rows=5, continuous=True, provider={"price_per_million_tokens": 10_000_000},
                   budget={"daily_usd": 1.0})
    job = continuous_job(spec, "test.yaml")
    result = job.execute_in_process(instance=instance, resources={"database": VectorsyncDatabase(url=db_url)},
                                    raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "daily budget of $1.00 reached" in failure.step_failure_data.error.message
    assert conn.execute("SELECT status FROM vectorsync.runs WHERE run_id = %s", (result.run_id,)).fetchone() == (
        "over_budget",)
    pending = conn.execute(sql.SQL("SELECT coalesce(sum(cardinality(row_keys)), 0) FROM {}").format(
        sql.Identifier("vectorsync", spec.queue_name))).fetchone()[0]
    assert pending == 5  # nothing cleared
    assert "daily budget" in budget_reached(conn, spec)  # what the keeper and the change sensor skip with
