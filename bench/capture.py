"""b. Write-path cost of change capture: bulk INSERT and UPDATE of 100k rows on a fresh table with
the capture triggers, against the same statements on a fresh table without them."""

from __future__ import annotations

import psycopg
from psycopg import sql

from bench.common import (
    Benchmark,
    Context,
    Measure,
    Result,
    create_source,
    declare,
    timed,
)

SCHEMA = "bench_capture"
STAGING = SCHEMA + "_staging"
COLUMNS = "id int PRIMARY KEY, title text, body text, views int NOT NULL DEFAULT 0"


def run(ctx: Context) -> Result:
    rows, chars = ctx.params["rows"], ctx.params["chars"]
    conn = ctx.connect()
    create_source(conn, STAGING, COLUMNS)
    staging = sql.Identifier(STAGING, "docs")
    # md5 of the id, repeated: distinct rows of the requested width, made by the server quickly.
    conn.execute(
        sql.SQL("INSERT INTO {} SELECT g, 'Title ' || g, left(repeat(md5(g::text) || ' ', %s), %s), 0 "
                "FROM generate_series(1, %s) g").format(staging),
        (chars // 33 + 1, chars, rows),
    )
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(staging))
    logged_per_statement = {"INSERT": rows, "UPDATE text column": rows, "UPDATE other column": 0}
    # floor=true adds a side whose triggers keep their transition tables but do nothing: what any
    # statement-level capture costs before its function runs a single query.
    sides = ("triggers", "plain") + (("floor",) if ctx.params.get("floor") else ())
    samples: dict[str, dict[str, list[float]]] = {k: {side: [] for side in sides} for k in logged_per_statement}
    try:
        for r in range(ctx.rounds):
            # The order of the sides rotates from round to round, so drift on a shared machine
            # (and whatever the previous side left to the background writer) hits every side alike.
            for side in sides[r % len(sides):] + sides[: r % len(sides)]:
                _measure_fresh_table(conn, staging, side, rows, logged_per_statement, samples)
            latest = ", ".join(f"{k} " + " vs ".join(f"{v[side][-1]:.2f}s" for side in sides)
                               for k, v in samples.items())
            ctx.log(f"round {r + 1} ({' vs '.join(sides)}): {latest}")
    finally:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(STAGING)))
        conn.close()
    measures = [
        Measure(f"{label}, {rows:,} rows", "s", v["triggers"], v["plain"],
                "ratio <= 1.3" if label != "UPDATE other column" else "")
        for label, v in samples.items()
    ]
    if "floor" in sides:
        measures += [Measure(f"{label}, {rows:,} rows, transition tables only", "s", v["floor"], v["plain"])
                     for label, v in samples.items()]
    return Result(
        measures=measures, params=ctx.params,
        notes=[("subject: a fresh table with the statement-level capture triggers installed; "
               "baseline: a fresh table without them; per round, each side gets its own new table "
               "and runs the three statements in order, each its own transaction after a CHECKPOINT; "
               "the sides' order rotates from round to round; rows of an int key, a short title, a "
               f"body of {chars} characters and an int column"),
               "UPDATE other column: the text does not use it, so nothing is logged (no target of its own)",
               "transition tables only (floor=true): the same triggers, with a capture function that "
               "returns at once: the cost of capturing the rows, which no capture query can go below"],
    ).check(lambda m: m.ratio is not None and m.ratio <= 1.3)


def _measure_fresh_table(
    conn: psycopg.Connection,
    staging: sql.Identifier,
    side: str,
    rows: int,
    logged_per_statement: dict[str, int],
    samples: dict[str, dict[str, list[float]]],
) -> None:
    """One side of one round: a new table (declared, with its triggers and a new change log, or
    plain), the three statements timed one by one after a CHECKPOINT each, then all dropped."""
    from assets.status import change_backlog

    schema = f"{SCHEMA}_{side}"
    create_source(conn, schema, COLUMNS)
    source = sql.Identifier(schema, "docs")
    table = None
    if side != "plain":
        _, table = declare(conn, schema, template="{title}\n\n{body}")
        conn.execute(sql.SQL("TRUNCATE {}").format(table.queue))  # the first install's sweep request
        if side == "floor":
            conn.execute(sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$"
            ).format(sql.Identifier("vectorsync", f"capture_{table.spec.name}")))
    statements = {
        "INSERT": sql.SQL("INSERT INTO {} SELECT * FROM {}").format(source, staging),
        "UPDATE text column": sql.SQL("UPDATE {} SET body = body || '.'").format(source),
        "UPDATE other column": sql.SQL("UPDATE {} SET views = views + 1").format(source),
    }
    for label, statement in statements.items():
        conn.execute("CHECKPOINT")
        seconds, _ = timed(lambda: conn.execute(statement))  # noqa: B023 - called at once
        samples[label][side].append(seconds)
        if side == "triggers":
            logged = change_backlog(conn, table.queue)[0]
            expected = logged_per_statement[label]
            assert logged == expected, f"{label}: {logged} change-log rows, expected {expected}"
            conn.execute(sql.SQL("TRUNCATE {}").format(table.queue))
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))  # source and store
    if table is not None:
        conn.execute(sql.SQL("DROP TABLE {}").format(table.queue))  # so the next round's log is new too


BENCHMARK = Benchmark(
    name="b", title="change-capture write cost", target="with/without triggers <= 1.3x",
    run=run, defaults={"rows": 100_000, "chars": 500, "floor": False}, quick={"rows": 10_000},
    # The protocol: median of 5 rounds, each on fresh tables.
    rounds=5,
)
