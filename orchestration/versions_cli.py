"""`vectorsync sync`, `versions`, `promote` and `rollback`: a table's model versions from the shell.

`sync NAME` makes every live version of the table current (the active one first, then a candidate
filling beside it, then a previous one kept for a rollback), each with its own engine, provider
and run-ledger rows; with `versions.promote: auto` it then promotes a complete candidate. `--batch`
sends the missing vectors of one version through the provider's batch API: the candidate's when
there is one (its fill is the backfill worth half price), else the active version's.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable

import psycopg

from assets import versions
from assets.catalog import ResolvedTable, resolve
from assets.estimate import estimate_fill
from assets.golden import GoldenError
from assets.quality_gate import gate_for
from assets.promotion import PromotionRefused, Switch, coverage, maybe_auto_promote, promote, rollback, version_bytes
from assets.status import require_installed
from assets.batch_fill import batch_jobs_pending
from assets.run_ledger import RunLedger
from assets.usage import BudgetExceeded, batch_price_per_million, cost_usd, rows_to_visit

from .database import connect
from .progress import ProgressDisplay, Reading

Finder = Callable[[argparse.Namespace, str], tuple]


def cmd_sync(args: argparse.Namespace, find: Finder) -> int:
    """Run the engine directly, without Dagster (for scripts and debugging), with a progress bar
    on stderr, and record the run's figures and spend like a Dagster run's."""
    spec, origin = find(args, args.name)
    buckets = [args.bucket] if args.bucket is not None else list(range(spec.buckets))
    run_id = f"cli-{uuid.uuid4().hex[:12]}"
    status = 0
    with connect() as conn, connect() as ledger_conn:
        declared = resolve(conn, spec, origin)
        require_installed(conn, spec)
        live = versions.live_tables(conn, declared)
        batched = next((vt for vt in live if vt.version.state == "candidate"), live[0]) if args.batch else None
        for vt in live:
            status = max(status, _sync_version(conn, ledger_conn, vt, buckets, args, run_id, batch=vt is batched))
        pending = batch_jobs_pending(conn, spec.name)
        if pending:
            print(f"batches pending: {', '.join(pending)}: their buckets are swept by the next run after they "
                  "complete (`vectorsync sync NAME`, a change run, or --wait)")
        if status == 0:
            try:
                switched = maybe_auto_promote(conn, declared, gate_for(declared))
            except PromotionRefused as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if switched is not None:
                print(_switched_line(switched, "promoted (versions.promote: auto)"))
    return status


def _sync_version(conn: psycopg.Connection, ledger_conn: psycopg.Connection, vt: versions.VersionTable,
                  buckets: list[int], args: argparse.Namespace, run_id: str, batch: bool) -> int:
    from assets.engine import EmbeddingEngine, SyncStats, retry_policy
    from assets.providers import provider_for

    table, v = vt.table, vt.version
    spec = table.spec
    full = args.full or batch  # a batch is a backfill: every row of the buckets is compared
    expected = rows_to_visit(conn, table, buckets, full)
    provider = provider_for(spec.provider)  # a local model loads here, before the clock starts
    # The active version's figures under the run's id, another version's beside them.
    ledger = RunLedger(ledger_conn, run_id if v.state == "active" else f"{run_id}/v{v.version}", spec, "cli",
                       buckets, rows_expected=expected)
    metered = ledger.metered(provider)
    engine = EmbeddingEngine(conn, table, metered, retry=retry_policy(spec), reuse_from=vt.reuse_from)
    label = spec.name if v.state == "active" else f"{spec.name} v{v.version} ({v.state})"
    display = ProgressDisplay(label, file=sys.stderr)
    started = time.monotonic()

    def show(force: bool = False) -> None:
        done = ledger.totals()
        display.update(Reading(done.rows_seen, expected, metered.chunks, metered.tokens, metered.cost_usd,
                               time.monotonic() - started), force=force)

    def on_page(page: dict[int, SyncStats]) -> None:
        ledger.add(page)
        show()

    def on_request() -> None:
        ledger.flush()
        show()

    engine.on_page = on_page
    metered.on_request = on_request
    outcome, reason = "failed", None
    try:
        # All buckets in one pass, as a run's sweep does: bucket after bucket would let the
        # provider's concurrency idle at every bucket's end (a small bucket fills one request).
        ledger.settle(engine.sync_buckets(buckets, full=full, should_stop=lambda: metered.exhausted,
                                          batch=True if batch else None, batch_wait_seconds=args.wait))
        outcome = "succeeded"
    except BudgetExceeded as exc:
        outcome, reason = "over_budget", str(exc)
    finally:
        engine.close()
        show(force=True)
        display.close()
        ledger.finish(outcome, reason)
    total = ledger.totals()
    batch_cost = cost_usd(total.batch_tokens, batch_price_per_million(spec.provider))
    prefix = "" if v.state == "active" else f"version {v.version} ({v.state}): "
    print(prefix + ", ".join(f"{k}={x:.2f}" if isinstance(x, float) else f"{k}={x}" for k, x in total.as_dict().items())
          + f", cost_usd={metered.cost_usd + batch_cost:.6f}, batch_cost_usd={batch_cost:.6f}")
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


# Install's note for a version that must now be filled (assets/install.py _plan_candidate).
FILL_STARTS = "created beside active"


def cmd_estimate(args: argparse.Namespace, find: Finder) -> int:
    """What filling the table's candidate version (or, without one, a full sync of the active
    version) would send and cost; nothing is sent to the provider."""
    spec, origin = find(args, args.name)
    with connect() as conn:
        declared = resolve(conn, spec, origin)
        require_installed(conn, spec)  # before a tokenizer loads: one clear error line
        print_estimate(conn, declared, args.no_reuse)
    return 0


def print_estimate(conn: psycopg.Connection, declared: ResolvedTable, no_reuse: bool, prefix: str = "") -> None:
    """A candidate reuses, by model, what its own store and the other live versions' stores hold
    (as its fill does, store.Store); the active version only what it stores under its fingerprint."""
    live = versions.live_tables(conn, declared)
    target = next((vt for vt in live if vt.version.state == "candidate"), live[0])
    table = target.table.with_parameters()
    candidate = target.version.state == "candidate"
    reusable = [] if no_reuse else [table.store, *(
        [table.ident(schema, name) for schema, name in target.reuse_from] if candidate else [])]
    e = estimate_fill(conn, target.table, reusable, reuse_by="model" if candidate else "fingerprint")
    what = f"filling candidate version {target.version.version}" if candidate else "a full sync"
    lines = [
        f"estimate: {what} of {table.spec.name} ({table.spec.fingerprint}); nothing is sent",
        f"rows: {e.rows:,} ({e.rows_empty:,} without content, {e.rows_unrenderable:,} the template cannot render)",
        f"chunks: {e.chunks:,}",
        f"reused: {e.chunks_reused:,}" + (" (repeated texts)" if no_reuse else " (stored, or repeated)"),
        f"chunks to send: {e.chunks_to_send:,}",
        f"tokens: {e.tokens:,}",
        f"cost: ${e.usd:.6f} at ${e.price_per_million:g} per million tokens (${e.usd_batch:.6f} through the batch API)",
        f"seconds: {e.seconds:.2f}",
    ]
    for line in lines:
        print(prefix + line)


def cmd_versions(args: argparse.Namespace, find: Finder) -> int:
    """Each version of a table: number, state, fingerprint, rows covered / total, size, drop_after."""
    spec, origin = find(args, args.name)
    with connect() as conn:
        declared = resolve(conn, spec, origin)
        require_installed(conn, spec)
        rows = []
        for v in versions.versions(conn, spec.name, ("active", "candidate", "previous", "retired")):
            if v.state == "retired":
                covered, size = "-", f"freed {_bytes(v.freed_bytes or 0)}"
            else:
                cov = coverage(conn, versions.version_table(conn, declared, v))
                covered = f"{cov.rows_covered}/{cov.source_rows}" + ("" if cov.complete else " (filling)")
                size = _bytes(version_bytes(conn, v))
            when = v.drop_after.strftime("%Y-%m-%d %H:%M UTC") if v.drop_after else "-"
            rows.append((v.version, v.state + (" (rolled back)" if v.rolled_back_at and v.state == "candidate" else ""),
                         v.fingerprint, covered, size, when))
    widths = [max(len(str(x)) for x in col) for col in zip(_HEADER, *rows)]
    for line in (_HEADER, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    return 0


_HEADER = ("version", "state", "fingerprint", "rows covered", "size", "drop after")


def cmd_promote(args: argparse.Namespace, find: Finder) -> int:
    def gated(conn: psycopg.Connection, declared: ResolvedTable) -> Switch:
        return promote(conn, declared, None if args.skip_quality_gate else gate_for(declared))

    return _switch(args, find, gated, "promoted")


def cmd_rollback(args: argparse.Namespace, find: Finder) -> int:
    return _switch(args, find, rollback, "rolled back")


def _switch(args: argparse.Namespace, find: Finder,
            action: Callable[[psycopg.Connection, ResolvedTable], Switch], verb: str) -> int:
    spec, origin = find(args, args.name)
    with connect() as conn:
        declared = resolve(conn, spec, origin)
        require_installed(conn, spec)
        try:
            switched = action(conn, declared)
        except (PromotionRefused, GoldenError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(_switched_line(switched, verb))
    for note in switched.notes:
        print(note)
    return 0


def _switched_line(s: Switch, verb: str) -> str:
    line = f"table {s.table_name}: {verb}: version {s.active} is active"
    if s.previous is not None:
        line += f", version {s.previous} was"
    if s.gate is not None:
        line += f"; quality gate: {s.gate.reason}"
    if s.dropped:
        line += "; dropped " + ", ".join(f"version {n} ({_bytes(b)} freed)" for n, b in s.dropped.items())
    return line


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="make a table current without Dagster: every live model version of it")
    p.add_argument("name")
    p.add_argument("--bucket", type=int)
    p.add_argument("--full", action="store_true", help="compare every row, not just the change log")
    p.add_argument("--batch", action="store_true", help="a full sync whose missing vectors go through the "
                   "provider's batch API at half price (for the candidate version when there is one); stored "
                   "when the batch completes (within 24 h), by this command if it still waits (--wait) or by "
                   "the next run")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for pending "
                   "batches of the buckets, then store what they returned")
    p = sub.add_parser("estimate", help="chunks, tokens and dollars filling the candidate version (or a full "
                       "sync) would send, sending nothing")
    p.add_argument("name")
    p.add_argument("--no-reuse", action="store_true", help="count every chunk, as if no store held any "
                   "(a full re-embed from scratch)")
    p = sub.add_parser("versions", help="a table's model versions: state, fingerprint, rows covered, size")
    p.add_argument("name")
    p = sub.add_parser("promote", help="make a table's complete candidate version the one search answers from")
    p.add_argument("name")
    p.add_argument("--skip-quality-gate", action="store_true", help="promote even if the candidate scores "
                   "worse on the golden queries than `versions.max_quality_drop` allows")
    p = sub.add_parser("rollback", help="switch a table back to its previous model version while it is kept")
    p.add_argument("name")
