"""scale_out. A backfill of every bucket split into k runs (k processes in parallel, each syncing
a contiguous share of the buckets, as a multi-run UI backfill does), against one run over all of
them, measured side by side in each round with the order rotated.

Two providers: an OpenAI-compatible server on 127.0.0.1 that answers each request after a fixed
latency (200 ms), where k runs should be close to k times as fast (every run has the same
max_concurrency, so k runs keep k times as many requests in flight); and the free in-memory
provider, where what is left is the engine's CPU and PostgreSQL's write rate on this machine."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from assets.catalog import ResolvedTable

from bench.common import (
    Benchmark,
    Context,
    Measure,
    Result,
    by_role,
    cpu_snapshot,
    cpu_used,
    create_source,
    declare,
    drop_hnsw,
    postmaster_of,
    reset_store,
)
from bench.remote import openai_server

WORKER = Path(__file__).resolve().parent / "_scale_out_worker.py"


def _shares(buckets: int, k: int) -> list[list[int]]:
    """Contiguous ranges of buckets, one per run, as Dagster's multi-run backfill policy cuts them."""
    per_run = -(-buckets // k)
    return [list(range(start, min(start + per_run, buckets))) for start in range(0, buckets, per_run)]


def _backfill(ctx: Context, declaration: dict[str, Any], k: int, provider: str) -> tuple[float, list[dict[str, Any]]]:
    """Start k runs, wait until each is ready, then time them from one signal to the last one's end."""
    env = {**os.environ, "DATABASE_URL": ctx.url}
    workers = [
        subprocess.Popen([sys.executable, str(WORKER), json.dumps(declaration), ",".join(map(str, share)), provider],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        for share in _shares(declaration["buckets"], k)
    ]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a run did not start: exit code {w.wait()}")
        started, signalled = time.perf_counter(), time.time()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        reports = [json.loads(w.stdout.readline() or "null") for w in workers]
        seconds = time.perf_counter() - started
        for rep in reports:
            rep["start_lag"] = rep.pop("began_at") - signalled
    except BaseException:
        for w in workers:
            w.kill()
        raise
    finally:
        codes = [w.wait(timeout=600) for w in workers]
    if any(codes) or None in reports:
        raise RuntimeError(f"a run failed: exit codes {codes}")
    return seconds, reports


def _measure(ctx: Context, conn: psycopg.Connection, declaration: dict[str, Any], table: ResolvedTable,
             provider: str, ks: list[int],
             rows: int) -> tuple[dict[int, list[float]], list[dict[str, Any]]]:
    """rows/s for each k, per round, the order of the k's rotated every round."""
    rates: dict[int, list[float]] = {k: [] for k in ks}
    details: list[dict[str, Any]] = []
    postmaster = postmaster_of(ctx.url)
    me = psutil.Process()
    for r in range(ctx.rounds):
        for k in ks[r % len(ks):] + ks[:r % len(ks)]:
            reset_store(conn, table)
            before = cpu_snapshot(me, postmaster)
            seconds, reports = _backfill(ctx, declaration, k, provider)
            used = by_role(cpu_used(before, cpu_snapshot(me, postmaster)))
            written = sum(rep["rows_written"] for rep in reports)
            assert written == rows, (k, reports)
            rates[k].append(rows / seconds)
            load = os.getloadavg()
            details.append({
                "round": r + 1, "runs": k, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1),
                "run_seconds": [round(rep["seconds"], 3) for rep in reports],
                "run_start_lags": [round(rep["start_lag"], 3) for rep in reports],
                "requests": sum(rep["requests"] for rep in reports),
                "cpu_seconds": {"runs (their own count)": round(sum(rep["cpu_seconds"] for rep in reports), 2),
                                **used},
                "load_average": load,
            })
            ctx.log(f"{provider} provider, round {r + 1}, {k} run(s): {rows:,} rows in {seconds:.2f}s = "
                    f"{rows / seconds:,.0f} rows/s (slowest run {max(rep['seconds'] for rep in reports):.2f}s), "
                    f"CPU s: runs {sum(rep['cpu_seconds'] for rep in reports):.2f}, postgres "
                    f"{sum(v for role, v in used.items() if role.startswith('postgres')):.2f}; load {load[0]:.2f}")
    return rates, details


def _table(conn: psycopg.Connection, schema: str, rows: int, chars: int, provider: dict[str, Any],
           buckets: int) -> tuple[dict[str, Any], ResolvedTable]:
    create_source(conn, schema, "id int PRIMARY KEY, body text")
    conn.execute(
        sql.SQL("INSERT INTO {} SELECT g, left(repeat(md5(g::text) || ' ', %s), %s) FROM generate_series(1, %s) g")
        .format(sql.Identifier(schema, "docs")), (chars // 33 + 1, chars, rows),
    )
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, "docs")))
    declaration = {"name": schema, "source": {"schema": schema, "table": "docs"}, "columns": ["body"],
                   "buckets": buckets, "provider": provider}
    spec, table = declare(conn, schema, columns=["body"], buckets=buckets, provider=provider)
    drop_hnsw(conn, spec)
    return declaration, table


def run(ctx: Context) -> Result:
    p = ctx.params
    ks = sorted(set(p["runs"]))
    assert ks[0] == 1, "one run is the baseline"
    conn = ctx.connect()
    measures: list[Measure] = []
    extra: dict[str, Any] = {}
    with openai_server(p["dimensions"], p["latency"]) as (base_url, _):
        remote = {"kind": "openai", "model": "bench-latency", "dimensions": p["dimensions"], "base_url": base_url,
                  "batch_size": p["batch_size"], "max_concurrency": p["max_concurrency"],
                  "api_key_env": "VECTORSYNC_BENCH_NO_KEY"}
        declaration, table = _table(conn, "bench_scale_out_remote", p["rows"], p["chars"], remote, p["buckets"])
        rates, extra["remote_rounds"] = _measure(ctx, conn, declaration, table, "declared", ks, p["rows"])
    one = rates[1]
    ideal = p["max_concurrency"] * p["batch_size"] / p["latency"]
    measures.append(Measure(f"1 run, {p['rows']:,} rows, 200 ms provider, vs its ideal", "rows/s", one,
                            [ideal] * len(one)))
    for k in ks[1:]:
        # Each round's k runs against k times that round's one run: the speed-up over k.
        measures.append(Measure(f"{k} runs vs {k} x 1 run, 200 ms provider", "rows/s", rates[k],
                                [k * x for x in one], "ratio >= 0.8"))

    declaration, table = _table(conn, "bench_scale_out_free", p["free_rows"], p["chars"],
                                {"batch_size": p["batch_size"]}, p["buckets"])
    free, extra["free_rounds"] = _measure(ctx, conn, declaration, table, "free", ks, p["free_rows"])
    for k in ks:
        measures.append(Measure(f"{k} run(s), {p['free_rows']:,} rows, free provider" + ("" if k == 1 else " vs 1 run"),
                                "rows/s", free[k], None if k == 1 else free[1]))
    conn.close()
    extra["speed_up_median"] = {str(k): round(statistics.median(rates[k]) / statistics.median(one), 2) for k in ks}
    extra["free_speed_up_median"] = {str(k): round(statistics.median(free[k]) / statistics.median(free[1]), 2)
                                     for k in ks}
    return Result(
        measures=measures, params={**p, "ideal_one_run_rows_per_s": ideal}, extra=extra,
        notes=[(f"each run is a process with the engine over a contiguous share of the {p['buckets']} buckets "
                "(sync_buckets, full), started and connected before the clock, all released by one "
                "signal; timed to the last run's end; Dagster's launch cost is bench ui_backfill's"),
               (f"200 ms provider: tests/openai_server.py in its own process, every run with max_concurrency "
                f"{p['max_concurrency']} and batch_size {p['batch_size']}, so k runs keep k times the requests "
                "in flight; target: k runs at least 0.8 k times as fast as one, in the same round"),
               ("free provider: bench.common.FreeProvider in every run: what is left is the engine's CPU and "
                "PostgreSQL's writes; both sides share this machine's cores with PostgreSQL"),
               "the HNSW index is dropped (its build cost is the same whatever the split); the store is "
               "emptied and CHECKPOINTed before every backfill"],
    ).check(lambda m: m.ratio is not None and m.ratio >= 0.8)


BENCHMARK = Benchmark(
    name="scale_out", title="a backfill split into k parallel runs", target="k runs >= 0.8 k x one run (200 ms provider)",
    run=run,
    defaults={"rows": 20_000, "free_rows": 100_000, "chars": 200, "buckets": 16, "runs": [1, 2, 4],
              "latency": 0.2, "batch_size": 64, "max_concurrency": 4, "dimensions": 32},
    quick={"rows": 4_000, "free_rows": 10_000},
)
