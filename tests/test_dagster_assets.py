"""The Dagster side: the embeddings asset materialized on a Postgres-backed instance, its metadata,
lineage and checks, the change sensor's requests, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from orchestration.checks import embeddings_checks
from orchestration.embedding_assets import embeddings_asset, source_asset_spec
from orchestration.names import embeddings_asset_key, source_asset_key
from assets.install import install
from assets.spec import parse_spec
from orchestration.instance import prepare_instance
from orchestration.resources import VectorsyncDatabase
from orchestration.sensors import SensedTable, changes_job, tables_sensor

from conftest import requested_buckets, unique

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def instance(db_url: str, tmp_path_factory: pytest.TempPathFactory):
    home = prepare_instance(db_url, tmp_path_factory.mktemp("dagster_home"))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst


@pytest.fixture
def declared(conn: psycopg.Connection):
    schema = unique("dg")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, title text, body text)").format(
        sql.Identifier(schema, "articles")))
    spec = parse_spec({"name": unique("art"), "source": f"{schema}.articles", "template": "{title}\n{body}",
                       "buckets": 4}, "test.yaml")
    install(conn, [(spec, "test.yaml")])
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'title ' || i, 'body ' || i FROM generate_series(1, 40) i")
                 .format(sql.Identifier(schema, "articles")))
    return spec


def test_materializing_a_partition_embeds_its_bucket(instance, declared, db_url: str, conn) -> None:
    spec = declared
    asset = embeddings_asset(spec, "test.yaml")
    resources = {"database": VectorsyncDatabase(url=db_url)}
    result = dg.materialize([asset], instance=instance, partition_key="001", resources=resources)
    assert result.success
    materialization = result.asset_materializations_for_node(asset.op.name)[0]
    meta = {k: v.value for k, v in materialization.metadata.items()}
    bucket_rows = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE vectorsync.bucket_of(jsonb_build_array(id), 4) = 1").format(
            sql.Identifier(spec.source.schema_, "articles"))).fetchone()[0]
    assert meta["rows_written"] == bucket_rows > 0
    assert meta["dagster/row_count"] == bucket_rows
    assert meta["dagster/table_name"] == f"{spec.source.schema_}.{spec.store_name}"
    for name in ("chunks_embedded", "chunks_reused", "tokens", "provider_seconds", "rows_unchanged"):
        assert name in meta
    assert meta["tokens"] > 0
    lineage = materialization.metadata["dagster/column_lineage"].value
    assert {d.column_name for d in lineage.deps_by_column["embedding"]} == {"title", "body"}
    assert lineage.deps_by_column["embedding"][0].asset_key == source_asset_key(spec)
    schema = materialization.metadata["dagster/column_schema"].value
    assert {c.name: c.type for c in schema.columns} == {
        "id": "integer", "chunk_seq": "int", "chunk": "text", "text_hash": "bytea", "model": "text",
        "embedding": f"vector({spec.provider.dimensions})",
    }

    # the run and its materialization are in the Postgres-backed instance, for the UI
    records = instance.fetch_materializations(embeddings_asset_key(spec), limit=10).records
    assert [r.partition_key for r in records] == ["001"]

    # a second run of the same partition finds nothing to do
    again = dg.materialize([asset], instance=instance, partition_key="001", resources=resources)
    meta2 = {k: v.value for k, v in again.asset_materializations_for_node(asset.op.name)[0].metadata.items()}
    assert meta2["rows_written"] == 0 and meta2["rows_unchanged"] == bucket_rows and meta2["chunks_embedded"] == 0


def test_checks_report_coverage(instance, declared, db_url: str) -> None:
    spec = declared
    resources = {"database": VectorsyncDatabase(url=db_url)}
    asset = embeddings_asset(spec, "test.yaml")
    checks = embeddings_checks(spec)
    result = dg.materialize([asset, *checks], instance=instance, resources=resources,
                            selection=dg.AssetSelection.checks(*checks))
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["coverage"].passed  # unembedded rows are pending, so covered
    assert evaluations["dead_letters"].passed
    assert evaluations["vector_validity"].passed
    assert evaluations["model_consistency"].passed
    assert evaluations["backlog_age"].passed  # the 40 inserts are seconds old


def test_change_sensor_requests_only_buckets_with_new_changes(instance, declared, db_url: str, conn) -> None:
    spec = declared
    sensor = tables_sensor([SensedTable(spec, changes_job(spec))])
    defs = dg.Definitions(
        assets=[source_asset_spec(spec), embeddings_asset(spec, "test.yaml")], sensors=[sensor],
        resources={"database": VectorsyncDatabase(url=db_url)},
    )
    resources = {"database": VectorsyncDatabase(url=db_url)}

    def tick(cursor=None):
        # Closed after the tick: the instance the sensor opens through the context goes with it.
        with dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor,
                                     resources=resources) as context:
            return sensor(context)

    first = tick()
    pending = {b for (b,) in conn.execute(sql.SQL("SELECT DISTINCT bucket FROM {}").format(
        sql.Identifier("vectorsync", spec.queue_name)))}
    assert set().union(*(requested_buckets(r) for r in first.run_requests)) == pending
    assert all(r.run_config["ops"] for r in first.run_requests)
    assert all(r.asset_check_keys == [] for r in first.run_requests)  # drains skip the store scans
    # The source asset is observed with its backlog when changes are requested, and the freshness
    # check (backlog_age) is evaluated with it.
    [observation] = [e for e in first.asset_events if isinstance(e, dg.AssetObservation)]
    assert observation.asset_key == source_asset_key(spec)
    assert observation.metadata["pending_changes"].value >= 40
    [freshness] = [e for e in first.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert freshness.check_name == "backlog_age" and freshness.passed
    # nothing new: no request, and no event (the backlog is still within its limit)
    second = tick(first.cursor)
    assert second.run_requests == [] and second.asset_events == []
    # one new change: exactly its bucket
    conn.execute(sql.SQL("UPDATE {} SET body = 'changed' WHERE id = 7").format(
        sql.Identifier(spec.source.schema_, "articles")))
    bucket = conn.execute("SELECT vectorsync.bucket_of('[7]'::jsonb, 4)").fetchone()[0]
    third = tick(first.cursor)
    assert [requested_buckets(r) for r in third.run_requests] == [{bucket}]


def test_cli_install_status_search(tmp_path: Path, db_url: str, conn) -> None:
    schema = unique("cli")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "notes")))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'How to open and read a file'), (2, 'Baking bread at home')")
                 .format(sql.Identifier(schema, "notes")))
    name = unique("notes")
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "notes.yaml").write_text(f"name: {name}\nsource: {schema}.notes\ncolumns: [body]\nbuckets: 2\n")
    env = {**os.environ, "DATABASE_URL": db_url}
    cli = [sys.executable, "-m", "orchestration.cli", "--tables", str(tables)]

    def run(*args: str) -> str:
        done = subprocess.run([*cli, *args], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert name in run("install")
    run("sync", name)
    status = run("status")
    line = next(row for row in status.splitlines() if row.startswith(name))
    assert line.split()[2:6] == ["2", "2", "2", "2"]  # source rows, embedded, current, chunks
    out = run("search", name, "reading files", "-k", "1")
    assert "[1]" in out and "open and read" in out

    (tables / "notes.yaml").write_text(f"name: {name}\nsource: {schema}.notes\ncolumns: [nope]\n")
    bad = subprocess.run([*cli, "install"], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "notes.yaml" in bad.stderr and "nope" in bad.stderr


def test_continuous_reporter_keeps_no_event_once_it_is_written(instance) -> None:
    """The continuous run's op never returns, so the events it logs must not pile up in its
    context: each is in the event log as soon as it is written, and nowhere else."""
    from assets.engine import SyncStats
    from orchestration.continuous_job import _BatchReporter

    key = dg.AssetKey(["embeddings", unique("reporter")])
    retained: list[bool] = []

    @dg.op
    def report(context) -> None:
        reporter = _BatchReporter(context, key, every_seconds=0.0)
        for i in range(30):
            reporter.add({i % 3: SyncStats(rows_written=1, chunks_embedded=2)})
        reporter.close()
        retained.append(context.has_events())

    @dg.job
    def reporting() -> None:
        report()

    result = reporting.execute_in_process(instance=instance)
    assert result.success
    assert retained == [False]
    records = instance.fetch_materializations(key, limit=100).records
    assert len(records) == 30
    assert {r.partition_key for r in records} == {"000", "001", "002"}
    assert all(r.run_id == result.run_id for r in records)
    assert sum(r.asset_materialization.metadata["rows_written"].value for r in records) == 30


def test_cli_status_reports_a_table_whose_source_is_gone_and_still_shows_the_others(
    tmp_path: Path, db_url: str, conn
) -> None:
    schema = unique("gone")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    for table in ("kept", "dropped"):
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, table)))
    names = {table: unique(table) for table in ("kept", "dropped")}
    install(conn, [(parse_spec({"name": names[t], "source": f"{schema}.{t}", "columns": ["body"], "buckets": 2}, "test.yaml"), "test.yaml")
                   for t in names])
    conn.execute(sql.SQL("DROP TABLE {} CASCADE").format(sql.Identifier(schema, "dropped")))  # and its view

    done = subprocess.run([sys.executable, "-m", "orchestration.cli", "status"], env={**os.environ, "DATABASE_URL": db_url},
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert any(line.startswith(names["kept"] + " ") for line in done.stdout.splitlines())
    assert f"error: table {names['dropped']}: its source" in done.stdout and "does not exist" in done.stdout
