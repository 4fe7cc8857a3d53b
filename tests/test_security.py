"""Security (issue 4, item 5): API keys never land anywhere, and runs work under a least-privilege
role that `vectorsync install --grant ROLE` sets up."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from openai_server import Fault, OpenAIServer
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from reliability_support import audit, create_source, openai_spec

from assets.catalog import resolve
from orchestration.checks import embeddings_checks
from assets.engine import EmbeddingEngine
from orchestration.embedding_assets import embeddings_asset
from orchestration.names import bucket_partition_key
from assets.install import install
from assets.providers import build_provider
from assets.spec import SpecError, parse_spec
from assets.status import table_status
from orchestration.cli import main as cli_main
from orchestration.instance import DAGSTER_DATABASE, prepare_instance
from orchestration.resources import VectorsyncDatabase
from orchestration.sensors import record_run_failures

from conftest import unique

KEY_ENV = "VECTORSYNC_LEAKCHECK_KEY"


def database_url_for(url: str, **changes: str) -> str:
    """The same server as `url`, another database or user (pgserver trusts local sockets)."""
    return make_conninfo(url, **changes)


def tables_containing(conn: psycopg.Connection, needle: str, schemas: list[str]) -> dict[str, int]:
    """Every table of `schemas` with a row whose text form contains `needle`: each row is cast to
    text whole, so every column of every type is searched, whatever the table's shape."""
    found = {}
    tables = conn.execute(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema = ANY(%s) AND table_type = 'BASE TABLE'", (schemas,)
    ).fetchall()
    for schema, name in tables:
        hits = conn.execute(
            sql.SQL("SELECT count(*) FROM {} t WHERE strpos(t::text, %s) > 0").format(sql.Identifier(schema, name)),
            (needle,),
        ).fetchone()[0]
        if hits:
            found[f"{schema}.{name}"] = hits
    return found


def files_containing(directory: Path, needle: str) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# 1. The API key appears nowhere ------------------------------------------------------------------


@pytest.fixture
def leak_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-vectorsync-leakcheck-{secrets.token_hex(16)}"
    monkeypatch.setenv(KEY_ENV, key)
    return key


def test_the_api_key_never_reaches_dagster_or_the_database(
    leak_key: str, conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "dagster_home").mkdir()
    home = prepare_instance(db_url, tmp_path / "dagster_home")
    echo = f"Incorrect API key provided: {leak_key}. You can find your API key at the dashboard."
    with OpenAIServer(dimensions=8) as server, dg.DagsterInstance.from_config(str(home)) as instance:
        source = create_source(conn, rows=40, seed=7)
        spec = openai_spec(source, server.base_url, buckets=2,
                           provider={"api_key_env": KEY_ENV, "max_concurrency": 1, "batch_size": 64})
        install(conn, [(spec, "leak-test")])
        asset = embeddings_asset(spec, "leak-test")
        resources = {"database": VectorsyncDatabase(url=db_url)}
        op_config = {"ops": {asset.op.name: {"config": {"full_sweep": True}}}}

        # Partition 000: the provider fails its request and echoes the key in its error body;
        # the rows go to the ledger (the key masked) and the run succeeds.
        server.fail_next(Fault(status=500, message=echo))
        first = dg.materialize([asset], instance=instance, partition_key="000", resources=resources,
                               run_config=op_config)
        assert first.success
        ledger = conn.execute("SELECT error_kind, last_error FROM vectorsync.failures WHERE table_name = %s",
                              (spec.name,)).fetchall()
        assert ledger and all(kind == "server_error" and "Incorrect API key provided: ***" in err
                              for kind, err in ledger)
        ours = ["vectorsync", spec.source.schema_, spec.store_schema]
        assert tables_containing(conn, "Incorrect API key provided", ours)  # the search finds the echo
        assert tables_containing(conn, leak_key, ours) == {}  # but not the key
        # Partition 001: a 400 echoing the key (the batch is split, then stored).
        server.fail_next(Fault(status=400, message=echo))
        second = dg.materialize([asset], instance=instance, partition_key="001", resources=resources,
                                run_config=op_config)
        assert second.success
        # 000 again: a 404 echoing the key is a run-level error (not retried), so the run fails
        # with it, and the run-failure sensor copies the error into vectorsync.run_failures.
        server.fail_next(Fault(status=404, message=echo))
        # The failed rows of 000 are due again (as the retry schedule would find them), so the
        # run sends them rather than leaving them to the ledger.
        conn.execute("UPDATE vectorsync.failures SET next_attempt_at = now() WHERE table_name = %s", (spec.name,))
        third = dg.materialize([asset], instance=instance, partition_key="000", resources=resources,
                               run_config=op_config, raise_on_error=False, tags={"vectorsync/table": spec.name})
        assert not third.success
        run = instance.get_run_by_id(third.run_id)
        failure = next(e for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_run_failure)
        record_run_failures(dg.build_run_status_sensor_context(
            sensor_name="vectorsync_run_failures", dagster_instance=instance, dagster_run=run,
            dagster_event=failure.dagster_event, resources=resources,
        ).for_run_failure())
        recorded = conn.execute("SELECT error FROM vectorsync.run_failures WHERE run_id = %s", (run.run_id,)).fetchone()
        assert recorded and "Incorrect API key provided: ***" in recorded[0]
        # The key was really in play: the provider sent it with every request.
        assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {leak_key}"}

        with psycopg.connect(database_url_for(db_url, dbname=DAGSTER_DATABASE), autocommit=True) as dagster_db:
            dagster_schemas = [s for (s,) in dagster_db.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'")]
            # The search works: what the runs did is in there, the 404's redacted message included.
            assert tables_containing(dagster_db, spec.name, dagster_schemas)
            assert tables_containing(dagster_db, "model or endpoint", dagster_schemas).get("public.event_logs")
            assert tables_containing(dagster_db, leak_key, dagster_schemas) == {}
        assert tables_containing(conn, leak_key, ours) == {}
        # Nor in the compute logs and anything else Dagster wrote to its home.
        assert files_containing(home, leak_key) == []
        for run in (first, second, third):
            assert leak_key not in json.dumps(run.dagster_run.run_config)
        # The declaration names the variable, never the key.
        registered = conn.execute("SELECT spec FROM vectorsync.embedding_tables WHERE name = %s",
                                  (spec.name,)).fetchone()[0]
        assert registered["provider"]["api_key_env"] == KEY_ENV


def test_a_declaration_cannot_carry_a_key(leak_key: str) -> None:
    base = {"name": "k", "source": "public.docs", "columns": ["body"]}
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "provider": {"kind": "openai", "api_key_env": leak_key}}, "t.yaml")
    assert err.value.field == "provider.api_key_env"
    assert leak_key not in str(err.value)  # the error about a misplaced key does not repeat it
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "provider": {"kind": "openai", "api_key": leak_key}}, "t.yaml")
    assert err.value.field == "provider.api_key"
    assert leak_key not in str(err.value)


# 2. A least-privilege role -----------------------------------------------------------------------


@pytest.fixture
def run_role(conn: psycopg.Connection) -> Iterator[str]:
    role = unique("vs_runner")
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield role
    finally:
        # DROP OWNED revokes every grant (the role owns nothing), so the role can then be dropped.
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_install_grant_gives_a_role_what_runs_need_and_nothing_more(
    run_role: str, conn: psycopg.Connection, db_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    with OpenAIServer(dimensions=8, poison=lambda text: "POISON" in text) as server:
        source_ref = create_source(conn, rows=60, seed=8)
        source = sql.Identifier(*source_ref)
        conn.execute(sql.SQL("UPDATE {} SET body = 'POISON ' || body WHERE id = 7").format(source))
        spec = openai_spec(source_ref, server.base_url)
        tables = tmp_path / "tables"
        tables.mkdir()
        (tables / f"{spec.name}.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
        role_url = database_url_for(db_url, user=run_role)
        assert conninfo_to_dict(role_url)["user"] == run_role

        def cli(url: str, *args: str) -> tuple[int, str, str]:
            # The command's own entry point, in this process: Dagster is imported already here.
            monkeypatch.setenv("DATABASE_URL", url)
            code = cli_main(["--tables", str(tables), *args])
            out, err = capsys.readouterr()
            return code, out, err

        code, _, err = cli(db_url, "install", "--grant", "no_such_role_here")
        assert code == 2 and "role 'no_such_role_here' does not exist" in err
        code, out, err = cli(db_url, "install", "--grant", run_role)
        assert code == 0, err
        assert f"granted role {run_role}" in out
        table = resolve(conn, spec, "grant-test")

        # Exactly these privileges, and no CREATE on any schema: no DDL, no write on the source.
        grants = set(conn.execute(
            "SELECT table_schema, table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = %s", (run_role,)).fetchall())
        schema, store_schema = spec.source.schema_, spec.store_schema
        write = {"SELECT", "INSERT", "UPDATE", "DELETE"}
        assert grants == (
            {(schema, spec.source.table, "SELECT"), (store_schema, spec.view_name, "SELECT")}
            | {(store_schema, spec.store_name, p) for p in write}
            | {("vectorsync", spec.queue_name, p) for p in write}
            | {("vectorsync", "failures", p) for p in write}
            | {("vectorsync", t, p) for t in ("batch_jobs", "batch_items", "batch_vectors") for p in write}
            | {("vectorsync", "run_failures", "SELECT"), ("vectorsync", "run_failures", "INSERT")}
            | {("vectorsync", t, p) for t in ("runs", "run_buckets") for p in ("SELECT", "INSERT", "UPDATE")}
            | {("vectorsync", t, "SELECT") for t in ("embedding_tables", "migrations", "failure_report", "versions")}
        )
        for s in {schema, store_schema, "vectorsync", "public"}:
            assert conn.execute("SELECT has_schema_privilege(%s, %s, 'CREATE')", (run_role, s)).fetchone()[0] is False

        with psycopg.connect(role_url, autocommit=True) as as_role:
            assert as_role.execute("SELECT current_user").fetchone()[0] == run_role
            # LISTEN (continuous mode) needs no grant: the capture trigger's notify reaches the role.
            as_role.execute("LISTEN vectorsync_changes")

            # The engine, as the role: advisory locks, reads, binary COPY into the store, the ledger.
            engine = EmbeddingEngine(as_role, table, build_provider(spec.provider))
            try:
                for bucket in range(spec.buckets):
                    engine.sync_bucket(bucket, full=True)
                conn.execute(sql.SQL("UPDATE {} SET body = 'rewritten' WHERE id = 1").format(source))
                conn.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(source))
                assert {n.payload for n in as_role.notifies(timeout=5, stop_after=1)} == {spec.name}
                for bucket in range(spec.buckets):
                    engine.sync_bucket(bucket)
                # The retry schedule's work: re-queue due failures (UPDATE ledger, INSERT change log).
                conn.execute("UPDATE vectorsync.failures SET next_attempt_at = now() WHERE table_name = %s",
                             (spec.name,))
                assert engine.requeue_due_failures() == 1
                # The run-failure sensor's record of a failed run.
                as_role.execute("INSERT INTO vectorsync.run_failures (run_id, job_name, table_name, error) "
                                "VALUES (%s, 'job', %s, 'lost the connection') ON CONFLICT (run_id) DO NOTHING",
                                (unique("run"), spec.name))
            finally:
                engine.close()
            assert table_status(as_role, spec.name).pending_changes == 1

            # What the role cannot do, each refused by PostgreSQL itself.
            refused = {
                "write the source": sql.SQL("UPDATE {} SET body = 'x' WHERE id = 3").format(source),
                "insert into the source": sql.SQL("INSERT INTO {} (id, body) VALUES (-1, 'x')").format(source),
                "delete from the source": sql.SQL("DELETE FROM {} WHERE id = 3").format(source),
                "drop the store": sql.SQL("DROP TABLE {}").format(table.store),
                "truncate the store": sql.SQL("TRUNCATE {}").format(table.store),
                "alter the store": sql.SQL("ALTER TABLE {} ADD COLUMN x int").format(table.store),
                "drop the change log": sql.SQL("DROP TABLE {}").format(table.queue),
                "drop a trigger": sql.SQL("DROP TRIGGER {} ON {}").format(
                    sql.Identifier(f"vectorsync_{spec.name}_insert"), source),
                "create in vectorsync": sql.SQL("CREATE TABLE vectorsync.intruder (x int)"),
                "create in the source schema": sql.SQL("CREATE TABLE {} (x int)").format(
                    sql.Identifier(schema, "intruder")),
                "edit the registry": sql.SQL("UPDATE vectorsync.embedding_tables SET buckets = 1"),
                "edit the migrations": sql.SQL("DELETE FROM vectorsync.migrations"),
            }
            for what, statement in refused.items():
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                    as_role.execute(statement)
                assert "permission denied" in str(err.value) or "must be owner" in str(err.value), what

        # `vectorsync sync` as the role picks up the re-queued row (still poisoned: back to the ledger).
        code, _, err = cli(role_url, "sync", spec.name)
        assert code == 0, err
        result = audit(conn, table, build_provider(spec.provider))
        assert [k for k, kind, _ in result.ledger] == [[7]] and result.ledger[0][1] == "bad_request"
        result.ledger = []
        result.missing = [k for k in result.missing if k != "[7]"]
        assert result.problems() == {}
        assert conn.execute("SELECT attempts FROM vectorsync.failures WHERE table_name = %s",
                            (spec.name,)).fetchone()[0] == 2

        # A Dagster run and every asset check, connected as the role.
        conn.execute(sql.SQL("UPDATE {} SET body = 'once more' WHERE id = 3").format(source))
        bucket = conn.execute("SELECT vectorsync.bucket_of('[3]', %s)", (spec.buckets,)).fetchone()[0]
        asset, checks = embeddings_asset(spec, "grant-test"), embeddings_checks(spec)
        with dg.DagsterInstance.ephemeral() as instance:
            run = dg.materialize([asset, *checks], instance=instance, partition_key=bucket_partition_key(bucket),
                                 resources={"database": VectorsyncDatabase(url=role_url)})
        assert run.success
        evaluations = run.get_asset_check_evaluations()
        assert sorted(e.check_name for e in evaluations) == [
            "backlog_age", "candidate_coverage", "coverage", "dead_letters", "model_consistency", "vector_validity"]
        assert all("permission denied" not in str(e.metadata) for e in evaluations)
        stored = conn.execute(sql.SQL("SELECT chunk FROM {} WHERE id = 3").format(table.store)).fetchall()
        assert stored == [("doc 3\nonce more",)]


def test_a_run_role_of_a_logical_table_needs_the_replication_attribute(
    run_role: str, conn: psycopg.Connection, db_url: str, make_table
) -> None:
    """Draining a replication slot takes REPLICATION, which no GRANT gives: the grant says so;
    with it, the role drains the slot into the change log."""
    from assets.grants import GrantError, grant_run_role
    from assets.wal_capture import drain_table

    t = make_table("id int PRIMARY KEY, body text", columns=["body"], capture="logical")
    with pytest.raises(GrantError, match=f"ALTER ROLE {run_role} REPLICATION"):
        grant_run_role(conn, [t.table], run_role)
    conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(run_role)))
    try:
        grant_run_role(conn, [t.table], run_role)
        t.sync()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'drained by the run role')").format(t.table.source))
        with psycopg.connect(database_url_for(db_url, user=run_role), autocommit=True) as as_role:
            assert drain_table(as_role, t.table) == 1
        assert t.pending() == 1
    finally:
        conn.execute(sql.SQL("ALTER ROLE {} NOREPLICATION").format(sql.Identifier(run_role)))


def test_an_owner_that_is_not_a_superuser_installs_and_a_run_role_searches(
    run_role: str, conn: psycopg.Connection, db_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """In production the owner role that installs is seldom a superuser, and every command opens
    a new session, in which pgvector's library is not loaded yet (its settings, which the search
    function sets, are then unknown to PostgreSQL). Install as such an owner, in a database it
    owns where an administrator created the extension; then sync and search (vector and hybrid)
    as the run role it granted, each command in a session of its own."""
    owner, database = unique("vs_owner"), unique("vs_owned")
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE").format(sql.Identifier(owner)))
    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner)))
    try:
        with psycopg.connect(database_url_for(db_url, dbname=database), autocommit=True) as admin:
            admin.execute("CREATE EXTENSION vector")  # not a trusted extension: an administrator's step
        owner_url = database_url_for(db_url, dbname=database, user=owner)
        role_url = database_url_for(db_url, dbname=database, user=run_role)
        with psycopg.connect(owner_url, autocommit=True) as as_owner:
            assert as_owner.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            source_ref = create_source(as_owner, rows=30, seed=5)
        with OpenAIServer(dimensions=8) as server:
            spec = openai_spec(source_ref, server.base_url)
            tables = tmp_path / "tables"
            tables.mkdir()
            (tables / f"{spec.name}.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))

            def cli(url: str, *args: str) -> tuple[int, str, str]:
                monkeypatch.setenv("DATABASE_URL", url)
                code = cli_main(["--tables", str(tables), *args])
                out, err = capsys.readouterr()
                return code, out, err

            code, out, err = cli(owner_url, "install", "--grant", run_role)
            assert code == 0, err
            code, _, err = cli(role_url, "sync", spec.name)
            assert code == 0, err
            for extra in ([], ["--hybrid"]):
                code, out, err = cli(role_url, "search", spec.name, "doc 4", "-k", "3", *extra)
                assert code == 0, f"search {extra}: {err}"
                assert "doc " in out, out
        with psycopg.connect(owner_url, autocommit=True) as as_owner:
            stored = as_owner.execute(sql.SQL("SELECT count(DISTINCT id) FROM {}").format(
                sql.Identifier(spec.store_schema, spec.store_name))).fetchone()[0]
        assert stored == 30
    finally:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(owner)))
