"""`vectorsync demo`: embed Python's documentation through Dagster, search it, serve the UI.

The first run loads ~3,000 documents, installs the `python_docs` table and materializes its 16
partitions in one Dagster run on the Postgres-backed instance, printing progress while it runs (rows
done, rows per second, time left, and the run's own per-bucket log lines). A second run finds the
store current and skips straight to the searches and the UI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

# Before the model loads: its weight-loading bar and token-length advisories are noise in a demo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import dagster as dg
import psycopg

# Before the definitions are built (on import below): Dagster flags backfill_policy as beta on
# every build, and platformdirs warns about a missing XDG_RUNTIME_DIR in containers; neither is
# something a demo user can act on.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

from assets.catalog import resolve
from assets.install import install
from assets.providers import provider_for
from assets.search import search
from assets.declarations import load_declarations
from assets.spec import TableSpec
from assets.status import TableStatus, table_status
from orchestration.embedding_assets import GROUP, SOURCE_GROUP, partitions_for

from .corpus import load_python_docs
from .database import PROJECT_DIR, connect, database_url, release_dead_handles, tables_dir
from .instance import prepare_instance
from .names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG, embeddings_asset_key
from .processes import finish_process_group
from .progress import ProgressDisplay, Reading
from .resources import database_resource

DEMO_TABLE = "python_docs"
DEMO_RUN_TAG = "vectorsync/demo_session"
# The run's row is read by key, so the bar can move twice a second.
PROGRESS_INTERVAL_SECONDS = 0.5


def _accounted(s: TableStatus) -> int:
    """Source rows that need no more work: current, or deliberately skipped, or recorded as failed."""
    return min(s.source_rows, s.rows_current + s.skipped_rows + s.failed_rows + s.dead_rows)


def _is_current(s: TableStatus) -> bool:
    return s.pending_changes == 0 and _accounted(s) >= s.source_rows


def run_reading(conn: psycopg.Connection, run_id: str) -> Reading | None:
    """Where a run is, from its row in vectorsync.runs, which the run updates as each page is
    written and each provider request returns (a cheap read by key, unlike a count of the store)."""
    found = conn.execute(
        """SELECT rows_seen, rows_expected, chunks_embedded, tokens, cost_usd,
                  extract(epoch FROM clock_timestamp() - started_at)::float8
           FROM vectorsync.runs WHERE run_id = %s""",
        (run_id,),
    ).fetchone()
    return Reading(*found) if found else None


class RunProgress(threading.Thread):
    """While dg.materialize blocks the main thread, show what the run is doing: a progress bar
    (rows done, rows per second, time left; chunks, tokens and cost from the first provider
    request on) read from the run's row in the control schema, and each log line the run's asset
    writes (read back from the Dagster instance's event log, the same lines the UI shows)."""

    def __init__(self, url: str, table: str, instance: dg.DagsterInstance, session: str) -> None:
        super().__init__(name="demo-progress", daemon=True)
        self.url, self.table, self.instance, self.session = url, table, instance, session
        self.stopped = threading.Event()
        self.display = ProgressDisplay("embedding")
        self._run_id: str | None = None
        self._cursor: str | None = None

    def run(self) -> None:
        reading = None
        try:
            with connect(self.url) as conn:
                while not self.stopped.wait(PROGRESS_INTERVAL_SECONDS):
                    self._print_run_logs()
                    if self._run_id is not None and (reading := run_reading(conn, self._run_id)):
                        self.display.update(reading)
                self._print_run_logs()
                if self._run_id is not None and (reading := run_reading(conn, self._run_id)):
                    self.display.update(reading, force=True)
        except Exception as exc:  # progress is a courtesy: never let it take the demo down
            self.display.print(f"  (progress display stopped: {exc})")
        self.display.close()

    def _print_run_logs(self) -> None:
        if self._run_id is None:
            records = self.instance.get_run_records(dg.RunsFilter(tags={DEMO_RUN_TAG: self.session}), limit=1)
            if not records:
                return
            self._run_id = records[0].dagster_run.run_id
            self.display.print(f"  dagster run {self._run_id[:8]} started: open it in the UI later under Runs")
        conn = self.instance.get_records_for_run(self._run_id, cursor=self._cursor)
        self._cursor = conn.cursor
        for record in conn.records:
            entry = record.event_log_entry
            if entry.is_dagster_event:  # step and engine events: the UI's job, not the console's
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(entry.timestamp))
            self.display.print(f"  {stamp} {entry.user_message}")


def _checks_of(defs: dg.Definitions, key: dg.AssetKey) -> list[dg.AssetChecksDefinition]:
    """The check definitions that target `key` (one definition may hold several checks)."""
    check_keys = [ck for ck in defs.resolve_asset_graph().asset_check_keys if ck.asset_key == key]
    found = {}
    for check_key in check_keys:
        definition = defs.get_asset_checks_def(check_key)
        found[id(definition)] = definition
    return list(found.values())


def _embed_through_dagster(url: str, spec: TableSpec) -> None:
    """Materialize every partition of the demo table in one Dagster run, showing progress, and
    evaluate its checks in the same run so the UI shows their results rather than 'not evaluated'."""
    from .definitions import defs

    key = embeddings_asset_key(spec)
    checks = _checks_of(defs, key)
    partition_keys = partitions_for(spec).get_partition_keys()
    session = uuid.uuid4().hex
    embed_started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        progress = RunProgress(url, spec.name, instance, session)
        progress.start()
        try:
            result = dg.materialize(
                [defs.get_assets_def(key), *checks],
                instance=instance,
                resources={"database": database_resource()},
                # The run's info lines come back through RunProgress; the console keeps warnings.
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                tags={
                    PARTITION_RANGE_START_TAG: partition_keys[0],
                    PARTITION_RANGE_END_TAG: partition_keys[-1],
                    "vectorsync/trigger": "demo",
                    DEMO_RUN_TAG: session,
                },
            )
        finally:
            progress.stopped.set()
            progress.join(timeout=30)
    embed_seconds = time.perf_counter() - embed_started
    # The run's totals: its observation of the asset (each partition's materialization carries
    # its own bucket's figures).
    [observation] = result.asset_observations_for_node(key.to_python_identifier())
    totals = {k.removeprefix("run_"): v.value for k, v in observation.metadata.items()}
    written = int(totals["rows_written"])
    print(
        f"embedded through Dagster run {result.run_id[:8]}: {written} rows written, "
        f"{int(totals['chunks_embedded'])} chunks embedded, {int(totals['chunks_reused'])} reused, "
        f"{int(totals['tokens'])} tokens (${float(totals['cost_usd']):.4f}), in {embed_seconds:.1f}s "
        f"({written / embed_seconds:.1f} rows/s)"
    )
    evaluations = sorted(result.get_asset_check_evaluations(), key=lambda e: e.check_name)
    if evaluations:
        print("checks: " + ", ".join(f"{e.check_name} {'passed' if e.passed else 'FAILED'}" for e in evaluations))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def ui_links(port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """Where a first-time user should look, by what they will find there."""
    base = f"http://{host}:{port}"
    asset = f"{base}/assets/embeddings/{DEMO_TABLE}"
    # The global graph draws each group as one closed box; naming the groups in `expanded` (the
    # UI's own query parameter) opens them, so the first view shows the assets and their edge.
    expanded = ",".join(f"global@global:{group}" for group in (SOURCE_GROUP, GROUP))
    return {
        "lineage (postgres source -> embeddings)": f"{base}/asset-groups?expanded={quote(expanded, safe='')}",
        "the embeddings asset (description, metadata plots, column schema)": asset,
        "its 16 partitions (hash buckets) and their status": f"{asset}?view=partitions",
        "its checks (coverage, dead letters)": f"{asset}?view=checks",
        "runs, including the demo's": f"{base}/runs",
        "the change sensor": f"{base}/automation",
    }


def run_demo(queries: Sequence[str], serve: bool = True, port: int = 3000, limit: int | None = None) -> int:
    """Load, install, embed through Dagster, search; then (serve=True) replace this process with
    Dagster's UI and daemon on 127.0.0.1:port. Returns 0, or 1 when the port is taken."""
    started = time.perf_counter()
    if serve and not port_is_free(port):
        print(f"port {port} on 127.0.0.1 is in use: stop what runs there or pass --port", file=sys.stderr)
        return 1
    url = database_url()
    print(f"database: {url}")
    specs = load_declarations(tables_dir())
    spec, origin = next((s, o) for s, o in specs if s.name == DEMO_TABLE)
    with connect(url) as conn:
        changed = load_python_docs(conn, limit=limit)
        rows = conn.execute("SELECT count(*) FROM public.python_docs").fetchone()[0]
        print(f"corpus: {rows} documents of Python's own documentation ({changed} new or changed)")
        install(conn, specs)
        before = table_status(conn, DEMO_TABLE)
    home = prepare_instance(url)
    os.environ["DAGSTER_HOME"] = str(home)
    print(f"dagster instance: {home} (storage on PostgreSQL)")

    if _is_current(before):
        # Nothing is pending and every row is accounted for: a run would only re-hash the corpus.
        # Edits made from now on reach the store through the change sensor once Dagster serves.
        print(f"{DEMO_TABLE} is current ({before.rows_current:,} rows, {before.chunks:,} chunks): "
              "reusing the stored embeddings, no run needed")
    else:
        print(f"embedding {before.source_rows - _accounted(before):,} of {before.source_rows:,} rows "
              "through Dagster (the first run loads the local model and takes a few minutes on a laptop)")
        _embed_through_dagster(url, spec)

    with connect(url) as conn:
        table = resolve(conn, spec, origin)
        provider = provider_for(spec.provider)
        for query in queries:
            print(f"\nsearch: {query!r}")
            for hit in search(conn, table, provider, query, k=3):
                print(f"  {hit.score:.3f}  {hit.row['doc_id']:<32} {hit.row['title'][:60]}")
    print(f"\ndemo ready in {time.perf_counter() - started:.1f}s")
    if not serve:
        return 0
    print(f"\nstarting Dagster (webserver and daemon) on http://127.0.0.1:{port}; the links to open "
          "follow once it answers. Ctrl-C stops it.")
    sys.stdout.flush()
    exec_ui_server(port)
    return 0  # not reached: exec replaces the process


def dagster_dev_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """Stock `dagster dev` (webserver and daemon) for this project's workspace, from this venv."""
    return [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(PROJECT_DIR / "workspace.yaml"),
            "-h", host, "-p", str(port)]


def _default_stop_signals() -> None:
    """In the child, before exec: a shell's background job inherits SIGINT/SIGTERM ignored, and
    Dagster would then ignore its stop signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def exec_ui_server(port: int) -> None:
    """Replace this process (its model, its connections) with a fresh, light interpreter that serves
    the UI: `python -m orchestration.demo serve PORT`, which runs serve_ui."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "orchestration.demo", "serve", str(port)])


def ui_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the webserver answers and its code location has loaded the demo table's asset."""
    request = urllib.request.Request(
        f"http://{host}:{port}/graphql",
        data=json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response).get("data", {}).get("assetNodes") or []
    except (OSError, ValueError):
        return False
    return ["embeddings", DEMO_TABLE] in [n["assetKey"]["path"] for n in nodes]


def _announce_when_ready(port: int, child: subprocess.Popen, timeout: float = 900) -> None:
    """Print where to look once the UI really answers: printed before Dagster's start-up
    logs, the links would have scrolled away by the time they work."""
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        if ui_answers(port):
            lines = [f"\nDagster UI ready on http://127.0.0.1:{port} - open:"]
            lines += [f"  {what}:\n    {link}" for what, link in ui_links(port).items()]
            lines.append(f"Edit a row of public.{DEMO_TABLE} and the change sensor starts a run for its "
                         "bucket within seconds (see Runs). Ctrl-C stops Dagster.\n")
            print("\n".join(lines), flush=True)
            return
        time.sleep(1)


def serve_ui(port: int) -> int:
    """Run Dagster's UI and daemon (stock `dagster dev`) on 127.0.0.1:port until they stop, and return
    the exit status.

    This process stays as the supervisor rather than exec'ing them, because it holds the
    embedded PostgreSQL's handle: the server stops when this process exits normally, after the
    UI. (An exec'd supervisor would leave its pid in the server's handle list, so the server
    would never stop.) It runs in a session of its own and gets exactly one SIGINT, like
    a Ctrl-C in its own terminal, whether this process receives SIGINT (Ctrl-C), SIGTERM or SIGHUP;
    signal handlers, unlike an inherited SIG_IGN, reset on exec, so Dagster can always be
    stopped (see DESIGN.md on `env --default-signal`)."""
    database_url()  # join the embedded server (no-op with DATABASE_URL): its last handle stops it
    env = dict(os.environ)
    # The code server re-imports the definitions: keep notices a user cannot act on out of the
    # server's log (literal message prefixes, so Python need not import dagster to parse them).
    env.setdefault("PYTHONWARNINGS", ",".join((
        "ignore:Parameter `backfill_policy`",
        "ignore:Function `dev_command` is superseded",
        "ignore:XDG_RUNTIME_DIR is not set",
    )))
    child: subprocess.Popen | None = None
    stop_requested = False
    signalled = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stop_requested, signalled
        stop_requested = True
        if child is None or signalled:
            return  # not started yet (handled below), or already shutting down: a second
            # interrupt would cut the webserver's and the daemon's own shutdown short
        signalled = True
        try:
            os.killpg(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    # Handlers before the child starts, so no stop request falls between the two.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    child = subprocess.Popen(dagster_dev_command(port), cwd=PROJECT_DIR, env=env, start_new_session=True,
                             preexec_fn=_default_stop_signals)
    if stop_requested:
        stop(signal.SIGTERM, None)
    threading.Thread(target=_announce_when_ready, args=(port, child), name="announce", daemon=True).start()
    status = child.wait()
    # `dagster dev` may return while its webserver, daemon or code servers are still shutting
    # down: the demo has stopped only once every process it started has.
    finish_process_group(child.pid)
    # Then the embedded server stops with this process, its last live user (see database.py).
    release_dead_handles()
    return status


if __name__ == "__main__":  # `python -m orchestration.demo serve PORT`, exec'd by run_demo
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m orchestration.demo serve PORT")
    sys.exit(serve_ui(int(sys.argv[2])))
