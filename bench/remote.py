"""e. A latency-bound remote provider: an OpenAI-compatible server on 127.0.0.1 that answers each
request after a fixed latency, against the ideal rate for that latency, batch size and concurrency
(concurrency x batch size / latency)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil
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
    sync_all,
    timed,
)


@contextmanager
def openai_server(dimensions: int, latency: float) -> Iterator[tuple[str, int]]:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parent / "_serve_openai.py"), str(dimensions), str(latency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        url = process.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the OpenAI-compatible server did not start (said {url!r})")
        yield url, process.pid
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cpu(server: psutil.Process, backend: psutil.Process) -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    s, b = server.cpu_times(), backend.cpu_times()
    return {"engine": usage.ru_utime + usage.ru_stime, "server": s.user + s.system, "postgres": b.user + b.system}


def run(ctx: Context) -> Result:
    from assets.engine import EmbeddingEngine
    from assets.providers import build_provider

    p = ctx.params
    latency, batch, dims = p["latency"], p["batch_size"], p["dimensions"]
    levels = p["concurrency"]
    conn = ctx.connect()
    measures = []
    samples: dict[int, list[float]] = {c: [] for c in levels}
    alone: dict[int, list[float]] = {c: [] for c in levels}
    cpu: dict[int, list[dict[str, float]]] = {c: [] for c in levels}
    with openai_server(dims, latency) as (base_url, server_pid):
        setups = {}
        for c in levels:
            rows = p["requests_per_worker"] * c * batch
            schema = f"bench_remote_c{c}"
            create_source(conn, schema, "id int PRIMARY KEY, body text")
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT g, left(repeat(md5(g::text) || ' ', %s), %s) FROM generate_series(1, %s) g")
                .format(sql.Identifier(schema, "docs")), (p["chars"] // 33 + 1, p["chars"], rows),
            )
            spec, table = declare(conn, schema, columns=["body"], provider={
                "kind": "openai", "model": "bench-latency", "dimensions": dims, "base_url": base_url,
                "batch_size": batch, "max_concurrency": c, "api_key_env": "VECTORSYNC_BENCH_NO_KEY",
            })
            drop_hnsw(conn, spec)
            provider = build_provider(spec.provider)
            setups[c] = (rows, spec, table, EmbeddingEngine(conn, table, provider), provider)
        backend = psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        server = psutil.Process(server_pid)
        try:
            for r in range(ctx.rounds):
                for c, (rows, spec, table, engine, provider) in setups.items():
                    # The provider alone, same requests and concurrency, no database: the ceiling
                    # this machine allows, which the engine's figure is read against.
                    texts = [f"{i} " + "x" * (p["chars"] - 8) for i in range(rows)]
                    requests = [texts[i:i + batch] for i in range(0, rows, batch)]
                    with ThreadPoolExecutor(c) as pool:
                        seconds, _ = timed(lambda: list(pool.map(provider.embed, requests)))  # noqa: B023
                    alone[c].append(rows / seconds)
                    reset_store(conn, table)
                    before = _cpu(server, backend)
                    seconds, stats = timed(lambda: sync_all(engine, spec.buckets, full=True))  # noqa: B023
                    used = {k: v - before[k] for k, v in _cpu(server, backend).items()}
                    cpu[c].append({k: round(v / seconds, 2) for k, v in used.items()})
                    assert stats.rows_written == rows, stats
                    samples[c].append(rows / seconds)
                    ideal = c * batch / latency
                    ctx.log(f"round {r + 1}, concurrency {c}: {rows} rows in {seconds:.2f}s = "
                            f"{samples[c][-1]:,.0f} rows/s, ideal {ideal:,.0f} ({samples[c][-1] / ideal:.2f}), "
                            f"provider alone {alone[c][-1]:,.0f} rows/s, {stats.provider_requests} requests, "
                            f"cores used {cpu[c][-1]}, load {os.getloadavg()[0]:.1f}")
        finally:
            for _, _, _, engine, provider in setups.values():
                engine.close()
                provider.close()
    conn.close()
    for c in levels:
        ideal = c * batch / latency
        measures.append(Measure(f"concurrency {c}, {p['requests_per_worker'] * c * batch:,} rows", "rows/s",
                                samples[c], [ideal] * len(samples[c]), "ratio >= 0.8"))
    for c in levels:
        measures.append(Measure(f"concurrency {c}: engine vs the provider alone", "rows/s", samples[c], alone[c]))
    return Result(
        measures=measures, params=p, extra={"cores_used_per_round": {str(c): v for c, v in cpu.items()}},
        notes=[(f"ideal = concurrency x {batch} inputs / {latency} s; the server (tests/openai_server.py) "
               f"runs in its own process and answers each request {latency} s after reading it, its own "
               "work included; it sends base64 vectors when asked, as api.openai.com does; every round "
               "re-embeds an emptied store over all buckets"),
               ("provider alone: the same number of requests of the same size through the same provider "
               "object and concurrency with no database, measured in the same round: what the client, "
               "the server and this machine allow"),
               ("cores used: CPU seconds per wall second of the engine process (all threads), the "
               "server process and the engine's PostgreSQL backend during the engine's run")],
    ).check(lambda m: m.ratio is not None and m.ratio >= 0.8)


BENCHMARK = Benchmark(
    name="e", title="latency-bound remote provider", target="rate/ideal >= 0.8 at concurrency 1, 4, 16",
    run=run,
    defaults={"latency": 0.2, "batch_size": 64, "dimensions": 32, "chars": 200,
              "concurrency": [1, 4, 16], "requests_per_worker": 30},
    # 30 requests per slot: a steady-state rate (6 s at concurrency 16); a run's fixed costs
    # (16 bucket locks, the final drain, the orphan check) are a few percent of a 2 s run.
    quick={"requests_per_worker": 4},
)
