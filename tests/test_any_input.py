"""Any key, any column name, any derived name (issue 14, points 1, 2, 3 and 7): a clear error or a
recorded failure, never wrong data, never a stalled bucket. Against the real embedded PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from assets.index import index_state
from assets.install import install
from assets.names import fit_identifier
from assets.spec import SpecError, parse_spec
from assets.status import table_status
from orchestration.cli import main

from conftest import TableFixture, unique


def source_texts(t: TableFixture, column: str = "body") -> dict[tuple, str]:
    """key (as jsonb gives it) -> the column's value as PostgreSQL prints it."""
    rows = t.conn.execute(
        sql.SQL("SELECT {}, {}::text FROM {}").format(t.table.key_json("s"), sql.Identifier("s", column),
                                                     sql.SQL("{} s").format(t.table.source))
    ).fetchall()
    return {tuple(k): v for k, v in rows}


def ledger(t: TableFixture) -> dict[tuple, tuple[str, str, str]]:
    rows = t.conn.execute(
        "SELECT row_key, error_kind, state, last_error FROM vectorsync.failure_report WHERE table_name = %s",
        (t.spec.name,),
    ).fetchall()
    return {tuple(k): (kind, state, error) for k, kind, state, error in rows}


# 1. Any key type, any value of it ---------------------------------------------------------------

KEY_VALUES = {
    "date": ["0044-03-15 BC", "infinity", "-infinity", "2024-02-29"],
    "timestamp": ["0044-03-15 10:00 BC", "infinity", "-infinity", "2024-01-01 12:00:00.123456"],
    "timestamptz": ["0044-03-15 10:00+02 BC", "infinity", "-infinity", "2024-01-01 12:00+05:30"],
    "numeric": ["NaN", "Infinity", "-Infinity", "1" * 1000, "0.000001", "-7"],
    "time": ["24:00:00", "00:00:00", "13:45:01.5"],
    "int2": ["-32768", "32767", "0"],
    "int8": ["-9223372036854775808", "9223372036854775807", "1000000000000000000"],
    "text": ["", " ", "\u05e9\u05dc\u05d5\u05dd", "emoji \U0001f600", "quote \" and \\ back", "x" * 3000],
    "varchar(20)": ["a", "b b", "\u00e9"],
    "char(3)": ["a", "ab ", "abc"],
    "uuid": ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"],
    "bool": ["true", "false"],
    "bytea": ["\\x", "\\x00ff", "\\xdeadbeef"],
    "inet": ["10.0.0.1/8", "::1", "192.168.0.1"],
}


@pytest.mark.parametrize("key_type", sorted(KEY_VALUES))
def test_every_key_value_round_trips_through_the_store(make_table, db_url: str, key_type: str) -> None:
    t = make_table(f"id {key_type} PRIMARY KEY, body text", columns=["body"], buckets=3)
    values = KEY_VALUES[key_type]
    # Written from a session in another time zone: the key text must not depend on it.
    with psycopg.connect(db_url, autocommit=True) as writer, writer.cursor() as cur:
        cur.execute("SET TimeZone = 'Asia/Kolkata'")
        cur.executemany(
            sql.SQL("INSERT INTO {} (id, body) VALUES (%s::{}, %s)").format(t.table.source, sql.SQL(key_type)),
            [(v, f"row {i}: {v[:40]}") for i, v in enumerate(values)],
        )
    stats = t.sync()
    assert stats.rows_failed == 0 and t.pending() == 0
    stored = {k: "".join(chunks) for k, chunks in t.stored().items()}
    assert stored == source_texts(t)
    assert len(stored) == len(values)
    # The stored key columns equal the source's, compared as typed values.
    joined = t.conn.execute(
        sql.SQL("SELECT count(*) FROM {} e JOIN {} s ON {}").format(t.table.store, t.table.source,
                                                                   t.table.key_equal("e", "s"))
    ).fetchone()[0]
    assert joined == len(values)

    # Updates and deletes reach the same rows.
    first = values[0]
    t.conn.execute(sql.SQL("UPDATE {} SET body = 'changed' WHERE id = %s::{}").format(
        t.table.source, sql.SQL(key_type)), (first,))
    t.conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s::{}").format(t.table.source, sql.SQL(key_type)), (values[-1],))
    t.sync()
    stored = {k: "".join(chunks) for k, chunks in t.stored().items()}
    assert stored == source_texts(t) and "changed" in stored.values()
    assert len(stored) == len(values) - 1 and ledger(t) == {}


def test_composite_keys_of_several_awkward_types(make_table, conn: psycopg.Connection) -> None:
    conn.execute("DO $$ BEGIN CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy \U0001f600'); "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    t = make_table("d date, n numeric, m public.mood, b bytea, body text, PRIMARY KEY (d, n, m, b)",
                   columns=["body"], buckets=2)
    rows = [("0044-03-15 BC", "NaN", "happy \U0001f600", b"\x00"), ("infinity", "-Infinity", "sad", b""),
            ("2024-01-01", "1.50", "ok", b"\xff\xfe")]
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s::date, %s::numeric, %s::public.mood, %s, %s)").format(
            t.table.source), [(*r, f"text {i}") for i, r in enumerate(rows)])
    t.sync()
    stored = {k: "".join(chunks) for k, chunks in t.stored().items()}
    assert stored == source_texts(t) and len(stored) == 3
    conn.execute(sql.SQL("DELETE FROM {} WHERE n = 'NaN'").format(t.table.source))
    t.sync(full=True)
    assert len(t.stored()) == 2 and t.pending() == 0


def test_text_values_python_cannot_hold_render_as_postgres_prints_them(make_table) -> None:
    t = make_table("id int PRIMARY KEY, d date, ts timestamptz, tm time", template="{d} | {ts} | {tm}")
    t.conn.execute(sql.SQL("INSERT INTO {} VALUES (1, '0044-03-15 BC', 'infinity', '24:00'), "
                           "(2, '2024-01-02', '-infinity', '10:00')").format(t.table.source))
    t.sync()
    stored = {k[0]: c[0] for k, c in t.stored().items()}
    assert stored == {1: "0044-03-15 BC | infinity | 24:00:00", 2: "2024-01-02 | -infinity | 10:00:00"}


def test_a_row_that_cannot_be_rendered_goes_to_the_ledger_and_the_rest_is_stored(make_table) -> None:
    t = make_table("id int PRIMARY KEY, d date", template="year {d:%Y}", buckets=1)
    t.conn.execute(sql.SQL("INSERT INTO {} SELECT g, date '2020-01-01' + g FROM generate_series(1, 20) g")
                   .format(t.table.source))
    t.conn.execute(sql.SQL("INSERT INTO {} VALUES (100, 'infinity')").format(t.table.source))
    stats = t.sync()
    assert stats.rows_written == 20 and stats.rows_failed == 1 and t.pending() == 0
    assert len(t.stored()) == 20 and (100,) not in t.stored()
    kind, state, error = ledger(t)[(100,)]
    assert (kind, state) == ("unprocessable", "dead")
    assert t.spec.name in error and "[100]" in error and "'d'" in error
    # Fixing the row brings it back through the change log, and it leaves the ledger.
    t.conn.execute(sql.SQL("UPDATE {} SET d = '1999-12-31' WHERE id = 100").format(t.table.source))
    t.sync()
    assert t.stored()[(100,)] == ["year 1999"] and ledger(t) == {}


# 2. Templates render exactly or are refused -----------------------------------------------------

def test_any_column_name_works_in_the_default_template(make_table) -> None:
    names = ["we}ird{", "a:b", "x!r", "{}", "dot.ted[0]", "sp ace", "\u05e9\u05dd"]
    # Braces doubled: make_table passes the DDL through psycopg's sql.SQL.format.
    columns_sql = ", ".join(sql.Identifier(n).as_string() + " text" for n in names)
    t = make_table("id int PRIMARY KEY, " + columns_sql.replace("{", "{{").replace("}", "}}"),
                   columns=names, chunking=None)
    values = [f"value of {n}" for n in names]
    t.conn.execute(sql.SQL("INSERT INTO {} VALUES (1, {})").format(
        t.table.source, sql.SQL(", ").join(sql.Literal(v) for v in values)))
    t.sync()
    assert t.stored() == {(1,): ["\n\n".join(values)]}


def test_templates_that_cannot_render_exactly_are_refused(conn: psycopg.Connection) -> None:
    schema = unique("tpl")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL('CREATE TABLE {} (id int PRIMARY KEY, a text, "a:b" text, "c:d" text)')
                 .format(sql.Identifier(schema, "docs")))
    origin = "tables/tpl.yaml"
    cases = [
        ("{a:b}", "ambiguous"),              # column a formatted with 'b', or column "a:b"
        ("{c:d}", "cannot be named in a template"),
        ("{nope}", "no column 'nope'"),
    ]
    for template, message in cases:
        spec = parse_spec({"name": unique("t"), "source": {"schema": schema, "table": "docs"},
                           "template": template}, origin)
        with pytest.raises(SpecError, match=message) as err:
            install(conn, [(spec, origin)])
        assert err.value.source == origin and err.value.field == "template"
    for template, message in [("{a", "expected '}'"), ("{a:{b}}", "nested"), ("{a!x}", "conversion"),
                              ("{}", "empty")]:
        with pytest.raises(SpecError, match=message) as err:
            parse_spec({"name": "t", "source": "public.x", "template": template}, origin)
        assert err.value.field == "template"


# 3. Derived names fit 63 bytes and stay distinct ------------------------------------------------

def test_long_multibyte_destinations_get_every_object(make_table) -> None:
    destination = "\u00e9" * 50  # 100 bytes: every derived name is over PostgreSQL's limit
    t = make_table("id int PRIMARY KEY, body text", columns=["body"], destination=destination,
                   index={"min_rows": 0})
    names = t.spec.object_names
    assert len(set(names.values())) == len(names)
    assert all(len(n.encode()) <= 63 for n in names.values())
    indexes = {n for (n,) in t.conn.execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass",
        (t.table.store.as_string(t.conn),))}
    assert len(indexes) == 5  # primary key, text hash, bucket, full text, HNSW
    t.conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'hello')").format(t.table.source))
    t.sync()
    assert t.stored() == {(1,): ["hello"]}
    assert fit_identifier("x" * 63) == "x" * 63 and len(fit_identifier("x" * 64).encode()) == 63


def test_install_fails_loudly_when_a_name_is_taken(conn: psycopg.Connection) -> None:
    schema = unique("taken")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
    spec = parse_spec({"name": unique("tk"), "source": {"schema": schema, "table": "docs"}, "columns": ["body"]},
                      "tables/taken.yaml")
    # Something else already has the text-hash index's name: IF NOT EXISTS would skip the index.
    conn.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(schema, spec.object_names["hash_index"])))
    with pytest.raises(SpecError, match="text-hash index") as err:
        install(conn, [(spec, "tables/taken.yaml")])
    assert err.value.source == "tables/taken.yaml"
    assert conn.execute("SELECT to_regclass(%s)", (f"{schema}.{spec.store_name}",)).fetchone()[0] is None


def test_names_postgres_would_cut_are_refused_where_they_are_the_users(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="bytes") as err:
        parse_spec({"name": "t", "source": {"schema": "\u00e9" * 40, "table": "x"}, "columns": ["a"]}, "f.yaml")
    assert err.value.field.startswith("source")


# 7. The CLI on a table it cannot use -------------------------------------------------------------

def test_cli_answers_an_uninstalled_or_unknown_table_with_one_line(conn, tmp_path: Path, capsys) -> None:
    schema = unique("cli")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
    name = unique("cli")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(
        {"name": name, "source": {"schema": schema, "table": "docs"}, "columns": ["body"]}))
    for argv, message in [
        (["search", name, "anything"], f"table {name} is declared but not installed"),
        (["search", name, "anything", "--hybrid"], "not installed"),
        (["sync", name], "not installed"),
        (["search", "no_such_table", "anything"], "no table named 'no_such_table'"),
    ]:
        started = time.monotonic()
        assert main(["--tables", str(tmp_path), *argv]) == 2
        # Well under a model load (about 15 s on this machine).
        assert time.monotonic() - started < 5
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_percent_signs_in_names_are_not_placeholders(make_table) -> None:
    # psycopg reads a % in a statement with parameters as a placeholder, one inside a quoted name too.
    t = make_table('"k%s" int PRIMARY KEY, "b%b" text', schema=unique("100%s"), table="a%(x)s",
                   columns=["b%b"], index={"min_rows": 0})
    t.conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'one'), (2, 'two')").format(t.table.source))
    t.sync()
    t.conn.execute(sql.SQL("DELETE FROM {} WHERE \"k%s\" = 2").format(t.table.source))
    t.sync(full=True)
    assert t.stored() == {(1,): ["one"]} and t.pending() == 0
    assert table_status(t.conn, t.spec.name).rows_current == 1
    assert index_state(t.conn, t.table).valid
