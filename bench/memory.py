"""g. Peak memory of one bucket run: a run streams its bucket page by page, so its peak RSS must
not grow with the number of rows. Each run is a fresh process over a one-bucket table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from psycopg import sql

from bench.common import (
    Benchmark,
    Context,
    Measure,
    Result,
    create_source,
    declare,
    drop_hnsw,
    reset_store,
)

WORKER = Path(__file__).resolve().parent / "_memory_worker.py"


def run(ctx: Context) -> Result:
    p = ctx.params
    sizes = (p["small_rows"], p["rows"])
    conn = ctx.connect()
    declarations, tables = {}, {}
    for rows in sizes:
        schema = f"bench_memory_{rows}"
        create_source(conn, schema, "id int PRIMARY KEY, body text")
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, left(repeat(md5(g::text) || ' ', %s), %s) FROM generate_series(1, %s) g")
            .format(sql.Identifier(schema, "docs")), (p["chars"] // 33 + 1, p["chars"], rows),
        )
        declarations[rows] = {"name": schema, "source": {"schema": schema, "table": "docs"},
                              "columns": ["body"], "buckets": 1}
        spec, tables[rows] = declare(conn, schema, columns=["body"], buckets=1)
        drop_hnsw(conn, spec)
    peaks: dict[int, list[float]] = {n: [] for n in sizes}
    growth: dict[int, list[float]] = {n: [] for n in sizes}
    env = {**os.environ, "DATABASE_URL": ctx.url}
    for r in range(ctx.rounds):
        for rows in sizes:
            reset_store(conn, tables[rows])
            out = subprocess.run([sys.executable, str(WORKER), json.dumps(declarations[rows])], env=env,
                                 capture_output=True, text=True, check=True)
            report = json.loads(out.stdout.strip().splitlines()[-1])
            assert report["rows_written"] == rows, report
            peaks[rows].append(report["peak_kib"] / 1024)
            growth[rows].append((report["peak_kib"] - report["rss_before_kib"]) / 1024)
            ctx.log(f"round {r + 1}, {rows:,} rows: peak {peaks[rows][-1]:.0f} MiB "
                    f"(+{growth[rows][-1]:.0f} MiB over the process before the run), "
                    f"{report['chunks_written']:,} chunks in {report['seconds']:.1f}s")
    conn.close()
    small, large = sizes
    measures = [
        Measure(f"peak RSS, {large:,} vs {small:,} rows", "MiB", peaks[large], peaks[small], "ratio <= 1.1"),
        Measure(f"RSS growth during the run, {large:,} vs {small:,} rows", "MiB", growth[large], growth[small]),
    ]
    return Result(
        measures=measures, params=p,
        notes=[(f"one bucket (buckets: 1) of rows of {p['chars']} characters, chunked at the default 800/100, "
               "in-memory provider, HNSW index dropped; peak = VmHWM of a fresh process after "
               "resetting it just before the run")],
    ).check(lambda m: m.ratio is not None and m.ratio <= 1.1)


BENCHMARK = Benchmark(
    name="g", title="peak memory of one bucket run", target="flat in rows: peak(50k)/peak(10k) <= 1.1",
    run=run, defaults={"rows": 50_000, "small_rows": 10_000, "chars": 2000},
    quick={"rows": 5_000, "small_rows": 1_000},
)
