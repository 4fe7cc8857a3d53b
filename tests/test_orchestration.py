"""Schedules and the run-failure sensor, ticked for real against a Postgres-backed instance, and the
reconcile sweep repairing writes the triggers never saw."""

from __future__ import annotations

import time

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from assets.catalog import resolve
from orchestration.embedding_assets import embeddings_asset, source_asset_spec
from assets.index import index_state
from assets.install import install
from assets.spec import parse_spec
from assets.template import render
from assets.text import chunk, text_hash
from orchestration.instance import prepare_instance
from orchestration.names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG, embeddings_asset_key
from orchestration.resources import VectorsyncDatabase
from orchestration.schedules import index_upkeep_job, index_upkeep_schedule, reconcile_schedule, retry_schedule
from orchestration.sensors import record_run_failures

from conftest import requested_buckets, unique


@pytest.fixture(scope="module")
def instance(db_url: str, tmp_path_factory: pytest.TempPathFactory):
    home = prepare_instance(db_url, tmp_path_factory.mktemp("dagster_home"))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst


def declare(conn: psycopg.Connection, rows: int = 40, **fields) -> tuple:
    schema = unique("orc")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "notes")
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text, views int DEFAULT 0)").format(source))
    spec = parse_spec({"name": unique("orc"), "source": f"{schema}.notes", "columns": ["body"], "buckets": 4,
                       **fields}, "test.yaml")
    install(conn, [(spec, "test.yaml")])
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'note number ' || i FROM generate_series(1, %s) i").format(source),
                 (rows,))
    return spec, source


def materialize_all(instance, spec, db_url: str, full_sweep: bool = True) -> dg.ExecuteInProcessResult:
    key = embeddings_asset_key(spec)
    return dg.materialize(
        [embeddings_asset(spec, "test.yaml")],
        instance=instance,
        resources={"database": VectorsyncDatabase(url=db_url)},
        run_config={"ops": {key.to_python_identifier(): {"config": {"full_sweep": full_sweep}}}},
        tags={PARTITION_RANGE_START_TAG: "000", PARTITION_RANGE_END_TAG: f"{spec.buckets - 1:03d}"},
    )


def store_matches_source(conn: psycopg.Connection, spec, source: sql.Identifier) -> None:
    """Every source row's stored hashes are the hashes of its current text; no other row is stored."""
    store = sql.Identifier(spec.store_schema, spec.store_name)
    expected = {}
    for key, body in conn.execute(sql.SQL("SELECT id, body FROM {}").format(source)):
        text = render(spec.template_parts, {"body": body})
        expected[key] = [text_hash(p) for p in chunk(text, spec.chunking)]
    stored: dict[int, list[bytes]] = {}
    for key, digest in conn.execute(sql.SQL("SELECT id, text_hash FROM {} ORDER BY id, chunk_seq").format(store)):
        stored.setdefault(key, []).append(bytes(digest))
    assert stored == expected


def evaluate(schedule, instance, resources_url: str):
    """One tick of `schedule`, in a context that is closed afterwards: a context that reads
    `context.instance` opens an instance of its own, which must not outlive the tick."""
    with dg.build_schedule_context(
        instance=instance, resources={"database": VectorsyncDatabase(url=resources_url)}
    ) as context:
        return schedule(context)


def test_reconcile_schedule_requests_a_full_sweep_of_every_bucket(instance, conn, db_url: str) -> None:
    spec, _ = declare(conn)
    request = evaluate(reconcile_schedule(spec), instance, db_url)
    assert isinstance(request, dg.RunRequest)
    assert requested_buckets(request) == set(range(spec.buckets))
    config = request.run_config["ops"][embeddings_asset_key(spec).to_python_identifier()]["config"]
    assert config == {"full_sweep": True}
    assert request.tags["vectorsync/trigger"] == "reconcile"


def test_reconcile_repairs_writes_the_triggers_did_not_see(instance, conn, db_url: str) -> None:
    spec, source = declare(conn)
    assert materialize_all(instance, spec, db_url, full_sweep=False).success
    store_matches_source(conn, spec, source)
    # Writes with the triggers disabled, and under the replica role (logical replication's
    # apply workers run so): none of them reaches the change log.
    conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(source))
    conn.execute(sql.SQL("UPDATE {} SET body = 'rewritten ' || id WHERE id <= 5").format(source))
    conn.execute(sql.SQL("DELETE FROM {} WHERE id BETWEEN 6 AND 9").format(source))
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(source))
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'unseen ' || i FROM generate_series(100, 104) i").format(source))
    queue = sql.Identifier("vectorsync", spec.queue_name)
    assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(queue)).fetchone()[0] == 0
    # A change-log-only run sees nothing to do; the reconcile sweep repairs all of it.
    assert materialize_all(instance, spec, db_url, full_sweep=False).success
    with pytest.raises(AssertionError):
        store_matches_source(conn, spec, source)
    result = materialize_all(instance, spec, db_url, full_sweep=True)
    assert result.success
    store_matches_source(conn, spec, source)
    # the run's totals (each partition's materialization carries its own bucket's)
    [totals] = result.asset_observations_for_node(embeddings_asset_key(spec).to_python_identifier())
    assert totals.metadata["run_rows_written"].value == 10 and totals.metadata["run_rows_deleted"].value == 4


def test_retry_schedule_asks_only_for_buckets_with_due_failures(instance, conn, db_url: str) -> None:
    spec, _ = declare(conn, rows=4)
    tick = retry_schedule(spec)
    assert isinstance(evaluate(tick, instance, db_url), dg.SkipReason)
    # Two failed rows, one due and one not yet: only the due row's bucket is asked for. The rows'
    # inserts are not pending any more, so whatever bucket the later row hashes to, only the
    # ledger can bring it back.
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier("vectorsync", spec.queue_name)))
    due_key, later_key = "[1]", "[2]"
    due_bucket = conn.execute("SELECT vectorsync.bucket_of(%s::jsonb, %s)", (due_key, spec.buckets)).fetchone()[0]
    for key, when in ((due_key, "now() - interval '1 minute'"), (later_key, "now() + interval '1 hour'")):
        conn.execute(
            sql.SQL("""INSERT INTO vectorsync.failures (table_name, row_key, bucket, error_kind, last_error,
                                                        next_attempt_at)
                       VALUES (%s, %s::jsonb, vectorsync.bucket_of(%s::jsonb, %s), 'server', 'HTTP 503', {})""")
            .format(sql.SQL(when)),
            (spec.name, key, key, spec.buckets),
        )
    request = evaluate(tick, instance, db_url)
    assert isinstance(request, dg.RunRequest)
    assert requested_buckets(request) == {due_bucket}
    config = request.run_config["ops"][embeddings_asset_key(spec).to_python_identifier()]["config"]
    assert config == {"full_sweep": False, "retry_due_failures": True}
    # Running what it asks for retries the due row (it succeeds now) and leaves the other alone.
    result = dg.materialize(
        [embeddings_asset(spec, "test.yaml")], instance=instance, partition_key=request.partition_key,
        resources={"database": VectorsyncDatabase(url=db_url)}, run_config=request.run_config,
    )
    assert result.success
    left = [k for (k,) in conn.execute("SELECT row_key::text FROM vectorsync.failures WHERE table_name = %s",
                                       (spec.name,))]
    assert left == [later_key]


def test_index_upkeep_builds_the_index_once_the_store_is_large_enough(instance, conn, db_url: str) -> None:
    spec, _ = declare(conn, rows=30, index={"min_rows": 25})
    job = index_upkeep_job(spec, "test.yaml")
    schedule = index_upkeep_schedule(spec, "test.yaml", job)
    table = resolve(conn, spec, "test.yaml")
    assert not index_state(conn, table).exists  # install no longer builds it
    skip = evaluate(schedule, instance, db_url)
    assert isinstance(skip, dg.SkipReason) and "0 of the 25" in skip.skip_message
    assert materialize_all(instance, spec, db_url, full_sweep=False).success
    request = evaluate(schedule, instance, db_url)
    assert isinstance(request, dg.RunRequest)
    result = job.execute_in_process(
        instance=instance, run_config=request.run_config, resources={"database": VectorsyncDatabase(url=db_url)}
    )
    assert result.success
    state = index_state(conn, table)
    assert state.exists and state.valid
    assert isinstance(evaluate(schedule, instance, db_url), dg.SkipReason)
    conn.execute("SET enable_seqscan = off")
    try:
        plan = " ".join(r[0] for r in conn.execute(
            sql.SQL("EXPLAIN SELECT id FROM {s} ORDER BY embedding <=> (SELECT embedding FROM {s} LIMIT 1) LIMIT 3")
            .format(s=sql.Identifier(spec.store_schema, spec.store_name))
        ))
    finally:
        conn.execute("RESET enable_seqscan")
    assert state.index in plan


def test_index_upkeep_leaves_a_build_in_progress_alone(instance, conn, db_url: str) -> None:
    """An index under CREATE INDEX CONCURRENTLY reads as invalid until it is done: a second upkeep
    run must neither drop it nor start another build, and once the builder is gone an invalid
    index left behind is replaced."""
    spec, _ = declare(conn, rows=30, index={"min_rows": 25})
    assert materialize_all(instance, spec, db_url, full_sweep=False).success
    table = resolve(conn, spec, "test.yaml")
    job = index_upkeep_job(spec, "test.yaml")
    schedule = index_upkeep_schedule(spec, "test.yaml", job)
    run = lambda: job.execute_in_process(  # noqa: E731
        instance=instance, resources={"database": VectorsyncDatabase(url=db_url)},
    )
    assert run().success
    index = sql.Identifier(spec.store_schema, index_state(conn, table).index)
    oid = conn.execute("SELECT %s::regclass::oid", (index.as_string(conn),)).fetchone()[0]
    # What a build in progress looks like from outside: an invalid index and the build lock held.
    conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s", (oid,))
    with psycopg.connect(db_url, autocommit=True) as builder:
        builder.execute("SELECT pg_advisory_lock(hashtext('vectorsync-index:' || %s))", (spec.name,))
        state = index_state(conn, table)
        assert state.building and state.exists and not state.valid and not state.needs_build
        skip = evaluate(schedule, instance, db_url)
        assert isinstance(skip, dg.SkipReason) and "being built" in skip.skip_message
        assert run().success
        assert conn.execute("SELECT %s::regclass::oid", (index.as_string(conn),)).fetchone()[0] == oid
    # The builder's session ended without finishing: the invalid index is dropped and rebuilt.
    # (Its backend releases the lock when it exits, a moment after the client has closed.)
    deadline = time.monotonic() + 10
    while (state := index_state(conn, table)).building and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not state.building and state.needs_build
    assert isinstance(evaluate(schedule, instance, db_url), dg.RunRequest)
    assert run().success
    state = index_state(conn, table)
    assert state.exists and state.valid
    assert conn.execute("SELECT %s::regclass::oid", (index.as_string(conn),)).fetchone()[0] != oid


def test_run_failure_sensor_records_the_failed_run(instance, conn, db_url: str) -> None:
    spec, source = declare(conn, rows=3)
    conn.execute(sql.SQL("DROP TABLE {} CASCADE").format(source))  # the run cannot resolve its source
    key = embeddings_asset_key(spec)
    result = dg.materialize(
        [source_asset_spec(spec), embeddings_asset(spec, "test.yaml")], instance=instance, partition_key="000",
        resources={"database": VectorsyncDatabase(url=db_url)}, raise_on_error=False,
        selection=[key], tags={"vectorsync/table": spec.name},
    )
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    failure = next(e for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_run_failure)
    context = dg.build_run_status_sensor_context(
        sensor_name="vectorsync_run_failures", dagster_instance=instance, dagster_run=run,
        dagster_event=failure.dagster_event, resources={"database": VectorsyncDatabase(url=db_url)},
    ).for_run_failure()
    record_run_failures(context)
    row = conn.execute(
        """SELECT table_name, error_kind, last_error, state, run_id FROM vectorsync.failure_report
           WHERE run_id = %s""", (run.run_id,)
    ).fetchone()
    assert row is not None
    table_name, kind, error, state, run_id = row
    assert (table_name, kind, state) == (spec.name, "run_failed", "run failed")
    assert spec.source.table in error and "does not exist" in error


def test_a_model_change_fills_a_candidate_while_search_answers_from_the_active_version(
    instance, conn, db_url: str, local_provider
) -> None:
    from assets.promotion import promote
    from assets.search import search
    from orchestration.checks import embeddings_checks

    spec, source = declare(conn, rows=24)
    assert materialize_all(instance, spec, db_url).success
    old_fingerprint = spec.fingerprint
    # A new template: same model and dimension, so every stored vector would be stale.
    changed = parse_spec({**spec.model_dump(by_alias=True, exclude_none=True), "template": "Note: {body}",
                          "columns": None}, "test.yaml")
    assert changed.fingerprint != old_fingerprint
    report = install(conn, [(changed, "test.yaml")])
    assert report.sweeps_requested == [changed.name] and "candidate version 2" in report.notes[changed.name][0]
    table = resolve(conn, changed, "test.yaml")
    hits = search(conn, table, local_provider, "note number 7", k=3)
    assert hits and {h.model for h in hits} == {old_fingerprint}, "search answers from the active version"

    resources = {"database": VectorsyncDatabase(url=db_url)}
    checks = embeddings_checks(changed)

    def evaluations() -> dict[str, dg.AssetCheckEvaluation]:
        result = dg.materialize([embeddings_asset(changed, "test.yaml"), *checks], instance=instance,
                                resources=resources, selection=dg.AssetSelection.checks(*checks))
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    filling = evaluations()
    assert filling["model_consistency"].passed  # the active version is untouched
    assert not filling["candidate_coverage"].passed
    assert filling["candidate_coverage"].severity == dg.AssetCheckSeverity.WARN
    assert filling["candidate_coverage"].metadata["rows_covered"].value == 0
    assert materialize_all(instance, changed, db_url).success
    assert all(e.passed for e in evaluations().values())
    promote(conn, table)
    hits = search(conn, table, local_provider, "note number 7", k=3)
    assert hits and {h.model for h in hits} == {changed.fingerprint}
    models = {m for (m,) in conn.execute(sql.SQL("SELECT DISTINCT embedding_model FROM {}").format(table.view))}
    assert models == {changed.fingerprint}


def test_dagster_yaml_never_holds_the_database_password(tmp_path, monkeypatch) -> None:
    import yaml

    from dagster._core.instance.config import dagster_instance_config
    from orchestration.instance import PASSWORD_ENV, instance_config

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    for pooled in (False, True):  # Dagster's storage, and the opt-in pooled storage classes
        config = instance_config("postgresql://vs:s3cret-pw@db.example:5432/app", pooled_storage=pooled)
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
        assert "s3cret-pw" not in (tmp_path / "dagster.yaml").read_text()
        loaded, _ = dagster_instance_config(str(tmp_path))  # the schema accepts the env reference
        if pooled:
            for key in ("run_storage", "event_log_storage", "schedule_storage"):
                assert loaded[key]["config"]["postgres_db"]["password"] == {"env": PASSWORD_ENV}
        else:
            assert loaded["storage"]["postgres"]["postgres_db"]["password"] == {"env": PASSWORD_ENV}


def test_continuous_keeper_waits_longer_after_each_failure_in_a_row(instance) -> None:
    """A continuous run that fails is replaced at once, one that keeps failing ever more slowly, and
    a run that ends well (or is canceled) starts the count again."""
    from orchestration.keeper import _restart_wait, continuous_restart_delay

    broken = {"now": True}

    @dg.op
    def follow() -> None:
        if broken["now"]:
            raise dg.Failure("the declared source table is gone")

    @dg.job(name=unique("keeper"))
    def continuous() -> None:
        follow()

    assert _restart_wait(instance, continuous.name, time.time()) == (0, 0.0)
    waits = []
    for _ in range(4):
        assert not continuous.execute_in_process(instance=instance, raise_on_error=False).success
        failures, wait = _restart_wait(instance, continuous.name, time.time())
        waits.append((failures, wait))
    assert [f for f, _ in waits] == [1, 2, 3, 4]
    assert waits[0][1] == 0.0
    for failures, wait in waits[1:]:
        # Measured from the failed run's end a moment ago.
        assert continuous_restart_delay(failures) - 5 < wait <= continuous_restart_delay(failures)
    assert [continuous_restart_delay(n) for n in (2, 3, 4, 12)] == [10.0, 20.0, 40.0, 600.0]

    broken["now"] = False
    assert continuous.execute_in_process(instance=instance).success
    assert _restart_wait(instance, continuous.name, time.time()) == (0, 0.0)


def test_a_continuous_run_is_replaced_only_when_code_or_declarations_changed(tmp_path) -> None:
    from orchestration.keeper import code_fingerprint

    declaration = tmp_path / "notes.yaml"
    declaration.write_text("name: notes\nsource: public.notes\ncolumns: [body]\n")
    first = code_fingerprint(declarations=tmp_path)
    assert code_fingerprint(declarations=tmp_path) == first  # a reload with nothing changed
    declaration.write_text("name: notes\nsource: public.notes\ncolumns: [body, title]\n")
    assert code_fingerprint(declarations=tmp_path) != first


def test_one_tables_sensor_gives_each_table_its_own_runs_tags_and_reasons(instance, conn, db_url: str) -> None:
    """The code location has one tables sensor however many tables it declares: one tick asks for
    each table's own runs (its job, its tags, its buckets), starts a continuous table's run, skips a
    table declared with `sensor: false`, and says why for each table, one table's failure included."""
    from conftest import requested_buckets as buckets_of
    from orchestration.sensors import SensedTable, changes_job, tables_sensor
    from orchestration.continuous_job import continuous_job

    changed, _ = declare(conn, rows=12)
    left_out, _ = declare(conn, rows=12, sensor=False)
    continuous, _ = declare(conn, rows=3, continuous=True)
    broken, _ = declare(conn, rows=3)
    # A change log locked by a long statement elsewhere: that table's part of the tick fails after
    # the sensor's lock timeout, the others' do not wait for it.
    locker = psycopg.connect(db_url)
    locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
        sql.Identifier("vectorsync", broken.queue_name)))
    uninstalled = parse_spec({"name": unique("orc"), "source": "public.nowhere", "columns": ["body"]}, "test.yaml")
    tables = [SensedTable(changed, changes_job(changed)), SensedTable(left_out, changes_job(left_out)),
              SensedTable(continuous, changes_job(continuous), continuous_job(continuous, "test.yaml")),
              SensedTable(broken, changes_job(broken)), SensedTable(uninstalled, changes_job(uninstalled))]
    sensor = tables_sensor(tables)
    resources = {"database": VectorsyncDatabase(url=db_url)}
    defs = dg.Definitions(assets=[a for t in tables for a in (source_asset_spec(t.spec), embeddings_asset(t.spec, "test.yaml"))],
                          sensors=[sensor], resources=resources)

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor, resources=resources) as context:
            return sensor(context)

    started_at = time.monotonic()
    first = tick()
    assert time.monotonic() - started_at < 30
    by_table: dict[str, list[dg.RunRequest]] = {}
    for request in first.run_requests:
        by_table.setdefault(request.tags["vectorsync/table"], []).append(request)
    assert set(by_table) == {changed.name, continuous.name}
    pending = {b for (b,) in conn.execute(sql.SQL("SELECT DISTINCT bucket FROM {}").format(
        sql.Identifier("vectorsync", changed.queue_name)))}
    assert set().union(*(buckets_of(r) for r in by_table[changed.name])) == pending
    assert all(r.job_name == f"{changed.name}_changes" and r.tags["vectorsync/trigger"] == "changes"
               for r in by_table[changed.name])
    # The continuous table's fresh changes are its run's to drain: it gets that run, no change run.
    [started] = by_table[continuous.name]
    assert started.job_name == f"{continuous.name}_continuous" and started.tags["vectorsync/trigger"] == "continuous"

    # The next tick: the sensor-path table's buckets were asked for, and every table says why no run.
    again = tables_sensor([t for t in tables if t.spec is not continuous])
    with dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor,
                                 resources=resources) as context:
        quiet = again(context)
    assert quiet.run_requests == []
    reason = quiet.skip_reason.skip_message
    assert f"{changed.name}: every bucket with changes has a run" in reason
    assert f"{left_out.name}: left out (`sensor: false`" in reason
    assert f"{uninstalled.name}: not installed" in reason
    assert f"{broken.name}: failed: LockNotAvailable" in reason
    locker.close()


def test_the_tables_sensor_finds_changes_still_in_the_wal(instance, conn, db_url: str) -> None:
    """capture: logical: a change whose key is only in the WAL yet gets its bucket's run on the
    next tick (the tick drains the slot into the change log first)."""
    from assets.wal_capture import drop_slot_and_publication
    from conftest import requested_buckets as buckets_of
    from orchestration.sensors import SensedTable, changes_job, tables_sensor

    spec, source = declare(conn, rows=5, capture="logical")
    try:
        assert materialize_all(instance, spec, db_url).success
        queue = sql.Identifier("vectorsync", spec.queue_name)
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(queue)).fetchone()[0] == 0
        conn.execute(sql.SQL("UPDATE {} SET body = 'changed' WHERE id = 3").format(source))
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(queue)).fetchone()[0] == 0  # in the WAL only
        sensor = tables_sensor([SensedTable(spec, changes_job(spec))])
        resources = {"database": VectorsyncDatabase(url=db_url)}
        defs = dg.Definitions(assets=[source_asset_spec(spec), embeddings_asset(spec, "test.yaml")],
                              sensors=[sensor], resources=resources)
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
            result = sensor(context)
        bucket = conn.execute("SELECT vectorsync.bucket_of('[3]'::jsonb, %s)", (spec.buckets,)).fetchone()[0]
        assert set().union(*(buckets_of(r) for r in result.run_requests)) == {bucket}
        assert materialize_all(instance, spec, db_url, full_sweep=False).success
        store_matches_source(conn, spec, source)
    finally:
        drop_slot_and_publication(conn, spec.name)
