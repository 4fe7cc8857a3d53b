"""b. Write-path cost of change capture: bulk INSERT and UPDATE of 100k rows with the capture
triggers, against the same statements on the same table with the triggers disabled."""

from __future__ import annotations

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
COLUMNS = "id int PRIMARY KEY, title text, body text, views int NOT NULL DEFAULT 0"


def run(ctx: Context) -> Result:
    from assets.status import change_backlog

    rows, chars = ctx.params["rows"], ctx.params["chars"]
    conn = ctx.connect()
    create_source(conn, SCHEMA, COLUMNS)
    create_source(conn, SCHEMA + "_staging", COLUMNS)
    source = sql.Identifier(SCHEMA, "docs")
    staging = sql.Identifier(SCHEMA + "_staging", "docs")
    # md5 of the id, repeated: distinct rows of the requested width, made by the server quickly.
    conn.execute(
        sql.SQL("INSERT INTO {} SELECT g, 'Title ' || g, left(repeat(md5(g::text) || ' ', %s), %s), 0 "
                "FROM generate_series(1, %s) g").format(staging),
        (chars // 33 + 1, chars, rows),
    )
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(staging))
    _, table = declare(conn, SCHEMA, template="{title}\n\n{body}")
    statements = {
        "INSERT": sql.SQL("INSERT INTO {} SELECT * FROM {}").format(source, staging),
        "UPDATE text column": sql.SQL("UPDATE {} SET body = body || '.'").format(source),
        "UPDATE other column": sql.SQL("UPDATE {} SET views = views + 1").format(source),
    }
    logged_per_statement = {"INSERT": rows, "UPDATE text column": rows, "UPDATE other column": 0}
    samples: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in statements}
    try:
        for r in range(ctx.rounds):
            # Alternate which side goes first, so drift on a shared machine hits both alike.
            for triggers in ((True, False) if r % 2 == 0 else (False, True)):
                conn.execute(sql.SQL("ALTER TABLE {} {} TRIGGER USER").format(
                    source, sql.SQL("ENABLE" if triggers else "DISABLE")))
                conn.execute(sql.SQL("TRUNCATE {}").format(source))
                conn.execute(sql.SQL("TRUNCATE {}").format(table.queue))
                for label, statement in statements.items():
                    conn.execute("CHECKPOINT")
                    seconds, _ = timed(lambda: conn.execute(statement))  # noqa: B023 - called at once
                    samples[label][triggers].append(seconds)
                    logged = change_backlog(conn, table.queue)[0]
                    expected = logged_per_statement[label] if triggers else 0
                    assert logged == expected, f"{label}: {logged} change-log rows, expected {expected}"
                    conn.execute(sql.SQL("TRUNCATE {}").format(table.queue))
            latest = ", ".join(f"{k} {v[True][-1]:.2f}s vs {v[False][-1]:.2f}s" for k, v in samples.items())
            ctx.log(f"round {r + 1}: {latest}")
    finally:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(source))
        conn.close()
    measures = [
        Measure(f"{label}, {rows:,} rows", "s", v[True], v[False],
                "ratio <= 1.3" if label != "UPDATE other column" else "")
        for label, v in samples.items()
    ]
    return Result(
        measures=measures, params=ctx.params,
        notes=[("subject: statement-level capture triggers enabled; baseline: the same table and "
               "statements with `ALTER TABLE ... DISABLE TRIGGER USER`; each statement its own "
               "transaction, after a CHECKPOINT; rows of an int key, a short title, a body of "
               f"{chars} characters and an int column"),
               "UPDATE other column: the text does not use it, so nothing is logged (no target of its own)"],
    ).check(lambda m: m.ratio is not None and m.ratio <= 1.3)


BENCHMARK = Benchmark(
    name="b", title="change-capture write cost", target="with/without triggers <= 1.3x",
    run=run, defaults={"rows": 100_000, "chars": 500}, quick={"rows": 10_000},
    # A round takes seconds, and single rounds vary by +-0.2x (the transition tables spill to disk).
    rounds=9,
)
