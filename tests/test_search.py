"""Vector and hybrid search (full-text plus vector, merged by reciprocal rank fusion), with filters on
source columns, from Python, from SQL and from the CLI, against the real embedded PostgreSQL and the
real local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb

from assets.install import install
from assets.search import SearchError, hybrid_search, search
from assets.spec import SpecError, parse_spec

from conftest import unique

PROJECT = Path(__file__).resolve().parent.parent
FUNCS = "id int PRIMARY KEY, kind text, name text, body text, added date"

# A small API reference: the kind column is the filter; one entry carries an identifier that the
# model has never seen and that only the full-text side can pin down.
CORPUS = [
    (1, "function", "crc32", "Compute a CRC-32 checksum of data, starting from an optional running value."),
    (2, "function", "adler32", "Compute an Adler-32 checksum of data; faster than CRC-32 but weaker."),
    (3, "function", "compress", "Compress the bytes in data and return a bytes object with the compressed data."),
    (4, "function", "decompress", "Decompress the bytes in data and return the uncompressed data."),
    (5, "class", "Compress", "A compression object for compressing data streams that will not fit in memory."),
    (6, "class", "Decompress", "A decompression object for data streams that will not fit in memory at once."),
    (7, "function", "crc_combine", "Combine two checksums; call qz_crc7b_fold when the lengths are unknown."),
    (8, "constant", "MAX_WBITS", "The base two logarithm of the largest window size for compression."),
    (9, "function", "open", "Open a gzip-compressed file in binary or text mode and return a file object."),
    (10, "class", "GzipFile", "A file object that reads and writes gzip-compressed files."),
    (11, None, "zlib_version", "The version string of the zlib library in use, a constant set at import."),
    (12, "function", "qz_crc7b_fold", "Fold a partial value into a running total, for legacy archives."),
]


@pytest.fixture
def api(make_table, conn: psycopg.Connection):
    t = make_table(FUNCS, template="{name}: {body}")
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (id, kind, name, body, added) VALUES (%s, %s, %s, %s, DATE '2024-01-01' + %s)")
            .format(t.table.source),
            [(*row, row[0]) for row in CORPUS],
        )
    t.sync()
    return t



# Error codes that differ only in the order of their digits: the small model sees them as near
# neighbours, full text sees them as different words.
ERRORS = [
    (1, "E24017", "The connection was refused by the server; check that it listens on the port."),
    (2, "E24071", "The disk quota was exceeded while the journal was being written."),
    (3, "E27041", "The disk is full; free space before writing the journal again."),
    (4, "E21047", "The connection was reset by the peer while a request was in flight."),
    (5, "E20147", "The certificate of the server has expired; renew it."),
    (6, "E27014", "The journal is corrupt and cannot be replayed."),
    (7, "E24170", "A lock on the journal could not be taken within the timeout."),
    (8, "E21740", "The server closed the connection before sending a response."),
]


@pytest.fixture
def errors(make_table, conn: psycopg.Connection):
    # halfvec and inner product: the other storage type and operator than the api table's
    t = make_table("id int PRIMARY KEY, code text, message text", template="Error {code}: {message}",
                   vector_type="halfvec", distance="inner_product")
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(t.table.source), ERRORS)
    t.sync()
    return t


def _keys(hits) -> list[tuple]:
    return [h.key for h in hits]


def test_hybrid_finds_an_exact_identifier_the_model_blurs(errors, conn, local_provider) -> None:
    vector = search(conn, errors.table, local_provider, "E24017", k=8)
    hybrid = hybrid_search(conn, errors.table, local_provider, "E24017", k=8)
    target = (1,)
    vector_rank = _keys(vector).index(target) + 1
    assert vector_rank >= 4, "the model should confuse the code with its anagrams"
    assert hybrid[0].key == target and hybrid[0].text_rank == 1 and hybrid[0].vector_rank == vector_rank
    assert hybrid[0].score == pytest.approx(1 / 61 + 1 / (60 + vector_rank))
    # Only that row has the word; the others keep their vector order: hybrid adds, it does not reshuffle.
    assert [h.text_rank for h in hybrid[1:]] == [None] * 7
    assert _keys(hybrid[1:]) == [k for k in _keys(vector) if k != target]
    assert [h.vector_rank for h in vector] == list(range(1, 9))


def test_text_match_any_and_all(errors, conn, local_provider) -> None:
    question = "what does error E27041 mean"
    hits = hybrid_search(conn, errors.table, local_provider, question, k=8, text_match="any")
    # any word: every row says "Error", only one says E27041; rows that match equally share a rank
    assert {h.key: h.text_rank for h in hits} == {(i,): 1 if i == 3 else 2 for i in range(1, 9)}
    # all words: "mean" is in no row, so the text side is empty and hybrid is the vector order
    strict = hybrid_search(conn, errors.table, local_provider, question, k=8)  # "all" is the default
    assert all(h.text_rank is None for h in strict)
    assert _keys(strict) == _keys(search(conn, errors.table, local_provider, question, k=8))
    # web-search syntax, when asked for: every word, minus the excluded one
    syntax = hybrid_search(conn, errors.table, local_provider, "journal -disk", k=8, text_match="web")
    assert {h.key for h in syntax if h.text_rank} == {(6,), (7,)}
    either = hybrid_search(conn, errors.table, local_provider, "E24017 or E21740", k=8, text_match="web")
    assert {h.key for h in either if h.text_rank} == {(1,), (8,)}
    # a query of stop words only has no full-text side at all
    for match in ("any", "all"):
        stop_words = hybrid_search(conn, errors.table, local_provider, "what is it", k=8, text_match=match)
        assert all(h.text_rank is None for h in stop_words)


def test_rrf_order_by_hand(make_table, conn: psycopg.Connection) -> None:
    t = make_table("id int PRIMARY KEY, body text", template="{body}")
    rows = [
        (1, "Bananas are yellow and sweet when they are ripe."),
        (2, "An apple a day; apple juice for breakfast."),
        (3, "Red fruit such as the apple grows on trees in the orchard."),
        (4, "The train timetable changes at the weekend."),
    ]
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(t.table.source), rows)
    t.sync()
    register_vector(conn)
    stored = dict(conn.execute(sql.SQL("SELECT id, embedding FROM {}").format(t.table.store)).fetchall())
    # The query vector is row 1's own embedding, so row 1 is the nearest; the others' vector ranks
    # are worked out here with numpy, independently of the function.
    query = np.asarray(stored[1].to_numpy(), dtype=np.float32)
    cosine = {i: float(v.to_numpy() @ query / np.linalg.norm(v.to_numpy()) / np.linalg.norm(query))
              for i, v in stored.items()}
    vector_rank = {i: r for r, i in enumerate(sorted(cosine, key=cosine.get, reverse=True), start=1)}
    # "apple": row 2 has it twice, row 3 once, rows 1 and 4 not at all.
    text_rank = {2: 1, 3: 2}
    for rrf_k in (60, 0):
        expected = {i: 1 / (rrf_k + vector_rank[i]) + (1 / (rrf_k + text_rank[i]) if i in text_rank else 0)
                    for i in vector_rank}
        got = conn.execute(
            "SELECT row_key, score, vector_rank, text_rank FROM vectorsync.hybrid_search(%s, %s, 'apple', 4, rrf_k => %s)",
            (t.spec.name, query, rrf_k),
        ).fetchall()
        assert [(r[0][0], r[2], r[3]) for r in got] == [
            (i, vector_rank[i], text_rank.get(i)) for i in sorted(expected, key=expected.get, reverse=True)
        ]
        assert [r[1] for r in got] == pytest.approx([expected[r[0][0]] for r in got], rel=1e-12)
    # With k=60, a row in both lists beats the row that is first in only one of them.
    assert vector_rank[1] == 1
    first = conn.execute("SELECT row_key FROM vectorsync.hybrid_search(%s, %s, 'apple', 4) LIMIT 2",
                         (t.spec.name, query)).fetchall()
    assert {r[0][0] for r in first} == {2, 3}


def test_filter_restricts_results_before_ranking(api, conn, local_provider) -> None:
    q = "checksum of data"
    functions = hybrid_search(conn, api.table, local_provider, q, k=12, where={"kind": "function"})
    assert {h.key for h in functions} == {(r[0],) for r in CORPUS if r[1] == "function"}
    assert {h.row["kind"] for h in functions} == {"function"}
    # The filter applies inside each ranked list, not to a top-k afterwards: with one candidate per
    # list the best rows overall are functions, and still the filtered search finds a class.
    top = hybrid_search(conn, api.table, local_provider, q, k=3, candidates=1)
    assert {h.row["kind"] for h in top} == {"function"}
    classes = hybrid_search(conn, api.table, local_provider, q, k=3, candidates=1, where={"kind": "class"})
    assert classes and {h.row["kind"] for h in classes} == {"class"}
    # a list is any of its values; several fields must all hold; null is IS NULL
    some = hybrid_search(conn, api.table, local_provider, q, k=12, where={"kind": ["class", "constant"]})
    assert sorted(h.key[0] for h in some) == [5, 6, 8, 10]
    both = hybrid_search(conn, api.table, local_provider, q, k=12, where={"kind": "function", "id": [1, 5, 9]})
    assert sorted(h.key[0] for h in both) == [1, 9]
    assert _keys(hybrid_search(conn, api.table, local_provider, q, k=12, where={"kind": None})) == [(11,)]
    # values are cast to the column's type: an int as text or number, a date as text or a date
    assert _keys(hybrid_search(conn, api.table, local_provider, q, where={"id": "7"})) == [(7,)]
    assert _keys(hybrid_search(conn, api.table, local_provider, q, where={"id": 7})) == [(7,)]
    day = api.conn.execute(sql.SQL("SELECT added FROM {} WHERE id = 4").format(api.table.source)).fetchone()[0]
    assert _keys(hybrid_search(conn, api.table, local_provider, q, where={"added": day})) == [(4,)]
    assert _keys(hybrid_search(conn, api.table, local_provider, q, where={"added": str(day)})) == [(4,)]
    # plain vector search takes the same filter
    vector = search(conn, api.table, local_provider, q, k=12, where={"kind": "class"})
    assert sorted(h.key[0] for h in vector) == [5, 6, 10] and all(h.text_rank is None for h in vector)
    assert [h.score for h in vector] == sorted((h.score for h in vector), reverse=True)


def test_sql_function_returns_the_rows_python_returns(api, conn, local_provider) -> None:
    q = "compressed file object"
    where = {"kind": ["function", "class"]}
    hits = hybrid_search(conn, api.table, local_provider, q, k=6, where=where)
    vector = local_provider.embed([q]).vectors[0].astype(np.float32)
    # As an SQL user writes it: the vector as a literal, the filter as jsonb text.
    literal = "[" + ",".join(repr(float(x)) for x in vector) + "]"
    rows = conn.execute(
        """SELECT row_key, score, vector_rank, text_rank, chunk, source_row
           FROM vectorsync.hybrid_search(%s, %s::vector, %s, 6, %s::jsonb)""",
        (api.spec.name, literal, q, json.dumps(where)),
    ).fetchall()
    assert len(rows) == len(hits) == 6
    assert [(tuple(r[0]), r[2], r[3], r[4]) for r in rows] == [(h.key, h.vector_rank, h.text_rank, h.chunk) for h in hits]
    assert [r[1] for r in rows] == pytest.approx([h.score for h in hits])
    assert [r[5]["name"] for r in rows] == [h.row["name"] for h in hits]
    assert rows[0][5]["added"] == hits[0].row["added"].isoformat()
    assert any(h.text_rank for h in hits) and any(h.text_rank is None for h in hits)
    # Without a vector the function is plain full-text search, ranked by ts_rank_cd.
    text_only = conn.execute(
        "SELECT row_key, vector_rank, text_rank, text_score FROM vectorsync.hybrid_search(%s, NULL, 'gzip', 10)",
        (api.spec.name,),
    ).fetchall()
    assert {r[0][0] for r in text_only} == {9, 10} and all(r[1] is None for r in text_only)
    assert [r[3] for r in text_only] == sorted((r[3] for r in text_only), reverse=True)


def test_composite_keys(make_table, conn: psycopg.Connection, local_provider) -> None:
    t = make_table("lang text, id bigint, body text, PRIMARY KEY (lang, id)", template="{body}", chunking=None)
    rows = [("en", 1, "The river floods the valley every spring."), ("de", 1, "Der Fluss überflutet das Tal."),
            ("en", 2, "A bank is where the river bends."), ('x"]', 3, "river, quoted key")]
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(t.table.source), rows)
    t.sync()
    hits = hybrid_search(conn, t.table, local_provider, "river", k=10)
    assert {h.key for h in hits} == {(lang, i) for lang, i, _ in rows}
    assert {h.key for h in hits if h.text_rank} == {("en", 1), ("en", 2), ('x"]', 3)}
    assert all(h.row["body"] == dict(((lang, i), b) for lang, i, b in rows)[h.key] for h in hits)
    english = hybrid_search(conn, t.table, local_provider, "river", k=10, where={"lang": "en", "id": [2, 3]})
    assert _keys(english) == [("en", 2)]


def test_hostile_filter_keys_and_values_are_refused_by_name(api, make_table, conn, local_provider) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS public.canary (v int)")
    name = api.spec.name
    evil = 'kind" = kind; DROP TABLE public.canary; --'
    with pytest.raises(SearchError) as err:
        hybrid_search(conn, api.table, local_provider, "checksum", where={evil: "x"})
    assert err.value.table == name and err.value.field == f"where.{evil}"
    assert name in str(err.value) and "no such column" in str(err.value)
    with pytest.raises(psycopg.errors.UndefinedColumn) as sql_err:
        conn.execute("SELECT * FROM vectorsync.hybrid_search(%s, NULL, 'checksum', 5, %s)", (name, Jsonb({evil: 1})))
    assert name in str(sql_err.value) and sql_err.value.diag.column_name == evil
    # a hostile value is only a value
    assert hybrid_search(conn, api.table, local_provider, "checksum",
                         where={"kind": "function'; DROP TABLE public.canary; --"}) == []
    assert conn.execute("SELECT to_regclass('public.canary')").fetchone()[0] is not None
    # a value the column's type refuses, and a filter that is not an object
    with pytest.raises(SearchError) as err:
        hybrid_search(conn, api.table, local_provider, "checksum", where={"id": "seven"})
    assert err.value.field == "where.id" and "integer" in str(err.value) and name in str(err.value)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="jsonb object"):
        conn.execute("SELECT * FROM vectorsync.hybrid_search(%s, NULL, 'x', 5, '[1]')", (name,))

    # Hostile schema, table and column names come from the registry and are quoted.
    col = 'k"; DROP TABLE public.canary; --'
    t = make_table(
        f'id int PRIMARY KEY, {sql.Identifier(col).as_string(conn)} text, "Body Text" text, meta json',
        schema=unique("evil") + '"; select 1; --', table='t"; drop table x; --', template="{Body Text}",
    )
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'a', 'apple orchard', '{{}}'), (2, 'b', 'apple pie', '{{}}')")
                 .format(t.table.source))
    t.sync()
    hits = hybrid_search(conn, t.table, local_provider, "apple", where={col: "b"})
    assert _keys(hits) == [(2,)] and hits[0].text_rank == 1 and hits[0].row[col] == "b"
    with pytest.raises(SearchError) as err:  # json has no = operator
        hybrid_search(conn, t.table, local_provider, "apple", where={"meta": {}})
    assert err.value.field == "where.meta" and "no = operator" in str(err.value)
    assert conn.execute("SELECT to_regclass('public.canary')").fetchone()[0] is not None


def test_text_search_config_is_declared_checked_and_indexed(make_table, conn: psycopg.Connection) -> None:
    t = make_table("id int PRIMARY KEY, body text", template="{body}", text_search_config="simple")
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'Running the files')").format(t.table.source))
    t.sync()
    lexemes = sql.SQL("SELECT chunk_tsv::text FROM {}").format(t.table.store)
    assert conn.execute(lexemes).fetchone()[0] == "'files':3 'running':1 'the':2"
    # Another configuration rebuilds the column and its index and re-embeds nothing: it is not in
    # the fingerprint.
    data = t.spec.model_dump(mode="json", by_alias=True)
    english = parse_spec({**data, "text_search_config": "english"}, "test")
    assert english.fingerprint == t.spec.fingerprint
    assert install(conn, [(english, "test")]).sweeps_requested == []
    assert conn.execute(lexemes).fetchone()[0] == "'file':3 'run':1"
    assert t.pending() == 0
    # the full-text predicate the search uses is answered by the index
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(sql.SQL(
            "EXPLAIN SELECT chunk FROM {} e WHERE e.chunk_tsv @@ 'run'::tsquery").format(t.table.store)).fetchall())
    assert f"{t.spec.store_name}_fts" in plan
    with pytest.raises(SpecError) as err:
        install(conn, [(parse_spec({**data, "text_search_config": "klingon"}, "tables/t.yaml"), "tables/t.yaml")])
    assert err.value.field == "text_search_config" and "klingon" in str(err.value)
    with pytest.raises(SpecError) as err:
        parse_spec({**data, "text_search_config": "english'; drop"}, "tables/t.yaml")
    assert err.value.field == "text_search_config"
    # A configuration of the user's own, given with its schema, works end to end.
    schema = t.spec.source.schema_
    conn.execute(sql.SQL("CREATE TEXT SEARCH CONFIGURATION {} (COPY = pg_catalog.simple)").format(
        sql.Identifier(schema, "plain")))
    with pytest.raises(SpecError, match="needs its schema"):
        install(conn, [(parse_spec({**data, "text_search_config": "plain"}, "tables/t.yaml"), "tables/t.yaml")])
    own = parse_spec({**data, "text_search_config": f"{schema}.plain"}, "test")
    install(conn, [(own, "test")])
    assert conn.execute(lexemes).fetchone()[0] == "'files':3 'running':1 'the':2"
    found = conn.execute("SELECT row_key, text_rank FROM vectorsync.hybrid_search(%s, NULL, 'running files', 5)",
                         (t.spec.name,)).fetchall()
    assert found == [([1], 1)]


def test_cli_hybrid_search_with_where(tmp_path: Path, db_url: str, conn: psycopg.Connection) -> None:
    schema = unique("cli")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "api")
    conn.execute(sql.SQL("CREATE TABLE {} (" + FUNCS + ")").format(source))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} (id, kind, name, body) VALUES (%s, %s, %s, %s)").format(source),
                        CORPUS)
    name = unique("api")
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "api.yaml").write_text(f"name: {name}\nsource: {schema}.api\ntemplate: '{{name}}: {{body}}'\nbuckets: 2\n")
    env = {**os.environ, "DATABASE_URL": db_url}
    cli = [sys.executable, "-m", "orchestration.cli", "--tables", str(tables)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)

    def keys(out: str) -> list[int]:
        return [int(line.split("[", 1)[1].split("]", 1)[0]) for line in out.splitlines() if "[" in line]

    assert run("install").returncode == 0
    assert run("sync", name).returncode == 0
    done = run("search", name, "compress data", "--hybrid", "--where", "kind=class", "--where", "kind=constant", "-k", "10")
    assert done.returncode == 0, done.stderr
    assert sorted(keys(done.stdout)) == [5, 6, 8, 10]
    assert all(" v" in line and " t" in line for line in done.stdout.splitlines())
    assert "t1 " in done.stdout  # some row is first on the full-text side
    # typed by the column: id=12 compares as an integer; works without --hybrid too
    done = run("search", name, "legacy archives", "--where", "id=12", "--where", "kind=function")
    assert done.returncode == 0, done.stderr
    assert keys(done.stdout) == [12]
    bad = run("search", name, "x", "--hybrid", "--where", "nope=1")
    assert bad.returncode == 2 and name in bad.stderr and "where.nope" in bad.stderr
    bad = run("search", name, "x", "--where", "kind")
    assert bad.returncode == 2 and "COLUMN=VALUE" in bad.stderr
