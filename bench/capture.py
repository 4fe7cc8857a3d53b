"""b. Write-path cost of change capture: bulk INSERT and UPDATE of 100k rows on a fresh table with
the capture triggers, and on one with `capture: logical` (keys read back from the WAL), against the
same statements on a fresh table without either. The logical side's drain (decoding the WAL and
logging the keys, off the writer's path) is timed too."""

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
    # The logical side needs wal_level = logical: the bench's embedded server is restarted with it
    # (a server of DATABASE_URL without it runs the other sides only). Every side then runs on
    # the same server, so the baseline pays wal_level = logical's extra WAL too.
    from orchestration.database import ensure_server_settings

    logical = ensure_server_settings(ctx.url, {"wal_level": "logical"})
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
    sides = ("triggers", "plain") + (("logical",) if logical else ()) + (("floor",) if ctx.params.get("floor") else ())
    samples: dict[str, dict[str, list[float]]] = {k: {side: [] for side in sides} for k in logged_per_statement}
    drains: dict[str, list[float]] = {k: [] for k in logged_per_statement}
    try:
        for r in range(ctx.rounds):
            # The order of the sides rotates from round to round, so drift on a shared machine
            # (and whatever the previous side left to the background writer) hits every side alike.
            for side in sides[r % len(sides):] + sides[: r % len(sides)]:
                _measure_fresh_table(conn, staging, side, rows, logged_per_statement, samples, drains)
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
    if "logical" in sides:
        measures += [Measure(f"{label}, {rows:,} rows, capture: logical", "s", v["logical"], v["plain"],
                             "ratio <= 1.3" if label != "UPDATE other column" else "")
                     for label, v in samples.items()]
        measures += [Measure(f"{label}, {rows:,} rows, capture: logical, its later drain", "s", drains[label])
                     for label in logged_per_statement]
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
               "UPDATE other column: the text does not use it, so the triggers log nothing (no target of its own); "
               "capture: logical logs its keys (the WAL has no old row) and the run then sends nothing",
               "capture: logical: the writer's statement timed as the others; its drain (peek the slot, log "
               "the keys in the change log, advance the slot) is timed after it, off the writer's path, "
               "and is not part of the ratio; every side runs with wal_level = logical",
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
    drains: dict[str, list[float]],
) -> None:
    """One side of one round: a new table (declared, with its triggers and a new change log, or
    plain), the three statements timed one by one after a CHECKPOINT each, then all dropped."""
    from assets.status import change_backlog
    from assets.wal_capture import drain_table, drop_slot_and_publication

    schema = f"{SCHEMA}_{side}"
    create_source(conn, schema, COLUMNS)
    source = sql.Identifier(schema, "docs")
    table = None
    if side != "plain":
        _, table = declare(conn, schema, template="{title}\n\n{body}",
                           capture="logical" if side == "logical" else "triggers")
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
        if side == "logical":
            drained, logged = timed(lambda: drain_table(conn, table))  # noqa: B023 - called at once
            drains[label].append(drained)
            assert logged == rows, f"{label}: {logged} keys drained, expected {rows}"
        if side in ("triggers", "logical"):
            logged = change_backlog(conn, table.queue)[0]
            expected = rows if side == "logical" else logged_per_statement[label]
            assert logged == expected, f"{label}: {logged} change-log rows, expected {expected}"
            conn.execute(sql.SQL("TRUNCATE {}").format(table.queue))
    if side == "logical":
        drop_slot_and_publication(conn, table.spec.name)
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))  # source and store
    if table is not None:
        conn.execute(sql.SQL("DROP TABLE {}").format(table.queue))  # so the next round's log is new too


BENCHMARK = Benchmark(
    name="b", title="change-capture write cost", target="with/without capture <= 1.3x",
    run=run, defaults={"rows": 100_000, "chars": 500, "floor": False}, quick={"rows": 10_000},
    # The protocol: median of 5 rounds, each on fresh tables.
    rounds=5,
)
