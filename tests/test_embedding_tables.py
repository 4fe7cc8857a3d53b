"""Declaring, installing, capturing changes, embedding and searching, against the real embedded
PostgreSQL with pgvector and the real local model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql

from assets.install import install
from assets.search import search
from assets.spec import SpecError, load_spec_file, parse_spec
from assets.spec_sections import ProviderSpec
from assets.status import table_status
from assets.text import chunk, text_hash

from conftest import unique

DOCS = "id int PRIMARY KEY, title text, body text, views int DEFAULT 0"


# 2. Declarations ---------------------------------------------------------------------------------

def test_yaml_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: docs\nsource: public.docs\ntemplate: '{title}'\nprovider:\n  dimensions: 512\n")
    with pytest.raises(SpecError) as err:
        load_spec_file(path)
    assert str(path) in str(err.value) and "provider" in err.value.field
    assert "384" in str(err.value)

    path.write_text("name: docs\nsource: public.docs\ntemplate: '{title}'\nbukets: 4\n")
    with pytest.raises(SpecError) as err:
        load_spec_file(path)
    assert err.value.field == "bukets"

    path.write_text("name: docs\nsource: public.docs\ncolumns: [title]\ntemplate: '{title} {body}'\n")
    with pytest.raises(SpecError, match="body"):
        load_spec_file(path)


def test_catalog_errors_come_before_any_ddl(conn: psycopg.Connection) -> None:
    schema = unique("cat")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (title text)").format(sql.Identifier(schema, "nokey")))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, title text)").format(sql.Identifier(schema, "ok")))
    cases = [
        ({"table": "missing"}, "{title}", "source", "does not exist"),
        ({"table": "nokey"}, "{title}", "primary_key", "no primary key"),
        ({"table": "ok"}, "{title} {nope}", "template", "nope"),
    ]
    for source, template, field, message in cases:
        spec = parse_spec({"name": unique("c"), "source": {"schema": schema, **source}, "template": template},
                          "tables/x.yaml")
        with pytest.raises(SpecError) as err:
            install(conn, [(spec, "tables/x.yaml")])
        assert err.value.field == field and message in str(err.value)
        assert "tables/x.yaml" in str(err.value)
    # nothing was created for the refused declarations
    stores = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
                          (schema, "%_store")).fetchone()[0]
    assert stores == 0


# 3. Install ------------------------------------------------------------------------------------

def _catalog_snapshot(conn: psycopg.Connection, schema: str) -> list:
    return conn.execute(
        """SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname IN (%s, 'vectorsync') ORDER BY 1""", (schema,)
    ).fetchall() + conn.execute(
        "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s ORDER BY 1", (schema,)
    ).fetchall()


def test_install_twice_changes_nothing(make_table, conn: psycopg.Connection) -> None:
    t = make_table(DOCS, template="{title}\n{body}")
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'a', 'b')").format(t.table.source))
    t.sync()
    before = _catalog_snapshot(conn, t.spec.source.schema_)
    migrations = conn.execute("SELECT version, applied_at FROM vectorsync.migrations").fetchall()
    report = install(conn, [(t.spec, "test")])
    assert report.migrations_applied == [] and report.sweeps_requested == []
    assert _catalog_snapshot(conn, t.spec.source.schema_) == before
    assert conn.execute("SELECT version, applied_at FROM vectorsync.migrations").fetchall() == migrations
    assert t.pending() == 0


def test_hostile_identifiers_are_quoted(make_table, conn: psycopg.Connection) -> None:
    evil = 'x"; drop table y; --'
    conn.execute("CREATE TABLE IF NOT EXISTS public.y (v int)")
    t = make_table(
        f'{sql.Identifier(evil).as_string(conn)} int PRIMARY KEY, "Body Text" text',
        schema=unique("evil") + '"; select 1; --', table=evil,
        template="{Body Text}",
    )
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'hostile names are only names')").format(t.table.source))
    stats = t.sync()
    assert stats.rows_written == 1
    assert conn.execute("SELECT to_regclass('public.y')").fetchone()[0] is not None
    assert t.stored() == {(1,): ["hostile names are only names"]}


# 4. Change capture -------------------------------------------------------------------------------

def test_insert_update_delete_truncate_reach_the_store(make_table, conn: psycopg.Connection) -> None:
    t = make_table(DOCS, template="{title}: {body}")
    src = t.table.source
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'title ' || i, 'body ' || i FROM generate_series(1, 40) i").format(src))
    t.sync()
    assert len(t.stored()) == 40

    conn.execute(sql.SQL("UPDATE {} SET views = views + 1").format(src))
    assert t.pending() == 0, "an update of a column the text does not use must log nothing"
    conn.execute(sql.SQL("UPDATE {} SET title = title WHERE id < 10").format(src))
    assert t.pending() == 0, "an update that leaves the text as it was must log nothing"

    conn.execute(sql.SQL("UPDATE {} SET body = 'new body' WHERE id = 3").format(src))
    conn.execute(sql.SQL("UPDATE {} SET id = 100 WHERE id = 4").format(src))  # a key change
    conn.execute(sql.SQL("DELETE FROM {} WHERE id = 5").format(src))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (41, 'forty-one', 'b')").format(src))
    t.sync()
    stored = t.stored()
    assert stored[(3,)] == ["title 3: new body"]
    assert (4,) not in stored and stored[(100,)] == ["title 4: body 4"]
    assert (5,) not in stored and (41,) in stored
    assert len(stored) == 40 and t.pending() == 0

    conn.execute(sql.SQL("TRUNCATE {}").format(src))  # no CASCADE: nothing of ours references it
    t.sync()
    assert t.stored() == {}


def test_composite_key_and_unicode(make_table, conn: psycopg.Connection) -> None:
    t = make_table("lang text, id bigint, body text, PRIMARY KEY (lang, id)", template="{body}")
    rows = [("ja", 1, "東京は日本の首都です"), ("de", 1, "Grüße aus Köln 🚀"), ("en", 1, "plain")]
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(t.table.source), rows)
    t.sync()
    assert t.stored() == {(lang, i): [body] for lang, i, body in rows}
    conn.execute(sql.SQL("DELETE FROM {} WHERE lang = 'de'").format(t.table.source))
    t.sync()
    assert set(t.stored()) == {("ja", 1), ("en", 1)}


@pytest.mark.parametrize(("key_sql", "keys"), [
    ("id int", [1, -7, 2147483647]),
    ("id smallint", [3, -32768]),
    # 18 digits hash as int8; 19 do not fit bucket_of's integer rule and hash as jsonb, both sides.
    ("id bigint", [5, -999999999999999999, 999999999999999999, 1000000000000000000, -9223372036854775808]),
    ("id text", ["plain", "Grüße 🚀", "", "with 'quote' and \\ backslash"]),
    ("id varchar(40)", ["v1", "ÄÖÜ"]),
    ("id uuid", ["4a1b2c3d-0000-4000-8000-000000000001", "ffffffff-ffff-4fff-bfff-ffffffffffff"]),
    ("id numeric", [5, "5.5", "-2.000", "12345678901234567890123"]),
    ("id date", ["2026-11-29", "1999-01-01"]),
])
def test_triggers_sweeps_and_bucket_of_put_each_key_in_the_same_bucket(
    make_table, conn: psycopg.Connection, key_sql: str, keys: list
) -> None:
    """The triggers and sweeps bucket the typed key column, everything else bucket_of on the jsonb
    key: for every key type, all three must agree, or a change lands where no run looks for it."""
    t = make_table(f"{key_sql} PRIMARY KEY, body text", template="{body}", buckets=16)
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, 'text of ' || %s::text)").format(t.table.source),
                        [(k, str(k)) for k in keys])
    logged = conn.execute(
        sql.SQL("SELECT e.k, q.bucket, vectorsync.bucket_of(e.k, 16) FROM {} q, unnest(q.row_keys) AS e(k)")
        .format(t.table.queue)
    ).fetchall()
    assert len(logged) == len(keys)
    assert all(trigger == canonical for _, trigger, canonical in logged), logged
    t.sync(full=True)
    stored = conn.execute(
        sql.SQL("SELECT {}, bucket, vectorsync.bucket_of({}, 16) FROM {}").format(
            t.table.key_json(), t.table.key_json(), t.table.store)
    ).fetchall()
    assert len(stored) == len(keys) and all(sweep == canonical for _, sweep, canonical in stored), stored
    assert len({b for _, b, _ in stored}) > 1 or len(keys) < 3  # the keys do spread
    # Equal keys spelled differently in jsonb share a bucket.
    assert conn.execute("SELECT vectorsync.bucket_of('[5]', 16) = vectorsync.bucket_of('[5.000]', 16)").fetchone()[0]
    # An UPDATE that changes a key logs the old key and the new one, each in its own bucket.
    conn.execute(sql.SQL("TRUNCATE {}").format(t.table.queue))
    conn.execute(sql.SQL("UPDATE {} SET body = body || '!'").format(t.table.source))
    conn.execute(sql.SQL("DELETE FROM {} WHERE body LIKE %s").format(t.table.source), (f"text of {keys[0]}%",))
    for _, bucket, canonical in conn.execute(
        sql.SQL("SELECT e.k, q.bucket, vectorsync.bucket_of(e.k, 16) FROM {} q, unnest(q.row_keys) AS e(k)")
        .format(t.table.queue)
    ).fetchall():
        assert bucket == canonical


def test_an_updated_key_is_logged_under_the_bucket_of_each_of_its_values(make_table, conn: psycopg.Connection) -> None:
    t = make_table("id int PRIMARY KEY, body text", template="{body}", buckets=16)
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 50) g").format(t.table.source))
    conn.execute(sql.SQL("TRUNCATE {}").format(t.table.queue))
    conn.execute(sql.SQL("UPDATE {} SET id = id + 1000").format(t.table.source))
    logged = conn.execute(
        sql.SQL("SELECT (e.k ->> 0)::int, q.bucket, vectorsync.bucket_of(e.k, 16) FROM {} q, unnest(q.row_keys) AS e(k)")
        .format(t.table.queue)
    ).fetchall()
    assert sorted(k for k, _, _ in logged) == [*range(1, 51), *range(1001, 1051)]
    assert all(bucket == canonical for _, bucket, canonical in logged)


def test_null_and_empty_content_is_skipped_with_a_reason(make_table, conn: psycopg.Connection) -> None:
    t = make_table(DOCS, template="# {title}\n\n{body}")
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, NULL, NULL), (2, '', '  '), (3, 'ok', NULL)").format(t.table.source))
    stats = t.sync()
    assert stats.rows_skipped == 2 and stats.rows_written == 1
    ledger = conn.execute(
        "SELECT row_key, error_kind, last_error, next_attempt_at FROM vectorsync.failures WHERE table_name = %s "
        "ORDER BY row_key", (t.spec.name,)).fetchall()
    assert [(k, kind) for k, kind, _, _ in ledger] == [([1], "skipped"), ([2], "skipped")]
    assert all("no content" in err and nxt is None for _, _, err, nxt in ledger)
    assert t.pending() == 0
    again = t.sync(full=True)  # no error loop: nothing is retried or sent
    assert again.provider_requests == 0
    conn.execute(sql.SQL("UPDATE {} SET body = 'now it has text' WHERE id = 1").format(t.table.source))
    t.sync()
    assert conn.execute("SELECT count(*) FROM vectorsync.failures WHERE table_name = %s",
                        (t.spec.name,)).fetchone()[0] == 1
    assert (1,) in t.stored()


def test_a_long_document_is_chunked_never_cut(make_table, conn: psycopg.Connection, recording) -> None:
    t = make_table(DOCS, template="{body}", chunking={"size": 1000, "overlap": 100})
    words = [f"word{i} " + ("lorem ipsum " * (i % 7)) for i in range(5000)]
    body = "".join(words)[:50_000]
    assert len(body) == 50_000
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, NULL, %s)").format(t.table.source), (body,))
    t.sync()
    pieces = t.stored()[(1,)]
    assert len(pieces) >= 50
    limit = recording.max_tokens_per_input
    assert max(recording.count_tokens(pieces)) <= limit, "a chunk longer than the model's window would be cut"
    # every character is in some chunk, in order: consecutive pieces overlap or touch
    position = 0
    for piece in pieces:
        found = body.find(piece, max(0, position - 1000))
        assert found != -1 and found <= position
        position = found + len(piece)
    assert position == len(body)


def test_only_changed_chunks_go_to_the_provider(make_table, conn: psycopg.Connection, recording) -> None:
    t = make_table(DOCS, template="{body}", chunking={"size": 200, "overlap": 0})
    paragraphs = [f"Paragraph {i}. " + "Some text about topic %d. " % i * 5 for i in range(6)]
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, NULL, %s), (2, NULL, %s)").format(t.table.source),
                 ("\n\n".join(paragraphs), "same text"))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (3, NULL, 'same text')").format(t.table.source))
    t.sync()
    assert recording.inputs.count("same text") == 1, "the same text is embedded once per run"
    old_pieces = t.stored()[(1,)]
    recording.inputs.clear()
    paragraphs[-1] = "Paragraph 5 was rewritten completely."
    conn.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = 1").format(t.table.source), ("\n\n".join(paragraphs),))
    stats = t.sync()
    new_pieces = t.stored()[(1,)]
    changed = [p for p in new_pieces if p not in old_pieces]
    assert changed and sorted(recording.inputs) == sorted(changed)
    assert stats.chunks_reused == len(new_pieces) - len(changed)


def test_a_row_changed_during_embedding_ends_with_its_new_text(make_table, conn: psycopg.Connection,
                                                              recording, db_url: str) -> None:
    t = make_table(DOCS, template="{body}")
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, NULL, 'old text')").format(t.table.source))

    def update_meanwhile() -> None:
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute(sql.SQL("UPDATE {} SET body = 'new text' WHERE id = 1").format(t.table.source))

    recording.during_request = update_meanwhile
    t.sync()
    # The old text was embedded and written, but the change made meanwhile stayed in the log and
    # the same run picked it up: the row ends with its new text.
    assert recording.inputs == ["old text", "new text"]
    assert t.stored() == {(1,): ["new text"]} and t.pending() == 0
    stored = conn.execute(sql.SQL("SELECT embedding::text, text_hash FROM {}").format(t.table.store)).fetchone()
    expected = recording.inner.embed(["new text"]).vectors[0]
    assert np.allclose(np.array(json.loads(stored[0])), expected, atol=1e-5)
    assert bytes(stored[1]) == text_hash("new text")


def test_a_failed_run_loses_no_change(make_table, conn: psycopg.Connection, recording) -> None:
    from assets.providers.base import ProviderError

    t = make_table(DOCS, template="{body}")
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, NULL, 'row ' || i FROM generate_series(1, 30) i").format(t.table.source))
    pending = t.pending()

    def die() -> None:
        raise ProviderError("auth", "the key was revoked")

    recording.during_request = die
    with pytest.raises(ProviderError):
        t.sync()
    assert t.pending() == pending and t.stored() == {}
    t.sync()
    assert len(t.stored()) == 30 and t.pending() == 0


def test_concurrent_runs_on_one_bucket_do_not_interleave(make_table, conn: psycopg.Connection, db_url, recording) -> None:
    from assets.engine import EmbeddingEngine
    from orchestration.database import connect

    t = make_table(DOCS, template="{body}", buckets=1)
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, NULL, 'row ' || i FROM generate_series(1, 200) i").format(t.table.source))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with connect(db_url) as c:
                engine = EmbeddingEngine(c, t.table, recording)
                engine.sync_bucket(0, full=True)
                engine.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    count, distinct = conn.execute(sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}").format(t.table.store)).fetchone()
    assert count == distinct == 200


# 7, 8. Search and status --------------------------------------------------------------------------

def test_search_finds_the_nearest_rows(make_table, conn: psycopg.Connection, local_provider) -> None:
    t = make_table(DOCS, template="{title}\n{body}", vector_type="halfvec")
    docs = [
        (1, "open", "Open file and return a corresponding file object."),
        (2, "sorted", "Return a new sorted list from the items in iterable."),
        (3, "json.loads", "Deserialize a str instance containing a JSON document to a Python object."),
        (4, "subprocess.run", "Run command with arguments and return a CompletedProcess instance."),
    ]
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} (id, title, body) VALUES (%s, %s, %s)").format(t.table.source), docs)
    t.sync()
    hits = search(conn, t.table, local_provider, "how do I read a file", k=2)
    assert [h.key for h in hits][0] == (1,) and len(hits) == 2
    assert hits[0].score > hits[1].score and hits[0].row["title"] == "open"
    assert search(conn, t.table, local_provider, "turn JSON text into a dict", k=1)[0].row["title"] == "json.loads"


def test_status_counts(make_table, conn: psycopg.Connection) -> None:
    t = make_table(DOCS, template="{body}")
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, NULL, 'row ' || i FROM generate_series(1, 10) i").format(t.table.source))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (11, NULL, NULL)").format(t.table.source))
    s = table_status(conn, t.spec.name)
    assert (s.source_rows, s.rows_embedded, s.pending_changes) == (11, 0, 11 + 4)  # 4 install sweeps
    t.sync()
    conn.execute(sql.SQL("UPDATE {} SET body = 'changed' WHERE id = 1").format(t.table.source))
    s = table_status(conn, t.spec.name)
    assert (s.source_rows, s.rows_embedded, s.rows_current, s.pending_changes, s.skipped_rows) == (11, 10, 9, 1, 1)


def test_chunking_covers_the_text() -> None:
    from assets.spec_sections import Chunking

    text = "alpha beta gamma. " * 300
    pieces = chunk(text, Chunking(size=100, overlap=20))
    assert all(len(p) <= 100 for p in pieces)
    assert pieces[0] == text[: len(pieces[0])] and text.endswith(pieces[-1])
    assert chunk("short", Chunking(size=100, overlap=20)) == ["short"]


def test_a_new_dimension_or_vector_type_becomes_a_candidate_beside_the_store(make_table, conn: psycopg.Connection) -> None:
    """The store search answers from is never altered by a declaration of another size or type:
    install builds a candidate version beside it (docs/changing-a-model.md)."""
    docs = make_table("id int PRIMARY KEY, body text", columns=["body"])

    def vector_type(spec) -> str | None:
        found = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attname = 'embedding'", (sql.Identifier(spec.store_schema, spec.store_name).as_string(conn),)
        ).fetchone()
        return found and found[0]

    bigger = docs.spec.model_copy(update={"provider": ProviderSpec(kind="openai", model="text-embedding-3-small",
                                                                   dimensions=512, send_dimensions=True)})
    report = install(conn, [(bigger, "docs.yaml")])
    assert report.notes[docs.spec.name][0].startswith("candidate version 2")
    assert vector_type(docs.spec) == "vector(384)" and vector_type(bigger.as_version(2)) == "vector(512)"
    halves = docs.spec.model_copy(update={"vector_type": "halfvec"})
    report = install(conn, [(halves, "docs.yaml")])
    assert [n.split(" (")[0] for n in report.notes[docs.spec.name]] == ["candidate version 2", "candidate version 3"]
    assert vector_type(bigger.as_version(2)) is None and vector_type(halves.as_version(3)) == "halfvec(384)"
    assert vector_type(docs.spec) == "vector(384)"


def test_a_new_distance_replaces_the_index_and_a_new_destination_is_swept(make_table, conn: psycopg.Connection) -> None:
    docs = make_table("id int PRIMARY KEY, body text", columns=["body"], index={"min_rows": 0})
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'one'), (2, 'two')").format(docs.table.source))
    docs.sync()
    index = sql.Identifier(docs.spec.store_schema, f"{docs.spec.store_name}_hnsw").as_string(conn)

    def indexdef() -> str:
        return conn.execute("SELECT pg_get_indexdef(to_regclass(%s))", (index,)).fetchone()[0]

    assert "vector_cosine_ops" in indexdef()
    install(conn, [(docs.spec.model_copy(update={"distance": "l2"}), "docs.yaml")])
    assert "vector_l2_ops" in indexdef()
    moved = docs.spec.model_copy(update={"destination": "docs_elsewhere"})
    report = install(conn, [(moved, "docs.yaml")])
    assert report.sweeps_requested == [moved.name]  # same fingerprint, but an empty store


def test_install_upgrades_a_one_key_per_row_log_and_rebuckets_an_old_store(
    make_table, conn: psycopg.Connection
) -> None:
    """A database installed by an earlier version: its change log held one key per row in
    `row_key`, and its store's buckets came from another hash. Install converts the log without
    losing a pending key, moves chunks to their buckets, and asks for a sweep of every bucket."""
    t = make_table("id int PRIMARY KEY, body text", columns=["body"], buckets=4)
    source, queue, store = t.table.source, t.table.queue, t.table.store
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'text ' || i FROM generate_series(1, 12) i").format(source))
    t.sync()
    assert t.pending() == 0 and len(t.stored()) == 12
    # What the earlier version left: pending keys one per row, and buckets of the old hash.
    conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN row_keys, ADD COLUMN row_key jsonb").format(queue))
    conn.execute(sql.SQL("INSERT INTO {} (bucket, row_key) VALUES (0, '[3]'), (1, '[5]'), (2, NULL)").format(queue))
    conn.execute(sql.SQL("UPDATE {} SET bucket = (id + 1) % 4").format(store))
    with conn.transaction():  # the edit that key 3's entry stands for (the old trigger logged it)
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(sql.SQL("UPDATE {} SET body = 'text 3, edited' WHERE id = 3").format(source))

    install(conn, [(t.spec, "test")])

    entries = conn.execute(sql.SQL("SELECT bucket, row_keys::text[] FROM {} ORDER BY id").format(queue)).fetchall()
    keys = sorted(k for _, ks in entries if ks for k in ks)
    assert keys == ["[3]", "[5]"]
    assert all(b == conn.execute("SELECT vectorsync.bucket_of(%s::jsonb, 4)", (ks[0],)).fetchone()[0]
               for b, ks in entries if ks)
    assert sorted(b for b, ks in entries if ks is None) == [0, 1, 2, 3]  # a sweep of every bucket
    misplaced = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE bucket <> vectorsync.bucket_of(jsonb_build_array(id), 4)").format(store)
    ).fetchone()[0]
    assert misplaced == 0
    t.sync()
    assert t.pending() == 0 and t.stored()[(3,)] == ["text 3, edited"] and len(t.stored()) == 12
