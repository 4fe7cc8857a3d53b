"""One estimate in a fresh process, for bench/estimate.py: prints the estimate's figures, the RSS
before it and the peak RSS (VmHWM) after it, in KiB, as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._memory_worker import _status  # noqa: E402


def main() -> None:
    import psycopg

    from assets.catalog import resolve
    from assets.estimate import estimate_fill, token_counter_for
    from assets.spec import parse_spec

    spec = parse_spec(json.loads(sys.argv[1]), "bench")
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        table = resolve(conn, spec, "bench")
        counter = token_counter_for(spec.provider)  # loaded (a tokenizer, a model) before the measure
        counter.count_tokens(["warm up"])
        # Reset the high-water mark, so the peak is the estimate's and not the imports'.
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        before = _status("VmRSS")
        estimate = estimate_fill(conn, table, [table.with_parameters().store], counter)
        peak = _status("VmHWM")
    print(json.dumps({"rss_before_kib": before, "peak_kib": peak, **estimate.as_dict()}))


if __name__ == "__main__":
    main()
