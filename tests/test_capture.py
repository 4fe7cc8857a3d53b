"""Change capture on UPDATE logs exactly the changed keys, on a plain and on a partitioned table:
key changes within and across partitions, through an upsert, and by the user's own BEFORE
trigger (a cross-partition UPDATE fires no row-level UPDATE trigger, and a BEFORE trigger can
change a key the statement never names, so neither may be left to a row-level trigger or to a
column list)."""

from __future__ import annotations

import psycopg
import pytest
from conftest import TableFixture, unique
from psycopg import sql

from assets.spec import parse_spec


def _logged(conn: psycopg.Connection, t: TableFixture) -> list[int]:
    """The keys logged since the last call (each key once per entry), checked against bucket_of."""
    rows = conn.execute(
        sql.SQL("SELECT (e.k ->> 0)::int, q.bucket, vectorsync.bucket_of(e.k, %s) "
                "FROM {} q, unnest(q.row_keys) AS e(k)").format(t.table.queue),
        (t.spec.buckets,),
    ).fetchall()
    conn.execute(sql.SQL("TRUNCATE {}").format(t.table.queue))
    assert all(bucket == canonical for _, bucket, canonical in rows)
    return sorted({k for k, _, _ in rows})


@pytest.fixture(params=["plain", "partitioned"])
def table(request, conn: psycopg.Connection, recording) -> TableFixture:
    schema = unique("cap")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "docs")
    columns = "id int, body text, views int NOT NULL DEFAULT 0, PRIMARY KEY (id)"
    if request.param == "plain":
        conn.execute(sql.SQL("CREATE TABLE {} (" + columns + ")").format(source))
    else:
        conn.execute(sql.SQL("CREATE TABLE {} (" + columns + ") PARTITION BY RANGE (id)").format(source))
        for name, low, high in (("low", 0, 100), ("mid", 100, 1000), ("high", 1000, 100_000)):
            conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (%s) TO (%s)" % (low, high))
                         .format(sql.Identifier(schema, name), source))
    spec = parse_spec({"name": unique("cap"), "source": {"schema": schema, "table": "docs"},
                       "columns": ["body"], "buckets": 4}, "test")
    fixture = TableFixture(conn, recording, spec)
    yield fixture
    fixture.engine.close()


def test_exactly_the_changed_keys_are_logged(conn: psycopg.Connection, table: TableFixture) -> None:
    t, src = table, table.table.source
    conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 10) g").format(src))
    assert _logged(conn, t) == list(range(1, 11))

    conn.execute(sql.SQL("UPDATE {} SET views = views + 1").format(src))
    conn.execute(sql.SQL("UPDATE {} SET body = body WHERE id < 5").format(src))
    assert _logged(conn, t) == [], "no embedded column changed"

    conn.execute(sql.SQL("UPDATE {} SET body = 'changed' WHERE id = 2").format(src))
    assert _logged(conn, t) == [2]
    conn.execute(sql.SQL("UPDATE {} SET id = 50 WHERE id = 3").format(src))  # the same partition
    assert _logged(conn, t) == [3, 50]
    conn.execute(sql.SQL("UPDATE {} SET id = 500 WHERE id = 4").format(src))  # another partition
    assert _logged(conn, t) == [4, 500]
    conn.execute(sql.SQL("UPDATE {} SET id = id + 1000 WHERE id IN (5, 6)").format(src))
    assert _logged(conn, t) == [5, 6, 1005, 1006]
    # A key change through an upsert, and a text change with a key change in one statement.
    conn.execute(sql.SQL("INSERT INTO {} VALUES (7, 'x') ON CONFLICT (id) DO UPDATE SET id = 70").format(src))
    assert _logged(conn, t) == [7, 70]
    conn.execute(sql.SQL("UPDATE {} SET id = 80, body = 'moved' WHERE id = 8").format(src))
    assert _logged(conn, t) == [8, 80]

    t.sync(full=True)
    source_rows = dict(conn.execute(sql.SQL("SELECT id, body FROM {}").format(src)).fetchall())
    assert t.stored() == {(k,): [body] for k, body in source_rows.items()}
    assert t.pending() == 0


def test_a_key_changed_by_the_users_before_trigger_is_logged(conn: psycopg.Connection, table: TableFixture) -> None:
    """The statement never names the key column: the user's BEFORE UPDATE trigger changes it."""
    t, src = table, table.table.source
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'one'), (2, 'two')").format(src))
    _logged(conn, t)
    schema = t.spec.source.schema_
    conn.execute(sql.SQL(
        "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN IF NEW.views > OLD.views THEN NEW.id := NEW.id + 10; END IF; RETURN NEW; END$$"
    ).format(sql.Identifier(schema, "renumber")))
    conn.execute(sql.SQL("CREATE TRIGGER renumber BEFORE UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()")
                 .format(src, sql.Identifier(schema, "renumber")))
    conn.execute(sql.SQL("UPDATE {} SET views = views + 1 WHERE id = 1").format(src))
    assert _logged(conn, t) == [1, 11]

