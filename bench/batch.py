"""batch. A backfill through the OpenAI Batch API against ordinary requests, on the issue's
workload (20,000 rows of ~500 characters, text-embedding-3-small, OpenAI-compatible server on
127.0.0.1 in its own process): HTTP requests, price (the rows' exact cl100k tokens at OpenAI's list
price, and at the batch price) and the engine's time. The test server completes a batch at its
second poll, so "time" is vectorsync's own work (prepare and upload, then collect and store); a
real batch adds the provider's turnaround, minutes to 24 hours."""

from __future__ import annotations

import os
import time
from collections import Counter

from psycopg import sql

from assets.batch_api import BatchAPI
from assets.usage import batch_price_per_million, cost_usd, price_per_million
from bench.common import Benchmark, Context, Measure, Result, create_source, declare, drop_hnsw, reset_store, timed
from bench.remote import openai_server


class CountingBatchAPI(BatchAPI):
    """The batch API, counting its HTTP calls and their seconds by kind."""

    calls: Counter[str] = Counter()
    seconds: Counter[str] = Counter()

    def _timed(self, kind: str, call, n: int = 1):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.calls[kind] += n
            self.seconds[kind] += time.perf_counter() - started

    def upload(self, file, name):  # type: ignore[no-untyped-def]
        return self._timed("upload", lambda: super(CountingBatchAPI, self).upload(file, name))

    def create(self, input_file_id, metadata):  # type: ignore[no-untyped-def]
        return self._timed("create", lambda: super(CountingBatchAPI, self).create(input_file_id, metadata))

    def retrieve(self, batch_id):  # type: ignore[no-untyped-def]
        # The test server runs the whole batch inside the poll that completes it: its own time.
        return self._timed("poll", lambda: super(CountingBatchAPI, self).retrieve(batch_id))

    def results(self, state):  # type: ignore[no-untyped-def]
        files = sum(1 for f in (state.output_file_id, state.error_file_id) if f)
        return self._timed("download", lambda: super(CountingBatchAPI, self).results(state), files)


def _all(engine, buckets: int, **kwargs):  # type: ignore[no-untyped-def]
    from assets.engine import SyncStats

    total = SyncStats()
    for stats in engine.sync_buckets(list(range(buckets)), **kwargs).values():
        total.merge(stats)
    return total


def run(ctx: Context) -> Result:
    from assets.engine import EmbeddingEngine
    from assets.providers import build_provider

    p = ctx.params
    conn = ctx.connect()
    sync_seconds, submit_seconds, collect_seconds, sync_requests, batch_requests = [], [], [], [], []
    with openai_server(p["dimensions"], p["latency"]) as (base_url, _):
        schema = "bench_batch"
        create_source(conn, schema, "id int PRIMARY KEY, body text")
        conn.execute(sql.SQL(
            "INSERT INTO {} SELECT i, left(repeat('Row ' || i || ' describes a change in the catalogue, and the "
            "embedding follows it. ', 12), %s) FROM generate_series(1, %s) i"
        ).format(sql.Identifier(schema, "docs")), (p["chars"], p["rows"]))
        spec, table = declare(conn, schema, columns=["body"], page_size=2000, provider={
            "kind": "openai", "model": "text-embedding-3-small", "dimensions": p["dimensions"], "base_url": base_url,
            "batch_size": 2048, "max_concurrency": 4, "api_key_env": "VECTORSYNC_BENCH_NO_KEY"})
        drop_hnsw(conn, spec)
        provider = build_provider(spec.provider)
        engine = EmbeddingEngine(conn, table, provider)
        engine.batch_fill.make_api = lambda: CountingBatchAPI(spec.provider)
        texts = [t for (t,) in conn.execute(sql.SQL("SELECT body FROM {}").format(sql.Identifier(schema, "docs")))]
        tokens = sum(provider.count_tokens(texts))
        try:
            for r in range(ctx.rounds):
                reset_store(conn, table)
                seconds, stats = timed(lambda: _all(engine, spec.buckets, full=True))
                assert stats.rows_written == p["rows"], stats
                sync_seconds.append(seconds)
                sync_requests.append(stats.provider_requests)
                reset_store(conn, table)
                CountingBatchAPI.calls.clear()
                CountingBatchAPI.seconds.clear()
                seconds, stats = timed(lambda: _all(engine, spec.buckets, full=True, batch=True))
                assert stats.batches_submitted >= 1 and stats.rows_written == 0, stats
                submit_seconds.append(seconds)
                _all(engine, spec.buckets)  # the first poll: in progress
                seconds, stats = timed(lambda: _all(engine, spec.buckets))  # completed: collect, store
                assert stats.rows_written == p["rows"] and stats.provider_requests == 0, stats
                # Less the polls' time: the test server runs the batch inside the poll that ends it.
                collect_seconds.append(seconds - CountingBatchAPI.seconds["poll"])
                batch_requests.append(sum(CountingBatchAPI.calls.values()))
                ctx.log(f"round {r + 1}: sync {sync_seconds[-1]:.2f}s in {sync_requests[-1]} requests; batch "
                        f"{submit_seconds[-1]:.2f}s to send + {collect_seconds[-1]:.2f}s to collect and store, "
                        f"requests {dict(CountingBatchAPI.calls)}, seconds {({k: round(v, 2) for k, v in CountingBatchAPI.seconds.items()})}; {tokens:,} tokens; load {os.getloadavg()[0]:.1f}")
        finally:
            engine.close()
            provider.close()
    conn.close()
    sync_price = cost_usd(tokens, price_per_million(spec.provider))
    batch_price = cost_usd(tokens, batch_price_per_million(spec.provider))
    rows = f"{p['rows']:,} rows"
    return Result(
        measures=[
            Measure(f"price of a backfill of {rows}, batch vs ordinary", "USD", [batch_price], [sync_price],
                    "ratio <= 0.5"),
            Measure(f"HTTP requests, {rows}, batch vs ordinary", "count", batch_requests, sync_requests),
            Measure(f"engine seconds, {rows}: send + collect-and-store vs ordinary", "s",
                    [a + b for a, b in zip(submit_seconds, collect_seconds)], sync_seconds),
            Measure(f"engine seconds to send the batch, {rows}", "s", submit_seconds),
            Measure(f"engine seconds to collect and store (download, cache, sweep), {rows}", "s", collect_seconds),
        ],
        params=p, extra={"tokens": tokens, "load": os.getloadavg()},
    ).check(lambda m: m.ratio is not None and m.ratio <= 0.5 + 1e-9)


BENCHMARK = Benchmark(
    name="batch",
    title="backfill through the OpenAI Batch API vs ordinary requests",
    target="half the price; the same vectors; no ordinary request",
    run=run,
    defaults={"rows": 20_000, "chars": 500, "dimensions": 256, "latency": 0.05},
    quick={"rows": 2_000},
    rounds=1,
)
