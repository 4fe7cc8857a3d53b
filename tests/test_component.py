"""Tables as Dagster Components: what `dg` sees and checks, hostile identifiers, and one bad
declaration never taking the other tables down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from conftest import unique
from orchestration.definitions import ERROR_GROUP, build_definitions

PROJECT = Path(__file__).resolve().parent.parent
DG = str(Path(sys.executable).parent / "dg")
COMPONENT = "orchestration.components.EmbeddingTable"


def component_file(folder: Path, attributes: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "defs.yaml"
    path.write_text(yaml.safe_dump({"type": COMPONENT, "attributes": attributes}, allow_unicode=True))
    return path


def dg_in(project: Path, *args: str, db_url: str) -> subprocess.CompletedProcess[str]:
    # The copy's own defs folder: Python imports vectorsync from the installed project, whose
    # definitions read the folder VECTORSYNC_TABLES names.
    env = {**os.environ, "DATABASE_URL": db_url, "VECTORSYNC_TABLES": str(project / "orchestration" / "defs")}
    return subprocess.run([DG, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of this dg project whose defs folder holds only what a test declares."""
    copy = tmp_path / "project"
    shutil.copytree(PROJECT, copy, ignore=shutil.ignore_patterns(".venv", ".vectorsync", ".git", "bench", "docs",
                                                                   "tests", "__pycache__", "defs"))
    (copy / "orchestration" / "defs").mkdir()
    return copy


def source_table(conn: psycopg.Connection, table: str = "notes") -> str:
    schema = unique("cmp")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, table)))
    return schema


@pytest.mark.slow
def test_dg_lists_scaffolds_checks_and_lists_the_tables(project: Path, conn: psycopg.Connection, db_url: str) -> None:
    components = dg_in(project, "list", "components", "--json", db_url=db_url)
    assert components.returncode == 0, components.stderr
    assert COMPONENT in components.stdout

    schema = source_table(conn)
    scaffolded = dg_in(project, "scaffold", "defs", COMPONENT, "notes", db_url=db_url)
    assert scaffolded.returncode == 0, scaffolded.stderr
    declaration = project / "orchestration" / "defs" / "notes" / "defs.yaml"
    text = declaration.read_text()
    assert f"type: {COMPONENT}" in text and "name: notes" in text
    # The scaffold names public.notes; point it at this test's table and check it as it stands.
    declaration.write_text(text.replace("source: public.notes", f"source: {schema}.notes"))
    checked = dg_in(project, "check", "defs", db_url=db_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    listed = dg_in(project, "list", "defs", "--json", db_url=db_url)
    assert listed.returncode == 0, listed.stderr
    for name in ("embeddings/notes", f"postgres/{schema}/notes", "notes_changes", "notes_reconcile",
                 "notes_retry_failures", "notes_index_upkeep", "notes_vector_index", "coverage",
                 "vectorsync_tables", "vectorsync_run_failures"):
        assert name in listed.stdout, name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attributes", "where", "message"),
    [
        ({"columns": ["body"], "provider": {"dimensions": 512}}, "provider", "384 dimensions"),
        ({"columns": ["body"], "bukets": 4}, "bukets", ""),
        ({"columns": ["nope"]}, "columns", "no column 'nope'"),
        ({"columns": ["body"], "source_table_is_missing": True}, "source", "does not exist"),
    ],
    ids=["dimension-mismatch", "unknown-field", "unknown-column", "unknown-table"],
)
def test_dg_check_defs_names_the_file_and_field_of_a_bad_declaration(
    project: Path, conn: psycopg.Connection, db_url: str, attributes: dict, where: str, message: str
) -> None:
    schema = source_table(conn)
    missing = attributes.pop("source_table_is_missing", False)
    source = f"{schema}.{'gone' if missing else 'notes'}"
    path = component_file(project / "orchestration" / "defs" / "bad", {"name": "bad", "source": source, **attributes})
    checked = dg_in(project, "check", "defs", db_url=db_url)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert str(path.relative_to(project)) in output or str(path) in output, output
    assert where in output and message in output, output


HOSTILE = ["Order Items", "café", "order$s", 'say "hi"', "a.b", "ünïcödé_" + "x" * 50]


def test_any_postgresql_identifier_loads_and_one_bad_table_never_takes_the_others_down(
    tmp_path: Path, conn: psycopg.Connection
) -> None:
    schemas = []
    for i, table in enumerate(HOSTILE):
        schema = f"{unique('sch')} {table[:10]}"  # a schema name with a space and more
        schemas.append(schema)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, table)))
        component_file(tmp_path / f"t{i}", {"name": f"hostile_{i}", "source": {"schema": schema, "table": table},
                                            "columns": ["body"], "buckets": 2})
    # A declaration that cannot be loaded, beside them.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "defs.yaml").write_text(f"type: {COMPONENT}\nattributes:\n  name: [not, a, name]\n")

    repo = build_definitions(tmp_path).get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    for i in range(len(HOSTILE)):
        assert f"embeddings/hostile_{i}" in keys
        assert repo.has_job(f"hostile_{i}_changes")
        assert repo.has_schedule_def(f"hostile_{i}_reconcile")
    # One tables sensor for every declaration file, starting each table's change runs.
    assert sorted(s.name for s in repo.sensor_defs) == ["vectorsync_run_failures", "vectorsync_tables"]
    targets = {t.job_name for t in repo.get_sensor_def("vectorsync_tables").targets}
    assert targets == {f"hostile_{i}_changes" for i in range(len(HOSTILE))}
    sources = [k for k in repo.asset_graph.get_all_asset_keys() if k.path[0] == "postgres"]
    assert len(sources) == len(HOSTILE), sources  # every identifier its own key: no collisions
    assert all(part.replace("_", "").isalnum() and part.isascii() for k in sources for part in k.path)
    # The real identifier stays visible in the UI.
    spec = repo.assets_defs_by_key[dg.AssetKey(["embeddings", "hostile_0"])].specs_by_key
    assert spec
    errors = [k for k in keys if k.startswith(ERROR_GROUP)]
    assert len(errors) == 1 and "broken" in errors[0]
    # Stable across reloads: the same declarations give the same keys.
    again = {k.to_user_string() for k in build_definitions(tmp_path).get_repository_def().asset_graph.get_all_asset_keys()}
    assert again == keys


def test_the_asset_block_sets_key_prefix_group_owners_tags_and_kinds(tmp_path: Path, conn: psycopg.Connection) -> None:
    schema = source_table(conn)
    component_file(tmp_path / "notes", {
        "name": "notes", "source": f"{schema}.notes", "columns": ["body"],
        "asset": {"key_prefix": ["search", "vectors"], "group_name": "search", "owners": ["team:search"],
                  "tags": {"domain": "docs"}, "kinds": ["openai_compatible"]},
    })
    repo = build_definitions(tmp_path).get_repository_def()
    key = dg.AssetKey(["search", "vectors", "notes"])
    spec = repo.assets_defs_by_key[key].specs_by_key[key]
    assert spec.group_name == "search"
    assert spec.owners == ["team:search"]
    assert spec.tags.get("domain") == "docs"
    assert {"openai_compatible", "pgvector"} <= set(spec.kinds)
