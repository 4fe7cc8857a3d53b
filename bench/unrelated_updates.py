"""c. Updates of a column the text does not use: no change-log entry, no provider call, no store
write, whether the bucket runs are change-driven (sensor) or full sweeps (backfill, reconcile).
A control update of the text column shows that the same counters do see real work."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from bench.common import (
    Benchmark,
    Context,
    FreeProvider,
    Measure,
    Result,
    body_text,
    create_source,
    declare,
    load_rows,
    sync_all,
    timed,
)

SCHEMA = "bench_unrelated"


def _store_writes(conn: psycopg.Connection, store: sql.Composable) -> int:
    """Rows inserted, updated or deleted in the store so far, from the statistics collector."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        sql.SQL("SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relid = {}::regclass")
        .format(sql.Literal(store.as_string(conn))),
    ).fetchone()[0]


def _store_versions(conn: psycopg.Connection, store: sql.Composable) -> str:
    """A digest of every store row's physical version: any write changes it."""
    return conn.execute(
        sql.SQL("SELECT md5(string_agg(ctid::text || ':' || xmin::text, ',' ORDER BY ctid)) FROM {}").format(store)
    ).fetchone()[0]


def run(ctx: Context) -> Result:
    from assets.engine import EmbeddingEngine
    from assets.status import change_backlog

    rows = ctx.params["rows"]
    conn = ctx.connect()
    create_source(conn, SCHEMA, "id int PRIMARY KEY, title text, body text, views int NOT NULL DEFAULT 0")
    load_rows(conn, SCHEMA, [(i, f"Title {i}", body_text(i, ctx.params["chars"])) for i in range(rows)],
              ["id", "title", "body"])
    spec, table = declare(conn, SCHEMA, template="{title}\n\n{body}")
    provider = FreeProvider(spec.provider.dimensions)
    engine = EmbeddingEngine(conn, table, provider)
    source = sql.Identifier(SCHEMA, "docs")
    figures: dict[str, list[float]] = {}
    extra: dict[str, Any] = {}
    try:
        sync_all(engine, spec.buckets, full=True)
        assert change_backlog(conn, table.queue)[0] == 0
        for r in range(ctx.rounds):
            calls, inputs = provider.calls, provider.inputs
            writes, versions = _store_writes(conn, table.store), _store_versions(conn, table.store)
            seconds, _ = timed(lambda: conn.execute(sql.SQL("UPDATE {} SET views = views + 1").format(source)))
            logged = change_backlog(conn, table.queue)[0]
            changed = sync_all(engine, spec.buckets, full=False)
            swept = sync_all(engine, spec.buckets, full=True)
            figures.setdefault("keys logged", []).append(logged)
            figures.setdefault("provider calls", []).append(provider.calls - calls)
            figures.setdefault("texts sent", []).append(provider.inputs - inputs)
            figures.setdefault("store rows written", []).append(_store_writes(conn, table.store) - writes)
            figures.setdefault("store rows rewritten (xmin/ctid)", []).append(
                int(_store_versions(conn, table.store) != versions))
            figures.setdefault("rows checked by the full sweep", []).append(swept.rows_seen)
            figures.setdefault("UPDATE seconds", []).append(seconds)
            assert changed.rows_seen == 0 and swept.rows_written == 0, (changed, swept)
            ctx.log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in figures.items()))
        # The control: the same counters see an update of the text column.
        calls, writes = provider.calls, _store_writes(conn, table.store)
        conn.execute(sql.SQL("UPDATE {} SET title = title || '!'").format(source))
        logged = change_backlog(conn, table.queue)[0]
        sync_all(engine, spec.buckets, full=False)
        extra["control_text_update"] = {
            "keys_logged": logged, "provider_calls": provider.calls - calls,
            "store_rows_written": _store_writes(conn, table.store) - writes,
        }
        ctx.log(f"control (text column updated): {extra['control_text_update']}")
    finally:
        engine.close()
        conn.close()
    zero = {"keys logged", "provider calls", "texts sent", "store rows written",
            "store rows rewritten (xmin/ctid)"}
    measures = []
    for label, values in figures.items():
        m = Measure(f"{label}, {rows:,} rows updated", "s" if "seconds" in label else "count", values,
                    target="== 0" if label in zero else "")
        m.met = all(v == 0 for v in values) if label in zero else None
        measures.append(m)
    return Result(measures=measures, params=ctx.params, extra=extra,
                  notes=[("each round: UPDATE every row's `views` (not in the template), then a "
                         "change-driven run and a full-sweep run of every bucket")])


BENCHMARK = Benchmark(
    name="c", title="updates of a column the text does not use",
    target="0 provider calls, 0 store writes", run=run,
    defaults={"rows": 20_000, "chars": 500}, quick={"rows": 2_000},
)
