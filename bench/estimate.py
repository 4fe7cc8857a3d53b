"""estimate: the cost of a fill, estimated before it starts (assets/estimate.py), on a large
table: its time, and its peak memory, which must not grow with the number of rows (the source is
streamed in pages; only 12 bytes per distinct chunk to send are kept). Each estimate runs in a
fresh process, after its token counter is loaded, over a table of `rows` rows against one of
`small_rows`, both of distinct prose of `chars` characters (two chunks a row at the default
chunking), declared for OpenAI's text-embedding-3-small (tiktoken counts, no key, no request)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import Benchmark, Context, Measure, Result, body_text, create_source, declare, drop_hnsw, load_rows

WORKER = Path(__file__).resolve().parent / "_estimate_worker.py"


def run(ctx: Context) -> Result:
    p = ctx.params
    sizes = (p["small_rows"], p["rows"])
    conn = ctx.connect()
    declarations = {}
    provider = {"kind": "openai", "model": "text-embedding-3-small", "dimensions": 1536,
                "base_url": "http://127.0.0.1:9/v1"}  # never called: an estimate sends nothing
    for rows in sizes:
        schema = f"bench_estimate_{rows}"
        create_source(conn, schema, "id int PRIMARY KEY, body text")
        ctx.log(f"loading {rows:,} rows")
        load_rows(conn, schema, ((i, body_text(i, p["chars"])) for i in range(rows)), ("id", "body"))
        declarations[rows] = {"name": schema, "source": {"schema": schema, "table": "docs"},
                              "columns": ["body"], "provider": provider}
        spec, _ = declare(conn, schema, columns=["body"], provider=provider)
        drop_hnsw(conn, spec)
        conn.execute(f"VACUUM ANALYZE {schema}.docs")
    conn.close()
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    peaks: dict[int, list[float]] = {n: [] for n in sizes}
    growth: dict[int, list[float]] = {n: [] for n in sizes}
    reports = {}
    env = {**os.environ, "DATABASE_URL": ctx.url}
    for r in range(ctx.rounds):
        for rows in sizes:
            out = subprocess.run([sys.executable, str(WORKER), json.dumps(declarations[rows])], env=env,
                                 capture_output=True, text=True, check=True)
            report = reports[rows] = json.loads(out.stdout.strip().splitlines()[-1])
            assert report["rows"] == rows and report["chunks_to_send"] == report["chunks"], report
            seconds[rows].append(report["seconds"])
            peaks[rows].append(report["peak_kib"] / 1024)
            growth[rows].append((report["peak_kib"] - report["rss_before_kib"]) / 1024)
            ctx.log(f"round {r + 1}, {rows:,} rows: {report['seconds']:.1f}s, {report['chunks']:,} chunks, "
                    f"{report['tokens']:,} tokens, ${report['usd']:.4f}; peak {peaks[rows][-1]:.0f} MiB "
                    f"(+{growth[rows][-1]:.1f} MiB during the estimate); load {open('/proc/loadavg').read().strip()}")
    small, large = sizes
    measures = [
        Measure(f"estimate of {large:,} rows", "s", seconds[large]),
        Measure(f"rows per second, {large:,} rows", "rows/s", [large / s for s in seconds[large]]),
        Measure(f"peak RSS, {large:,} vs {small:,} rows", "MiB", peaks[large], peaks[small], "ratio <= 1.1"),
        Measure(f"RSS growth during the estimate, {large:,} vs {small:,} rows", "MiB", growth[large], growth[small]),
    ]
    big = reports[large]
    return Result(
        measures=measures, params=p,
        notes=[f"{large:,} rows: {big['chunks']:,} chunks, {big['tokens']:,} tokens, ${big['usd']:.4f} at "
               f"${big['price_per_million']} per million tokens (text-embedding-3-small)",
               "peak = VmHWM of a fresh process, reset after imports and the tokenizer's load"],
    ).check(lambda m: m.ratio is not None and m.ratio <= 1.1)


BENCHMARK = Benchmark(
    name="estimate", title="the cost estimate of a fill: time and peak memory on a large table",
    target="flat in rows: peak(100k)/peak(10k) <= 1.1",
    run=run, defaults={"rows": 100_000, "small_rows": 10_000, "chars": 1500},
    quick={"rows": 5_000, "small_rows": 1_000}, rounds=2,
)
