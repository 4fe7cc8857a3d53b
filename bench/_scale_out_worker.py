"""One run of a split backfill, in its own process, for bench/scale_out.py: the engine over a
share of the table's buckets, as one Dagster run of a multi-run backfill does (without Dagster's
launch cost, measured by bench ui_backfill).

Usage: _scale_out_worker.py DECLARATION_JSON BUCKETS PROVIDER, with DATABASE_URL set; BUCKETS is
comma-separated, PROVIDER is `free` (bench.common.FreeProvider) or `declared`. Prints `ready`
once imported, connected and built, waits for a line on stdin (so every run starts on the same
signal and start-up is not timed), then prints one JSON line with its figures."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import psycopg

    from assets.catalog import resolve
    from assets.engine import EmbeddingEngine, SyncStats
    from assets.providers import build_provider
    from assets.spec import parse_spec
    from bench.common import FreeProvider

    declaration, buckets, kind = json.loads(sys.argv[1]), [int(b) for b in sys.argv[2].split(",")], sys.argv[3]
    spec = parse_spec(declaration, "bench")
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        table = resolve(conn, spec, "bench")
        provider = (FreeProvider(spec.provider.dimensions, spec.provider.batch_size) if kind == "free"
                    else build_provider(spec.provider))
        engine = EmbeddingEngine(conn, table, provider)
        print("ready", flush=True)
        sys.stdin.readline()
        began_at = time.time()  # wall clock, comparable with the parent's: when the signal got here
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        try:
            worked = engine.sync_buckets(buckets, full=True)
        finally:
            engine.close()
            provider.close()
        seconds = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    total = SyncStats()
    for stats in worked.values():
        total.merge(stats)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    print(json.dumps({"buckets": buckets, "rows_written": total.rows_written, "requests": total.provider_requests,
                      "seconds": seconds, "cpu_seconds": cpu, "began_at": began_at}), flush=True)


if __name__ == "__main__":
    main()
