"""One bucket run in a fresh process, for bench/memory.py: prints its RSS before the run and its
peak RSS (VmHWM) after, in KiB, as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def main() -> None:
    import psycopg

    from assets.catalog import resolve
    from assets.engine import EmbeddingEngine
    from assets.spec import parse_spec
    from bench.common import FreeProvider

    declaration = json.loads(sys.argv[1])
    spec = parse_spec(declaration, "bench")
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        table = resolve(conn, spec, "bench")
        engine = EmbeddingEngine(conn, table, FreeProvider(spec.provider.dimensions, spec.provider.batch_size))
        # Reset the high-water mark, so the peak is the run's and not the imports'.
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        before = _status("VmRSS")
        stats = engine.sync_bucket(0, full=True)
        peak = _status("VmHWM")
        engine.close()
    print(json.dumps({"rss_before_kib": before, "peak_kib": peak, "rows_written": stats.rows_written,
                      "chunks_written": stats.chunks_written, "seconds": stats.seconds}))


if __name__ == "__main__":
    main()
