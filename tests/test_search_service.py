"""The warm search service (`vectorsync serve`): started as a user starts it, queried over real HTTP,
and used by the CLI and by Python search without loading the model in their own process."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from assets.catalog import resolve
from assets.engine import EmbeddingEngine
from assets.install import install
from assets.search import hybrid_search, search
from assets.search_client import STATE_FILE, SearchClient
from assets.declarations import load_declarations

from conftest import unique
from test_search import CORPUS, FUNCS

PROJECT = Path(__file__).resolve().parent.parent


class Service:
    def __init__(self, home: Path, tables: Path, name: str, table, proc: subprocess.Popen, url: str) -> None:
        self.home, self.tables, self.name, self.table, self.proc, self.url = home, tables, name, table, proc, url

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, db_url: str, local_provider) -> Iterator[Service]:
    """One declared, embedded table and `vectorsync serve` over it, on a free port of 127.0.0.1."""
    home = tmp_path_factory.mktemp("serve-home")
    tables = home / "tables"
    tables.mkdir()
    schema, name = unique("svc"), unique("api")
    (tables / "api.yaml").write_text(f"name: {name}\nsource: {schema}.api\ntemplate: '{{name}}: {{body}}'\nbuckets: 2\n")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        source = sql.Identifier(schema, "api")
        conn.execute(sql.SQL("CREATE TABLE {} (" + FUNCS + ")").format(source))
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} (id, kind, name, body, added) VALUES "
                                    "(%s, %s, %s, %s, DATE '2024-01-01' + %s)").format(source),
                            [(*row, row[0]) for row in CORPUS])
        specs = load_declarations(tables)
        install(conn, specs)
        table = resolve(conn, *specs[0])
        engine = EmbeddingEngine(conn, table, local_provider)
        for bucket in range(2):
            engine.sync_bucket(bucket, full=True)
        engine.close()
    env = {**os.environ, "DATABASE_URL": db_url, "VECTORSYNC_HOME": str(home), "VECTORSYNC_TABLES": str(tables)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--port", "0"], env=env,
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = home / STATE_FILE
    deadline = time.monotonic() + 180
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    announced = json.loads(state.read_text())
    assert announced["url"].startswith("http://127.0.0.1:") and announced["pid"] == proc.pid
    try:
        yield Service(home, tables, name, table, proc, announced["url"])
    finally:
        proc.terminate()  # by PID; uvicorn stops on SIGTERM
        proc.wait(timeout=30)
    assert not state.exists(), "a stopped service must withdraw its address"


def test_service_answers_vector_and_hybrid_search_with_filters_and_k(service, conn, local_provider) -> None:
    q = "checksum of data"
    status, answer = service.post("/search", {"table": service.name, "query": q, "k": 3})
    assert status == 200 and len(answer["hits"]) == 3
    local = search(conn, service.table, local_provider, q, k=3)
    assert [tuple(h["key"]) for h in answer["hits"]] == [h.key for h in local]
    assert [h["score"] for h in answer["hits"]] == pytest.approx([h.score for h in local], abs=1e-6)
    assert all(h["text_rank"] is None for h in answer["hits"])
    assert answer["ms"]["embed"] > 0 and answer["ms"]["sql"] > 0

    q = "data streams"  # every word in two of the classes: the full-text side ranks them
    body = {"table": service.name, "query": q, "k": 12, "hybrid": True, "where": {"kind": ["class", "constant"]}}
    status, answer = service.post("/search", body)
    local = hybrid_search(conn, service.table, local_provider, q, k=12, where={"kind": ["class", "constant"]})
    assert status == 200 and [tuple(h["key"]) for h in answer["hits"]] == [h.key for h in local]
    assert sorted(h["key"][0] for h in answer["hits"]) == [5, 6, 8, 10]
    assert {h["row"]["kind"] for h in answer["hits"]} == {"class", "constant"}
    assert {h["key"][0] for h in answer["hits"] if h["text_rank"]} == {5, 6}
    assert answer["hits"][0]["row"]["added"].startswith("2024-01-")  # dates travel as ISO text
    # fusion parameters reach the function: with no weight on full text, hybrid is the vector order
    status, answer = service.post("/search", {**body, "text_weight": 0, "where": {}})
    assert [tuple(h["key"]) for h in answer["hits"]] == [h.key for h in search(conn, service.table, local_provider, q, k=12)]


def test_service_refuses_by_name_and_status(service, local_provider) -> None:
    status, answer = service.post("/search", {"table": service.name, "query": "x", "where": {"nope": 1}})
    assert status == 400 and answer["field"] == "where.nope" and service.name in answer["error"]
    status, answer = service.post("/search", {"table": service.name, "query": "x", "k": 0})
    assert status == 400 and answer["field"] == "k"
    status, answer = service.post("/search", {"table": service.name, "query": "x", "k": True})
    assert status == 400 and answer["field"] == "k"
    status, answer = service.post("/search", {"table": service.name})
    assert status == 400 and answer["field"] == "query"
    assert service.post("/search", {"table": "not_declared", "query": "x"})[0] == 404
    # Another declaration of the table (another model or template): the caller must embed itself.
    assert service.post("/embed", {"table": service.name, "query": "x", "fingerprint": "other/model"})[0] == 409
    status, answer = service.post("/embed", {"table": service.name, "query": "x"})
    assert status == 200 and len(answer["vector"]) == 384
    # The service's own forward pass gives the provider's vector (and is the one in use).
    assert answer["vector"] == pytest.approx(local_provider.embed(["x"]).vectors[0].tolist(), abs=1e-5)
    host, port = service.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    assert health["query_embedding"] == {service.name: "direct"} and health["pid"] == service.proc.pid


PROBE = """
import sys, time
started = time.perf_counter()
from orchestration.cli import main
code = main(sys.argv[1:])
print("MODULES", "torch" in sys.modules, "sentence_transformers" in sys.modules, flush=True)
print("SECONDS", time.perf_counter() - started)
sys.exit(code)
"""


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=PROJECT, capture_output=True,
                          text=True, timeout=300)


def _keys(out: str) -> list[int]:
    return [int(line.split("[", 1)[1].split("]", 1)[0]) for line in out.splitlines() if "] " in line]


def test_cli_search_uses_the_running_service_without_loading_the_model(service, db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": db_url, "VECTORSYNC_HOME": str(service.home),
           "VECTORSYNC_TABLES": str(service.tables)}
    env.pop("VECTORSYNC_SEARCH_URL", None)
    args = ("search", service.name, "compress data", "--hybrid", "--where", "kind=class", "-k", "10")
    warm = _cli(env, *args)
    assert warm.returncode == 0, warm.stderr
    assert "MODULES False False" in warm.stdout, "the CLI loaded the model although the service runs"
    assert sorted(_keys(warm.stdout)) == [5, 6, 10]
    # The same command where no service is announced loads the model itself, and answers the same:
    # so the probe above would have seen a model load.
    cold = _cli({**env, "VECTORSYNC_HOME": str(service.home / "elsewhere")}, *args)
    assert cold.returncode == 0, cold.stderr
    assert "MODULES True True" in cold.stdout
    assert _keys(cold.stdout) == _keys(warm.stdout)
    # A bad filter is reported by name through the service too, with the CLI's exit status.
    bad = _cli(env, "search", service.name, "x", "--where", "nope=1")
    assert bad.returncode == 2 and "where.nope" in bad.stderr and service.name in bad.stderr
    # An address left by a service that died (its PID is gone) is ignored.
    stale = service.home / "stale"
    stale.mkdir()
    (stale / STATE_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": 2**22 + 1, "database": "embedded"}))
    fallback = _cli({**env, "VECTORSYNC_HOME": str(stale)}, "search", service.name, "compress data", "-k", "2")
    assert fallback.returncode == 0 and "MODULES True True" in fallback.stdout


def test_python_search_without_a_provider_embeds_through_the_service(service, db_url: str) -> None:
    script = f"""
import sys
from pathlib import Path
from assets.catalog import resolve
from assets.search import hybrid_search, search
from assets.declarations import load_declarations
from orchestration.database import connect
spec, origin = load_declarations(Path({str(service.tables)!r}))[0]
with connect() as conn:
    table = resolve(conn, spec, origin)
    hits = hybrid_search(conn, table, None, "legacy archives", k=3, where={{"kind": "function"}})
    print("KEYS", [h.key[0] for h in hits], type(hits[0].row["added"]).__name__)
print("MODULES", "torch" in sys.modules)
"""
    env = {**os.environ, "DATABASE_URL": db_url, "VECTORSYNC_SEARCH_URL": service.url}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "MODULES False" in done.stdout
    # rows come from this process's own query, with their column types
    assert "KEYS [12, " in done.stdout and " date" in done.stdout


def test_a_service_that_never_answers_is_given_up_on(caplog: pytest.LogCaptureFixture) -> None:
    """A service that accepts connections and never answers (stopped with SIGSTOP, swapping):
    the client gives up after its timeout, says so, and the caller searches without it."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)  # the kernel completes the connection; nobody ever reads or answers
        url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        client = SearchClient(url, timeout=0.5)
        caplog.set_level(logging.WARNING, logger="assets.search_client")
        started = time.monotonic()
        assert client.search("notes", None, "anything", k=3) is None
        assert client.embed("notes", None, "anything") is None
        assert time.monotonic() - started < 5.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all(f"search service at {url} did not answer within" in w for w in warnings)
