"""Model versions side by side (assets/versions.py, assets/promotion.py): a new model, dimension,
template or chunking fills a candidate beside the active version; search answers from the active
version only, with its own query model; promotion and rollback switch in one transaction.

Against the embedded PostgreSQL, the real local model and the OpenAI-compatible test server
(tests/openai_server.py), through the real `openai` client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from assets import versions
from assets.catalog import ResolvedTable, resolve
from assets.engine import EmbeddingEngine
from assets.install import install
from assets.promotion import GateResult, PromotionRefused, coverage, maybe_auto_promote, promote, rollback
from assets.providers import provider_for
from assets.search import Fusion, hybrid_search, run_search, search
from assets.spec import TableSpec, parse_spec
from orchestration.cli import main
from orchestration.database import connect
from conftest import unique
from openai_server import OpenAIServer

PROJECT = Path(__file__).resolve().parent.parent
WORDS = "vector index search model table row chunk query store promote rollback version".split()


@pytest.fixture(autouse=True)
def _openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def openai(server: OpenAIServer, model: str, dimensions: int, **fields) -> dict:
    return {"kind": "openai", "model": model, "dimensions": dimensions, "base_url": server.base_url,
            "max_retries": 0, **fields}


def body(i: int) -> str:
    return f"row {i}: " + " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 8))


def make_source(conn: psycopg.Connection, rows: int) -> tuple[str, str]:
    schema = unique("ver")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, title text, body text)").format(
        sql.Identifier(schema, "docs")))
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'title ' || i, (%s::text[])[i] FROM generate_series(1, %s) i")
                 .format(sql.Identifier(schema, "docs")), ([body(i) for i in range(1, rows + 1)], rows))
    return schema, "docs"


def declare(source: tuple[str, str], name: str, **fields) -> TableSpec:
    fields.setdefault("columns", ["body"])
    return parse_spec({"name": name, "source": {"schema": source[0], "table": source[1]}, "buckets": 4,
                       **fields}, "test")


def installed(conn: psycopg.Connection, spec: TableSpec) -> ResolvedTable:
    install(conn, [(spec, "test")])
    return resolve(conn, spec, "test")


def sync_all(conn: psycopg.Connection, declared: ResolvedTable, buckets: list[int] | None = None) -> None:
    """What a run of these buckets does: every live version, active first, each with its model."""
    for vt in versions.live_tables(conn, declared):
        engine = EmbeddingEngine(conn, vt.table, provider_for(vt.table.spec.provider), reuse_from=vt.reuse_from)
        try:
            engine.sync_buckets(buckets if buckets is not None else range(vt.table.spec.buckets))
        finally:
            engine.close()


def two_versions(conn: psycopg.Connection, rows: int, prefix: str, new_provider: dict,
                 **new_fields) -> tuple[str, ResolvedTable, ResolvedTable, TableSpec]:
    """A source of `rows` rows embedded by the local model (version 1, synced), then declared with
    `new_provider` and installed: (name, version 1's table, the new declaration's table, its spec)."""
    source = make_source(conn, rows)
    name = unique(prefix)
    old = installed(conn, declare(source, name))
    sync_all(conn, old)
    spec = declare(source, name, provider=new_provider, **new_fields)
    return name, old, installed(conn, spec), spec


def states(conn: psycopg.Connection, name: str) -> dict[int, str]:
    return dict(conn.execute("SELECT version, state FROM vectorsync.versions WHERE table_name = %s", (name,)))


def column_type(conn: psycopg.Connection, relation: sql.Identifier, column: str = "embedding") -> str | None:
    found = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                         "to_regclass(%s) AND attname = %s", (relation.as_string(conn), column)).fetchone()
    return found and found[0]


def test_same_dimension_model_change_fills_beside_and_switches(conn: psycopg.Connection) -> None:
    with OpenAIServer(dimensions=384) as server:
        name, old, new, new_spec = two_versions(conn, 30, "same", openai(server, "embed-b", 384))
        assert states(conn, name) == {1: "active", 2: "candidate"}
        # Until the switch, search embeds with the installed model (not the declared one) and
        # answers from version 1: the new model's server sees no query.
        hits = search(conn, new, None, "promote a version")
        assert hits and {h.model for h in hits} == {old.spec.fingerprint}
        assert not server.requests
        sync_all(conn, new)
        cov = coverage(conn, versions.version_table(conn, new, versions.in_state(conn, name, "candidate")))
        assert cov.complete and cov.rows_embedded == 30
        # The active store was never touched by the new declaration.
        assert conn.execute(sql.SQL("SELECT count(*), min(model) = max(model) FROM {}").format(old.store)).fetchone() \
            == (30, True)
        promote(conn, new)
        assert states(conn, name) == {1: "previous", 2: "active"}
        hits = search(conn, new, None, "promote a version")
        assert hits and {h.model for h in hits} == {new_spec.fingerprint}
        assert "promote a version" in server.requests[-1].inputs
        view = conn.execute(sql.SQL("SELECT DISTINCT embedding_model FROM {}").format(new.view)).fetchall()
        assert view == [(new_spec.fingerprint,)]


def test_dimension_change_384_to_1536_and_rollback(conn: psycopg.Connection) -> None:
    with OpenAIServer(dimensions=1536) as server:
        name, old, new, big = two_versions(conn, 24, "dims", openai(server, "text-embedding-3-small", 1536))
        candidate = versions.in_state(conn, name, "candidate")
        assert column_type(conn, candidate.store) == "vector(1536)"
        assert column_type(conn, old.view) == "vector(384)"
        reader = unique("reader")
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(reader)))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(old.view, sql.Identifier(reader)))
        sync_all(conn, new)
        switch = promote(conn, new)
        assert (switch.active, switch.previous) == (2, 1)
        assert column_type(conn, old.view) == "vector(1536)"
        # The view was recreated for its new column type, with the privileges granted on it.
        assert conn.execute("SELECT has_table_privilege(%s, %s, 'SELECT')",
                            (reader, old.view.as_string(conn))).fetchone()[0]
        hits = hybrid_search(conn, new, None, "rollback version", k=3)
        assert hits and {h.model for h in hits} == {big.fingerprint}
        # Rows written after the switch reach both versions: the previous one is kept current.
        conn.execute(sql.SQL("INSERT INTO {} VALUES (100, 't', 'a brand new row about rollback')").format(old.source))
        sync_all(conn, new)
        back = rollback(conn, new)
        assert (back.active, back.previous) == (1, 2)
        assert states(conn, name) == {1: "active", 2: "candidate"}
        assert column_type(conn, old.view) == "vector(384)"
        hits = search(conn, new, None, "a brand new row about rollback", k=1)
        assert hits[0].key == (100,) and hits[0].model == old.spec.fingerprint
        # The rolled-back version is a candidate again, promotable by hand; nothing to roll back to now.
        with pytest.raises(PromotionRefused, match="no previous version"):
            rollback(conn, new)
        assert promote(conn, new).active == 2


def test_template_only_change_sends_no_unchanged_chunk_text(conn: psycopg.Connection) -> None:
    """A new chunking size changes the fingerprint but not the pieces of short rows: their vectors
    are taken from the active store, and only the long rows' new pieces are sent."""
    with OpenAIServer(dimensions=16) as server:
        source = make_source(conn, 40)
        long_text = " ".join(f"word{i}" for i in range(300))  # about 2,300 characters: chunked
        conn.execute(sql.SQL("UPDATE {} SET body = %s WHERE id IN (1, 2)").format(sql.Identifier(*source)),
                     (long_text + " one",))
        name = unique("tmpl")
        first = declare(source, name, provider=openai(server, "embed", 16))
        sync_all(conn, installed(conn, first))
        before = len(server.requests)
        rechunked = declare(source, name, provider=openai(server, "embed", 16),
                            chunking={"size": 1200, "overlap": 50})
        assert rechunked.fingerprint != first.fingerprint
        new = installed(conn, rechunked)
        sync_all(conn, new)
        sent = [t for r in server.requests[before:] for t in r.inputs]
        assert sent and all("word" in t for t in sent)  # only pieces of the two long rows
        assert not any(t == body(i) for t in sent for i in range(3, 41))
        cov = coverage(conn, versions.version_table(conn, new, versions.in_state(conn, name, "candidate")))
        assert cov.complete and cov.rows_embedded == 40


def test_promotion_is_refused_until_complete_and_gated(conn: psycopg.Connection) -> None:
    with OpenAIServer(dimensions=32) as server:
        name, _, new, _ = two_versions(conn, 40, "gate", openai(server, "embed", 32))
        with pytest.raises(PromotionRefused, match=r"covers 0/40 rows \(4 buckets waiting"):
            promote(conn, new)
        sync_all(conn, new, buckets=[0, 1])
        with pytest.raises(PromotionRefused, match=r"2 buckets waiting"):
            promote(conn, new)
        sync_all(conn, new)
        seen = []

        def refuse(pair) -> GateResult:
            seen.append((pair.active.version.version, pair.candidate.version.version, pair.coverage.complete))
            # A gate can search each version with its own model, as an evaluation does.
            for side in (pair.active, pair.candidate):
                vector = provider_for(side.table.spec.provider).embed(["rollback version"]).vectors[0]
                hits = run_search(pair.conn, side.table, vector, None, 3, None, Fusion(),
                                  version=side.version.version)
                assert hits and {h.model for h in hits} == {side.version.fingerprint}
            return GateResult(False, "recall@10 0.61 < 0.80 - 0.02")

        with pytest.raises(PromotionRefused, match="the gate refused: recall@10"):
            promote(conn, new, gate=refuse)
        assert seen == [(1, 2, True)] and states(conn, name) == {1: "active", 2: "candidate"}
        assert promote(conn, new, gate=lambda pair: GateResult(True)).active == 2
        # CLI: one clear line and exit 2 when there is nothing to promote.
        assert states(conn, name) == {1: "previous", 2: "active"}


def test_expired_previous_version_is_dropped_with_its_space(conn: psycopg.Connection) -> None:
    with OpenAIServer(dimensions=8) as server:
        name, old, new, _ = two_versions(conn, 20, "drop", openai(server, "embed", 8),
                                         versions={"keep_previous_hours": 0})
        sync_all(conn, new)
        switch = promote(conn, new)
        assert list(switch.dropped) == [1] and switch.dropped[1] > 0
        assert column_type(conn, old.store) is None and states(conn, name) == {1: "retired", 2: "active"}
        # The capture function no longer names the dropped change log: writes still work.
        conn.execute(sql.SQL("INSERT INTO {} VALUES (500, 't', 'after the drop')").format(old.source))
        sync_all(conn, new)
        assert search(conn, new, None, "after the drop", k=1)[0].key == (500,)


def test_a_fill_killed_midway_resumes_to_completion(conn: psycopg.Connection, db_url: str, tmp_path: Path) -> None:
    """A real `vectorsync sync` process filling a candidate is killed with SIGKILL; nothing
    switches, and the next sync completes it without re-sending what was stored."""
    with OpenAIServer(dimensions=16, latency=0.25) as server:
        source = make_source(conn, 240)
        name = unique("kill")
        slow = {"batch_size": 8, "max_concurrency": 1}  # 30 requests of 0.25 s; pages of 16 rows
        old = installed(conn, declare(source, name, provider=openai(server, "embed-a", 16, **slow), page_size=16))
        sync_all(conn, old)
        new_spec = declare(source, name, provider=openai(server, "embed-b", 16, **slow), page_size=16)
        new = installed(conn, new_spec)
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(new_spec.model_dump(mode="json", by_alias=True)))
        env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(PROJECT)}
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from orchestration.cli import main; sys.exit(main(sys.argv[1:]))",
             "--tables", str(tmp_path), "sync", name],
            cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        candidate = versions.in_state(conn, name, "candidate")
        deadline = time.monotonic() + 120
        stored = 0
        while stored < 40 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
            stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(candidate.store)).fetchone()[0]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(candidate.store)).fetchone()[0]
        assert 40 <= stored < 240, "the kill must land mid-fill"
        with pytest.raises(PromotionRefused, match="not promoted"):
            promote(conn, new)
        assert states(conn, name) == {1: "active", 2: "candidate"}
        before = len(server.requests)
        sync_all(conn, new)
        resent = [t for r in server.requests[before:] for t in r.inputs]
        assert len(resent) <= 240 - stored + 8 * 4  # at most the pages in flight when it died
        assert promote(conn, new).active == 2


def test_no_search_mixes_models_while_writers_write_through_fill_and_switch(conn: psycopg.Connection,
                                                                            db_url: str) -> None:
    """Same dimension, two models (each on its own server, so the server that received a query
    says which model embedded it). Writers insert and update, a runner fills both versions and
    promotes as soon as it may, searches run all along: every search's hits are under exactly the
    fingerprint of the model that embedded its query."""
    # The new model answers in 20 ms, 8 texts a request: the fill takes seconds, searched throughout.
    with OpenAIServer(dimensions=64) as server_a, OpenAIServer(dimensions=64, latency=0.02) as server_b:
        source = make_source(conn, 400)
        name = unique("mixed")
        spec_a = declare(source, name, provider=openai(server_a, "model-a", 64))
        spec_b = declare(source, name, provider=openai(server_b, "model-b", 64, batch_size=8, max_concurrency=1),
                         page_size=40)
        old = installed(conn, spec_a)
        sync_all(conn, old)
        new = installed(conn, spec_b)
        stop = threading.Event()
        errors: list[BaseException] = []
        results: list[tuple[str, str, set[str | None]]] = []
        promoted = threading.Event()

        def guarded(work):
            def run() -> None:
                try:
                    with connect(db_url) as c:
                        work(c)
                except BaseException as exc:  # noqa: BLE001 - reported by the test below
                    errors.append(exc)
                    stop.set()
            return threading.Thread(target=run)

        def writer(c: psycopg.Connection) -> None:
            i = 1000
            while not stop.is_set():
                i += 1
                c.execute(sql.SQL("INSERT INTO {} VALUES (%s, 't', %s)").format(old.source), (i, body(i)))
                c.execute(sql.SQL("UPDATE {} SET body = body || ' edited' WHERE id = %s").format(old.source),
                          (i % 400 + 1,))
                time.sleep(0.02)

        def runner(c: psycopg.Connection) -> None:
            while not stop.is_set():
                sync_all(c, resolve(c, spec_b, "test"))
                if not promoted.is_set():
                    try:
                        promote(c, resolve(c, spec_b, "test"))
                        promoted.set()
                    except PromotionRefused:
                        pass

        def searcher(c: psycopg.Connection) -> None:
            table = resolve(c, spec_b, "test")
            n = 0
            while not stop.is_set():
                n += 1
                query = f"search {n} {WORDS[n % len(WORDS)]}"
                hits = (hybrid_search if n % 2 else search)(c, table, None, query, k=5)
                results.append((query, "", {h.model for h in hits}))

        threads = [guarded(writer), guarded(runner), guarded(searcher), guarded(searcher)]
        for t in threads:
            t.start()
        promoted.wait(timeout=240)
        time.sleep(2.0)  # searches after the switch too
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert promoted.is_set(), "the candidate never became complete under writes"
        by_a = {q for r in server_a.requests for q in r.inputs if q.startswith("search ")}
        by_b = {q for r in server_b.requests for q in r.inputs if q.startswith("search ")}
        fingerprint = {spec_a.fingerprint: by_a, spec_b.fingerprint: by_b}
        checked = {spec_a.fingerprint: 0, spec_b.fingerprint: 0}
        for query, _, models in results:
            assert len(models) == 1, f"{query!r} returned hits under {models}"
            model = next(iter(models))
            assert query in fingerprint[model], f"{query!r} answered under {model} but embedded by the other model"
            checked[model] += 1
        assert checked[spec_a.fingerprint] > 0 and checked[spec_b.fingerprint] > 0, checked


def test_cli_versions_promote_and_rollback(conn: psycopg.Connection, tmp_path: Path, capsys) -> None:
    with OpenAIServer(dimensions=8) as server:
        source = make_source(conn, 12)
        name = unique("cli")
        old = installed(conn, declare(source, name))
        sync_all(conn, old)
        spec = declare(source, name, provider=openai(server, "embed", 8))
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
        args = ["--tables", str(tmp_path)]
        assert main([*args, "install"]) == 0
        assert f"{name}: candidate version 2" in capsys.readouterr().out
        assert main([*args, "promote", name]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "covers 0/12 rows" in err
        assert main([*args, "sync", name]) == 0
        capsys.readouterr()
        assert main([*args, "versions", name]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1].split()[:2] == ["1", "active"] and "12/12" in out[1]
        assert out[2].split()[:2] == ["2", "candidate"] and "12/12" in out[2] and spec.fingerprint in out[2]
        assert main([*args, "promote", name]) == 0
        assert "version 2 is active, version 1 was" in capsys.readouterr().out
        assert main([*args, "rollback", name]) == 0
        assert "version 1 is active" in capsys.readouterr().out
        assert main([*args, "rollback", name]) == 2
        assert "no previous version" in capsys.readouterr().err


def test_auto_promotion_waits_for_completion_and_never_undoes_a_rollback(conn: psycopg.Connection) -> None:
    with OpenAIServer(dimensions=8) as server:
        name, old, new, spec = two_versions(conn, 16, "auto", openai(server, "embed", 8),
                                            versions={"promote": "auto"})
        sync_all(conn, new, buckets=[0])
        assert maybe_auto_promote(conn, new) is None  # still filling: nothing happens
        sync_all(conn, new)
        assert maybe_auto_promote(conn, new).active == 2
        rollback(conn, new)
        sync_all(conn, new)
        assert maybe_auto_promote(conn, new) is None  # the rolled-back version waits for a person
        assert states(conn, name) == {1: "active", 2: "candidate"}


def test_capture_follows_the_columns_of_every_live_version(conn: psycopg.Connection) -> None:
    """The active version renders `title` and `body`; the declared candidate only `body`. An edit of
    the title alone must still reach the active version, which search answers from."""
    with OpenAIServer(dimensions=8) as server:
        source = make_source(conn, 6)
        name = unique("cols")
        old = installed(conn, declare(source, name, template="{title}: {body}", columns=None))
        sync_all(conn, old)
        new = installed(conn, declare(source, name, provider=openai(server, "embed", 8)))
        sync_all(conn, new)
        conn.execute(sql.SQL("UPDATE {} SET title = 'renamed' WHERE id = 3").format(old.source))
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(old.queue)).fetchone()[0] == 1
        sync_all(conn, new)
        chunk = conn.execute(sql.SQL("SELECT chunk FROM {} WHERE id = 3").format(old.store)).fetchone()[0]
        assert chunk.startswith("renamed: ")
        candidate = versions.in_state(conn, name, "candidate")
        assert conn.execute(sql.SQL("SELECT chunk FROM {} WHERE id = 3").format(candidate.store)).fetchone()[0] \
            == body(3)


TOPICS = {
    1: ("Baking sourdough bread at home needs a starter, flour, water, salt and a hot oven.",
        "how do I bake bread with a starter"),
    2: ("To fix a flat bicycle tyre, remove the wheel, find the puncture and patch the inner tube.",
        "repair a punctured bike tire"),
    3: ("Tomato plants want full sun, deep watering and a stake to climb as the fruit grows.",
        "growing tomatoes in the garden"),
    4: ("A cat purrs when content and kneads soft blankets with its paws.",
        "why does my kitten purr"),
    5: ("Jupiter is the largest planet of the solar system, a gas giant with a great red storm.",
        "biggest planet orbiting the sun"),
    6: ("Brew espresso by forcing hot water through finely ground coffee under pressure.",
        "making strong coffee with an espresso machine"),
    7: ("The violin has four strings tuned in fifths and is played with a bow.",
        "string instrument played with a bow"),
    8: ("Glaciers carve valleys as compacted snow slowly flows downhill under its own weight.",
        "how ice sheets shape mountain valleys"),
}


def test_golden_queries_gate_promotion_and_install_prices_the_fill(
    conn: psycopg.Connection, tmp_path: Path, capsys
) -> None:
    """A declaration with golden queries: install prints what filling the candidate will cost; a
    candidate whose model answers them worse (the test server's vectors carry no meaning) is refused
    by `vectorsync promote` with both versions' figures, and passes only with --skip-quality-gate."""
    schema = unique("gold")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
    for i, (text, _) in TOPICS.items():
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(sql.Identifier(schema, "docs")), (i, text))
    golden = tmp_path / "golden.yaml"
    golden.write_text(yaml.safe_dump([{"query": q, "expected": [i]} for i, (_, q) in TOPICS.items()]))
    name = unique("gold")
    gated = {"golden": "golden.yaml", "golden_k": 3, "max_quality_drop": 0.05}
    old = declare((schema, "docs"), name, versions=gated)
    tables = tmp_path / "tables"
    folder = tables / name  # a component folder: defs.yaml and, beside it, the golden queries
    folder.mkdir(parents=True)
    args = ["--tables", str(tables)]

    def write(spec: TableSpec) -> None:
        attributes = spec.model_dump(mode="json", by_alias=True)
        (folder / "defs.yaml").write_text(yaml.safe_dump({"type": "orchestration.components.EmbeddingTable",
                                                          "attributes": attributes}))

    with OpenAIServer(dimensions=384) as server:
        write(old)
        (folder / "golden.yaml").write_text(golden.read_text())  # relative to the declaration's file
        assert main([*args, "install"]) == 0 and main([*args, "sync", name]) == 0
        new = declare((schema, "docs"), name, versions=gated, provider=openai(server, "embed", 384))
        write(new)
        capsys.readouterr()
        assert main([*args, "install"]) == 0
        out = capsys.readouterr().out
        assert f"{name}: estimate: filling candidate version 2" in out
        assert f"{name}: chunks to send: {len(TOPICS)}" in out and not server.requests  # priced, not sent
        assert main([*args, "sync", name]) == 0
        capsys.readouterr()
        assert main([*args, "promote", name]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the gate refused: candidate is worse on 8 golden queries" in err, err
        assert "recall@3" in err and "mrr@10" in err.lower()
        assert states(conn, name) == {1: "active", 2: "candidate"}
        assert main([*args, "promote", name, "--skip-quality-gate"]) == 0
        assert states(conn, name) == {1: "previous", 2: "active"}
        # The local model answers its own golden queries well: the gate had real figures to compare.
        from assets.quality_gate import live_quality

        quality = live_quality(conn, resolve(conn, new, str(folder / "defs.yaml")))
        active, previous = quality.by_state["active"][1], quality.by_state["previous"][1]
        assert previous.recall_at_k >= 0.75 and previous.mrr_at_10 > active.mrr_at_10


def test_a_continuous_run_ends_when_its_version_stops_being_active(conn: psycopg.Connection, db_url: str) -> None:
    """Continuous mode follows the active version; a promotion ends its run (the tables sensor then
    starts one on the new active version), so no one restarts it by hand."""
    import dagster as dg

    from orchestration.continuous_job import continuous_job
    from orchestration.resources import VectorsyncDatabase

    with OpenAIServer(dimensions=8) as server:
        source = make_source(conn, 12)
        name = unique("cont")
        old_spec = declare(source, name, continuous=True)
        sync_all(conn, installed(conn, old_spec))
        done: list[bool] = []

        def follow() -> None:
            with dg.DagsterInstance.ephemeral() as instance:
                result = continuous_job(old_spec, "test").execute_in_process(
                    instance=instance, resources={"database": VectorsyncDatabase(url=db_url)}, raise_on_error=False)
                done.append(result.success)

        runner = threading.Thread(target=follow, daemon=True)
        runner.start()
        time.sleep(1.0)
        assert runner.is_alive()  # following changes
        new = installed(conn, declare(source, name, continuous=True, provider=openai(server, "embed", 8)))
        sync_all(conn, new)
        promote(conn, new)
        started = time.monotonic()
        runner.join(timeout=60)
        assert not runner.is_alive() and done == [True]
        assert time.monotonic() - started < 30
