"""`vectorsync`: install, status, search, sync, estimate and the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assets.catalog import resolve
from assets.install import install
from assets.declarations import load_declarations
from assets.spec import SpecError, TableSpec
from assets.status import installed_tables, require_installed, table_status
from assets.usage import Spend, spend_by_table
from assets import wal_capture

from . import versions_cli
from .database import connect, database_url, ensure_server_settings, tables_dir, vectorsync_home

DEMO_QUERIES = (
    "how do I open a file",
    "sort a list in place",
    "run a shell command and capture its output",
    "parse JSON text into Python objects",
)


def _specs(args: argparse.Namespace) -> list[tuple[TableSpec, str]]:
    return load_declarations(Path(args.tables) if args.tables else tables_dir())


def _find(args: argparse.Namespace, name: str) -> tuple[TableSpec, str]:
    for spec, origin in _specs(args):
        if spec.name == name:
            return spec, origin
    raise SpecError(str(args.tables or tables_dir()), "name", f"no table named {name!r} is declared")


def cmd_install(args: argparse.Namespace) -> int:
    from assets.grants import GrantError, grant_run_role

    specs = _specs(args)
    if any(s.capture == "logical" for s, _ in specs):
        # Decoding the WAL needs wal_level = logical: the embedded server is restarted with it;
        # a server of DATABASE_URL is its owner's, and install then says what it lacks.
        ensure_server_settings(database_url(), {"wal_level": "logical"})
    with connect() as conn:
        report = install(conn, specs)
        for role in args.grant or []:
            try:
                granted = grant_run_role(conn, [resolve(conn, s, o) for s, o in specs], role)
            except GrantError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"granted role {granted.role}: read on the sources, write on the stores, change logs "
                  f"and failure ledger of {', '.join(granted.tables) or 'no table'}")
    print(f"migrations applied: {', '.join(report.migrations_applied) or 'none (up to date)'}")
    print(f"tables installed: {', '.join(report.tables) or 'none declared'}")
    if report.sweeps_requested:
        print(f"full sweeps queued (new table, model version or destination): {', '.join(report.sweeps_requested)}")
    for name, notes in report.notes.items():
        for note in notes:
            print(f"{name}: {note}")
    # What filling each new candidate version will cost, before anything fills it.
    fresh = [(s, o) for s, o in specs if any(versions_cli.FILL_STARTS in n for n in report.notes.get(s.name, []))]
    if fresh:
        with connect() as conn:
            for spec, origin in fresh:
                versions_cli.print_estimate(conn, resolve(conn, spec, origin), no_reuse=False, prefix=f"{spec.name}: ")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with connect() as conn:
        names = installed_tables(conn)
        if not names:
            print("nothing installed yet: run `vectorsync install`")
            return 0
        header = ("table", "source", "source rows", "embedded", "current", "chunks", "pending",
                  "failed", "dead", "skipped", "tokens 24h", "cost 24h", "tokens 30d", "cost 30d", "batch saved 30d")
        spend = spend_by_table(conn)
        rows, problems, slots = [], [], []
        for name in names:
            try:
                s = table_status(conn, name)
            except LookupError as exc:  # one broken table must not hide the others' figures
                problems.append(str(exc))
                continue
            if wal_capture.capture_mode(conn, name) == "logical":
                # Its pending count is what was drained: keys still in the WAL come on top.
                slot = wal_capture.slot_health(conn, name)
                slots.append(f"{name}: capture: logical, slot {slot.slot} {slot.state or 'missing'}, "
                             f"{slot.undrained_bytes / 2**20:.1f} MiB of WAL not drained yet, "
                             f"{slot.retained_bytes / 2**20:.1f} MiB kept")
            used = spend.get(name, Spend(0, 0.0, 0, 0.0))
            rows.append((s.name, s.source, s.source_rows, s.rows_embedded, s.rows_current, s.chunks,
                         s.pending_changes, s.failed_rows, s.dead_rows, s.skipped_rows,
                         used.tokens_day, f"${used.cost_day:.4f}", used.tokens_month, f"${used.cost_month:.4f}",
                         f"${used.saved_month:.4f}"))
    _print_table(header, rows)
    for line in slots:
        print(line)
    # Reported, not fatal: status is what one runs to find out what is wrong.
    for problem in problems:
        print(f"error: {problem}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from assets.providers import provider_for
    from assets.search import SearchError, hybrid_search, search
    from assets.versions import installed_spec

    # --where values stay text: the search casts each to its column's type, so `id=7` compares as
    # an integer and `added=2024-01-31` as a date. A column given twice matches any of its values.
    values: dict[str, list[str]] = {}
    for item in args.where:
        column, equals, value = item.partition("=")
        if not equals or not column:
            print(f"error: --where {item!r}: give COLUMN=VALUE", file=sys.stderr)
            return 2
        values.setdefault(column, []).append(value)
    where = {column: v[0] if len(v) == 1 else v for column, v in values.items()}
    spec, origin = _find(args, args.name)
    try:
        with connect() as conn:
            table = resolve(conn, spec, origin)
            require_installed(conn, spec)  # before the service or a model load: one clear error line
            hits = _search_by_service(args, spec, where)
            if hits is None:  # no service runs for this database and declaration: load the model here
                # The active version's model, which may not be the declared one yet (a candidate fills).
                provider = provider_for(installed_spec(conn, spec).provider)
                if args.hybrid:
                    hits = hybrid_search(conn, table, provider, args.query, k=args.k, where=where,
                                         rrf_k=args.rrf_k, text_match=args.match)
                else:
                    hits = search(conn, table, provider, args.query, k=args.k, where=where)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rank, hit in enumerate(hits, start=1):
        key = ", ".join(str(v) for v in hit.key)
        snippet = " ".join(hit.chunk.split())[:100]
        if args.hybrid:  # which list put the row here: its rank by vector (v) and by full text (t)
            ranks = f"v{hit.vector_rank or '-'} t{hit.text_rank or '-'}"
            print(f"{rank:2d}. {hit.score:.4f} {ranks:>7}  [{key}]  {snippet}")
        else:
            print(f"{rank:2d}. {hit.score:.3f}  [{key}]  {snippet}")
    if not hits:
        print("no results: is the table embedded (see `vectorsync status`), or is the filter too narrow?")
    return 0


def _search_by_service(args: argparse.Namespace, spec: TableSpec, where: dict) -> list | None:
    """The hits from the warm search service (`vectorsync serve`), or None when none runs."""
    from assets.search_client import find_service

    client = find_service(vectorsync_home())
    if client is None:
        return None
    fusion = {"rrf_k": args.rrf_k, "text_match": args.match} if args.hybrid else {}
    # No fingerprint: the service embeds with the active version's model, as the database says.
    return client.search(spec.name, None, args.query, k=args.k, hybrid=args.hybrid,
                         where=where, **fusion)


def cmd_serve(args: argparse.Namespace) -> int:
    """Keep the query models loaded and answer searches over HTTP on 127.0.0.1."""
    from assets.search_service import serve

    serve(_specs(args), database_url(), vectorsync_home(), port=args.port)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Build a table's HNSW index now, rather than at the index upkeep schedule's next tick."""
    from assets.index import build_index

    spec, origin = _find(args, args.name)
    with connect() as conn:
        state = build_index(conn, resolve(conn, spec, origin))
    if state.exists and state.valid:
        print(f"index {state.index} of {state.table} is built")
    elif state.building:
        print(f"index {state.index} of {state.table} is being built by another session")
    else:
        print(f"index {state.index} of {state.table} not built: the store has fewer than index.min_rows "
              f"({state.min_rows}) chunks, where an exact scan is fast")
    return 0


def cmd_dagster_instance(args: argparse.Namespace) -> int:
    """Write $DAGSTER_HOME/dagster.yaml for the database at DATABASE_URL (or the embedded one), or
    print it. The URL comes from the environment, never the command line, where `ps` shows it."""
    import yaml

    from .instance import dagster_home, instance_config, prepare_instance

    url = database_url()
    if args.print:
        print(yaml.safe_dump(instance_config(url), sort_keys=False), end="")
        return 0
    home = prepare_instance(url, Path(args.home) if args.home else dagster_home())
    print(f"wrote {home / 'dagster.yaml'} (storage in the database `dagster` on the same server)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(queries=DEMO_QUERIES, serve=not args.no_serve, port=args.port, limit=args.limit)


def _print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in (header, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vectorsync", description=__doc__)
    parser.add_argument("--tables", help="directory of table declarations (default: $VECTORSYNC_TABLES "
                        "or orchestration/defs: a folder per table with its defs.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="create or update the control schema and every declared table")
    p.add_argument("--grant", action="append", metavar="ROLE", help="also grant this existing role what runs "
                   "need (read on the sources, write on the stores and control tables, no DDL); repeatable")
    sub.add_parser("status", help="per table: source rows, embedded, current, pending, failed, and "
                   "tokens and cost over the last 24 hours and 30 days")
    p = sub.add_parser("search", help="nearest source rows to a query (--hybrid: full text as well)")
    p.add_argument("name")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--hybrid", action="store_true", help="merge vector and full-text search by reciprocal "
                   "rank fusion")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep rows whose source column equals VALUE, cast to the column's type; "
                   "repeatable: all must hold, and a column given twice matches either value")
    p.add_argument("--rrf-k", type=int, default=60, help="the RRF constant: score = sum of 1/(k + rank)")
    p.add_argument("--match", choices=("all", "any", "web"), default="all", help="full-text side: rows with "
                   "all the query's words, or any of them, read as plain words; 'web' reads web-search "
                   "syntax (\"a phrase\", or, -word)")
    p = sub.add_parser("serve", help="a warm HTTP search API on 127.0.0.1 that `search` uses while it runs")
    p.add_argument("--port", type=int, default=8765, help="0: any free port (see search-service.json)")
    p = sub.add_parser("index", help="build a table's HNSW index now, without waiting for the schedule")
    p.add_argument("name")
    versions_cli.add_parsers(sub)  # sync, estimate, versions, promote, rollback
    p = sub.add_parser("demo", help="embed Python's documentation, search it, then serve Dagster's UI")
    p.add_argument("--no-serve", action="store_true", help="stop after the searches")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--limit", type=int, help="load only this many documents")
    sub.add_parser("database-url", help="print the database URL (starting the embedded server)")
    p = sub.add_parser("dagster-instance", help="write $DAGSTER_HOME/dagster.yaml (storage on the database at "
                       "DATABASE_URL, in a database named dagster, created if missing) and Dagster's tables")
    p.add_argument("--home", help="the Dagster home to write (default: $DAGSTER_HOME or .vectorsync/dagster_home)")
    p.add_argument("--print", action="store_true", help="print the dagster.yaml instead; touch nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "install": cmd_install, "status": cmd_status, "search": cmd_search,
        "sync": lambda a: versions_cli.cmd_sync(a, _find), "versions": lambda a: versions_cli.cmd_versions(a, _find),
        "promote": lambda a: versions_cli.cmd_promote(a, _find), "rollback": lambda a: versions_cli.cmd_rollback(a, _find),
        "demo": cmd_demo, "serve": cmd_serve, "estimate": lambda a: versions_cli.cmd_estimate(a, _find), "index": cmd_index,
        "database-url": lambda a: print(database_url()) or 0,
        "dagster-instance": cmd_dagster_instance,
    }
    try:
        return commands[args.command](args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
