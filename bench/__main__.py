"""`python -m bench [names...]`: run benchmarks side by side with their baselines, print a table and
write JSON to bench/results/<timestamp>.json and bench/results/latest.json.

Every module of this package that defines `BENCHMARK = Benchmark(...)` (see bench/common.py) is a
benchmark, named by `Benchmark.name`; adding one is adding a module. Benchmarks run one after
another, never concurrently, against one embedded PostgreSQL started in a temporary directory.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def discover() -> dict[str, Any]:
    """name -> Benchmark, from every module of this package that defines BENCHMARK."""
    import bench

    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"bench.{info.name}")
        benchmark = getattr(module, "BENCHMARK", None)
        if benchmark is not None:
            found[benchmark.name] = benchmark
    return dict(sorted(found.items()))


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def main(argv: list[str] | None = None) -> int:
    # The embedded server and the model must not be looked for online, and must not share the
    # developer's .vectorsync: every run gets a fresh database in a temporary directory.
    home = Path(tempfile.mkdtemp(prefix="vs-bench-"))
    if os.environ.setdefault("VECTORSYNC_HOME", str(home)) == str(home):
        # Registered first, so it runs last (atexit is last-in, first-out): after the embedded
        # server, started later, has stopped; and also when --list or --markdown return early.
        atexit.register(shutil.rmtree, home, True)
    else:
        home.rmdir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    registry = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(registry)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 round: a smoke check")
    parser.add_argument("--rounds", type=int,
                        help="rounds per side (default: each benchmark's own, 3 for most; --quick 1)")
    parser.add_argument("--rows", type=int, help="row count for every selected benchmark that has one")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                        help="override a parameter, e.g. -o e.batch_size=32 or -o chars=1000")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and their parameters")
    parser.add_argument("--markdown", metavar="JSON", nargs="?", const=str(RESULTS_DIR / "latest.json"),
                        help="print a results file (default: the latest) as a Markdown table, for the README")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0

    if args.list:
        for b in registry.values():
            print(f"{b.name}: {b.title}\n   target: {b.target}\n   defaults: {b.defaults}\n   quick: {b.quick}")
        return 0
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(registry)}")
    selected = [registry[n] for n in (args.names or registry)]

    overrides: dict[str, dict[str, Any]] = {}
    for item in args.option:
        key, _, raw = item.partition("=")
        scope, _, key = key.rpartition(".")
        overrides.setdefault(scope or "*", {})[key] = _parse_value(raw)

    from bench.common import Context, machine_info
    from orchestration.database import database_url

    url = database_url()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report: dict[str, Any] = {
        "started_at": started,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": _git_commit(),
        "quick": args.quick,
        "machine": machine_info(url),
        "benchmarks": {},
    }
    exit_code = 0
    try:
        for b in selected:
            params = dict(b.defaults)
            if args.quick:
                params.update(b.quick)
            if args.rows is not None and "rows" in params:
                params["rows"] = args.rows
            params.update({k: v for k, v in overrides.get("*", {}).items() if k in params})
            params.update(overrides.get(b.name, {}))
            print(f"\n== {b.name}: {b.title}  {params}", flush=True)
            rounds = args.rounds or (1 if args.quick else b.rounds)
            ctx = Context(url=url, rounds=rounds, params=params, quick=args.quick)
            began = time.perf_counter()
            load_before = os.getloadavg()
            try:
                result = b.run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
                traceback.print_exc()
                report["benchmarks"][b.name] = {"title": b.title, "target": b.target, "params": params,
                                                "error": f"{type(exc).__name__}: {exc}"}
                exit_code = 1
                continue
            report["benchmarks"][b.name] = {
                "title": b.title, "target": b.target, "params": result.params, "rounds": rounds,
                "met": result.met, "seconds": round(time.perf_counter() - began, 1),
                # The machine is shared: a busy neighbour shows here before it shows in a ratio.
                "load_average": {"before": load_before, "after": os.getloadavg()},
                "measures": [m.as_json() for m in result.measures], "notes": result.notes,
                **({"extra": result.extra} if result.extra else {}),
            }
            if result.met is False:
                exit_code = 1
            _print_table({b.name: report["benchmarks"][b.name]})
    finally:
        report["finished_at"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2, default=str)
        (RESULTS_DIR / f"{started}.json").write_text(text)
        (RESULTS_DIR / "latest.json").write_text(text)

    print("\n== summary")
    _print_table(report["benchmarks"])
    m = report["machine"]
    print(f"\nmachine: {m['cpu_count']} x {m['cpu_model']}, {m['memory_gb']} GB, Python {m['python']}, "
          f"PostgreSQL {m['postgres']}, pgvector {m['pgvector']}")
    print(f"results: {RESULTS_DIR / (started + '.json')}")
    return exit_code


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def _print_table(benchmarks: dict[str, Any]) -> None:
    header = ("bench", "measure", "unit", "subject", "baseline", "ratio", "target", "met")
    rows = [header]
    for name, b in benchmarks.items():
        if "error" in b:
            rows.append((name, b["error"][:60], "", "", "", "", b["target"][:30], "ERROR"))
            continue
        for m in b["measures"]:
            met = {True: "yes", False: "NO", None: ""}[m["met"]]
            rows.append((name, m["label"], m["unit"], _fmt(m["subject_median"]), _fmt(m["baseline_median"]),
                         _fmt(m["ratio"]), m["target"], met))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def markdown_table(report: dict[str, Any]) -> str:
    """The summary table of one results file, with the machine and commit it was measured on."""
    m = report["machine"]
    lines = [
        f"Measured {report['started_at']} on commit `{(report.get('git_commit') or '?')[:12]}`: "
        f"{m['cpu_count']} x {m['cpu_model']}, {m['memory_gb']} GB, Python {m['python']}, "
        f"PostgreSQL {m['postgres']}, pgvector {m['pgvector']}; medians of {_rounds(report)} rounds "
        "per side, both sides in the same run.",
        "",
        "| bench | measure | unit | subject | baseline | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b in report["benchmarks"].items():
        if "error" in b:
            lines.append(f"| {name} | error: {b['error'][:80]} | | | | | {b['target']} | ERROR |")
            continue
        for x in b["measures"]:
            met = {True: "yes", False: "**no**", None: ""}[x["met"]]
            lines.append(
                f"| {name} | {x['label']} | {x['unit']} | {_fmt(x['subject_median'])} | "
                f"{_fmt(x['baseline_median'])} | {_fmt(x['ratio'])} | {x['target']} | {met} |"
            )
    return "\n".join(lines)


def _rounds(report: dict[str, Any]) -> str:
    counts = sorted({b.get("rounds") for b in report["benchmarks"].values() if b.get("rounds")})
    return "/".join(str(c) for c in counts) or "?"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "assets", "bench"], check=False, capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
