"""Query text is text: hybrid search matches the user's words as words unless asked for operators;
the fusion's parameters and the declared ef_search reach the query; `vectorsync index` builds a
table's index on demand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from assets.install import install
from assets.search import hybrid_search, search
from assets.spec import parse_spec

PROJECT = Path(__file__).resolve().parent.parent

LIBRARIES = [
    (1, "Pillow", "The image library - Python 3 bindings for reading, writing and resizing pictures."),
    (2, "ImageMagick", "An image library in C with command line tools; bindings exist for many languages."),
    (3, "libvips", "A fast image processing library with low memory needs, bindings for Ruby and Lua."),
    (4, "NumPy", "Arrays and linear algebra for Python 3, the base of scientific computing."),
]


@pytest.fixture
def libraries(make_table, conn: psycopg.Connection):
    t = make_table("id int PRIMARY KEY, name text, body text", template="{name}: {body}", buckets=2)
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(t.table.source), LIBRARIES)
    t.sync()
    return t


def _text_side(conn: psycopg.Connection, name: str, query: str, match: str = "all") -> set[int]:
    rows = conn.execute("SELECT row_key FROM vectorsync.hybrid_search(%s, NULL, %s, 10, text_match => %s)",
                        (name, query, match)).fetchall()
    return {r[0][0] for r in rows}


def test_minus_quotes_and_or_are_words_not_operators(libraries, conn, local_provider) -> None:
    name = libraries.spec.name
    query = "image library - Python 3 bindings"
    # Plain text: every word must be there, and " - Python" is no exclusion: Pillow has them all.
    assert _text_side(conn, name, query) == {1}
    hits = hybrid_search(conn, libraries.table, local_provider, query, k=4)
    assert hits[0].key == (1,) and hits[0].text_rank == 1
    # What web-search syntax, now opt-in, made of the same words: NOT python, Pillow pushed out.
    assert _text_side(conn, name, query, "web") == set()
    web = hybrid_search(conn, libraries.table, local_provider, query, k=4, text_match="web")
    assert all(h.text_rank is None for h in web)
    # Quotes are punctuation: the words match wherever they are ...
    assert _text_side(conn, name, '"library image" bindings') == {1, 2, 3}
    # ... while web syntax reads a phrase, in that order.
    assert _text_side(conn, name, '"library image" bindings', "web") == set()
    # "or" is a word (an English stop word, dropped), not an alternative: both sides must match.
    assert _text_side(conn, name, "ruby or pictures") == set()
    assert _text_side(conn, name, "ruby or pictures", "web") == {1, 3}
    assert _text_side(conn, name, "resizing or pictures") == {1}
    # "any" reads plain words too: a leading minus excludes nothing.
    assert _text_side(conn, name, "-python ruby", "any") == {1, 3, 4}
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="'all', 'any' or 'web'"):
        _text_side(conn, name, "x", "websearch")


def test_fusion_weights_and_absent_rank(libraries, conn, local_provider) -> None:
    q = "bindings for Ruby"
    vector = search(conn, libraries.table, local_provider, q, k=4)
    plain = hybrid_search(conn, libraries.table, local_provider, q, k=4)
    assert {h.key for h in plain if h.text_rank} == {(3,)}
    # No weight on full text: the vector order; no weight on vectors: the text match first.
    assert [h.key for h in hybrid_search(conn, libraries.table, local_provider, q, k=4, text_weight=0)] == \
        [h.key for h in vector]
    only_text = hybrid_search(conn, libraries.table, local_provider, q, k=4, vector_weight=0)
    assert only_text[0].key == (3,) and only_text[0].score == pytest.approx(1 / 61)
    # absent_rank: a row missing from the text side is scored there as if ranked that far down.
    absent = hybrid_search(conn, libraries.table, local_provider, q, k=4, absent_rank=50, text_weight=2)
    for h in absent:
        expected = 1 / (60 + h.vector_rank) + 2 / (60 + (h.text_rank or 50))
        assert h.score == pytest.approx(expected)
    # A query with no words to match gives nobody an absent share: the scores are the vector side's.
    stop = hybrid_search(conn, libraries.table, local_provider, "what is it", k=4, absent_rank=50)
    assert [h.score for h in stop] == pytest.approx([1 / (60 + h.vector_rank) for h in stop])
    with pytest.raises(ValueError, match="absent_rank"):
        hybrid_search(conn, libraries.table, local_provider, q, absent_rank=0)


def test_declared_ef_search_reaches_the_query(libraries, conn, local_provider) -> None:
    """The function applies index.ef_search for the call only; RAISE DEBUG shows what it used."""
    data = libraries.spec.model_dump(mode="json", by_alias=True)
    assert data["index"]["ef_search"] == libraries.spec.index.ef_search
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("SET hnsw.ef_search = 17")
    conn.execute("SET client_min_messages = debug1")
    try:
        for ef in (123, 7):
            install(conn, [(parse_spec({**data, "index": {**data["index"], "ef_search": ef}}, "test"), "test")])
            notices.clear()
            hits = search(conn, libraries.table, local_provider, "image library", k=2)
            assert len(hits) == 2
            assert [n for n in notices if "hnsw.ef_search" in n] == [
                f"vectorsync.hybrid_search: table '{libraries.spec.name}': hnsw.ef_search = {ef}"]
            # ... and leaves the session's own setting alone
            assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "17"
    finally:
        conn.execute("RESET client_min_messages")
        conn.execute("RESET hnsw.ef_search")
    with pytest.raises(Exception, match="ef_search"):
        parse_spec({**data, "index": {**data["index"], "ef_search": 0}}, "tables/t.yaml")


def test_cli_index_builds_the_index_on_demand(tmp_path: Path, db_url: str, conn: psycopg.Connection,
                                              make_table) -> None:
    t = make_table("id int PRIMARY KEY, body text", template="{body}", buckets=2, index={"min_rows": 3})
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(t.table.source),
                        [(i, f"row number {i}") for i in range(4)])
    t.sync()
    tables = tmp_path / "tables"
    tables.mkdir()
    data = t.spec.model_dump(mode="json", by_alias=True)
    import json

    (tables / "t.yaml").write_text(json.dumps(data))
    index = f"{t.spec.store_name}_hnsw"
    exists = "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = %s AND i.indisvalid"
    assert conn.execute(exists, (index,)).fetchone()[0] == 0, "a sync leaves no index: the schedule builds it"
    env = {**os.environ, "DATABASE_URL": db_url}
    done = subprocess.run([sys.executable, "-m", "orchestration.cli", "--tables", str(tables), "index", t.spec.name],
                          env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"index {index} of {t.spec.name} is built" in done.stdout
    assert conn.execute(exists, (index,)).fetchone()[0] == 1
    # Below index.min_rows it says why it builds nothing.
    small = make_table("id int PRIMARY KEY, body text", template="{body}", buckets=2)
    (tables / "t.yaml").write_text(json.dumps(small.spec.model_dump(mode="json", by_alias=True)))
    done = subprocess.run([sys.executable, "-m", "orchestration.cli", "--tables", str(tables), "index", small.spec.name],
                          env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "not built" in done.stdout and "min_rows (10000)" in done.stdout
