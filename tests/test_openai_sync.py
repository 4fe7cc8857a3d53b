"""Syncing through an OpenAI-compatible provider: exact token counts fill requests, and the CLI
keeps the provider's concurrency busy across buckets without importing Dagster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import TableFixture, unique
from openai_server import OpenAIServer
from psycopg import sql

from assets.providers import openai_compatible
from assets.providers.openai_compatible import OpenAICompatibleProvider, count_bytes, token_counter
from assets.spec import parse_spec

PROJECT = Path(__file__).resolve().parent.parent
KEY_ENV = "VECTORSYNC_TEST_NO_KEY"


def test_openai_models_are_counted_with_cl100k_base_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("counting tokens must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")  # no cached download to fall back on
    openai_compatible._encoding.cache_clear()
    for model in ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002",
                  "openai/text-embedding-3-small"):
        count = token_counter(model)
        # Reference counts of cl100k_base (OpenAI's tokenizer for these models).
        assert count(["hello world", "tiktoken is great!", "", "<|endoftext|>"]) == [2, 6, 0, 7]
    english = "The quick brown fox jumps over the lazy dog. " * 11
    assert token_counter("text-embedding-3-small")([english])[0] * 4 < len(english)
    # Any other model behind a compatible server: the byte count, which never undercounts.
    assert token_counter("nomic-embed-text") is count_bytes


def _rows_of_about_500_chars(conn: psycopg.Connection, source: sql.Composable, n: int) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} SELECT i, left(repeat('Row ' || i || ' describes a change in the catalogue, "
            "and the embedding follows it. ', 12), 500) FROM generate_series(1, %s) i"
        ).format(source),
        (n,),
    )


@pytest.mark.parametrize("counting", ["exact", "bytes"])
def test_exact_counts_put_four_times_the_inputs_in_a_request(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, counting: str
) -> None:
    """20,000 rows of about 500 characters: about 110 tokens each, so a request is bounded by
    2048 inputs, not by the 300k-token limit as it is when bytes stand in for tokens."""
    schema = unique("tok")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "docs")))
    with OpenAIServer(dimensions=8) as server:
        spec = parse_spec({
            "name": unique("tok"), "source": {"schema": schema, "table": "docs"}, "columns": ["body"],
            "template": "{body}", "buckets": 4, "page_size": 2000,
            "provider": {"kind": "openai", "model": "text-embedding-3-small", "dimensions": 8,
                         "base_url": server.base_url, "api_key_env": KEY_ENV, "batch_size": 2048},
        }, "test")
        provider = OpenAICompatibleProvider(spec.provider)
        if counting == "bytes":
            monkeypatch.setattr(provider, "_count", count_bytes)
        table = TableFixture(conn, provider, spec)
        _rows_of_about_500_chars(conn, table.table.source, 20_000)
        try:
            stats = table.engine.sync_buckets(range(spec.buckets), full=True)
        finally:
            table.engine.close()
            provider.close()
        requests = [r for r in server.requests if r.inputs]
    assert sum(s.rows_written for s in stats.values()) == 20_000
    assert sum(len(r.inputs) for r in requests) == 20_000
    exact = token_counter("text-embedding-3-small")
    assert all(sum(exact(r.inputs)) <= 300_000 for r in requests)
    print(f"{counting}: {len(requests)} requests for 20,000 rows")
    if counting == "exact":
        assert len(requests) <= 14  # ceil(20,000 / 2048) = 10, plus the tails of pages written early
    else:
        assert len(requests) >= 34  # 300k bytes hold about 600 rows of 500 characters


def test_cli_syncs_all_buckets_concurrently_and_never_imports_dagster(
    tmp_path: Path, db_url: str, conn: psycopg.Connection
) -> None:
    schema = unique("cli")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(schema, "notes")))
    # 16 buckets of about 40 rows: each bucket fills less than one request of 64, so only a pass
    # over all buckets at once can keep 4 requests in flight.
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'note number ' || i FROM generate_series(1, 640) i")
                 .format(sql.Identifier(schema, "notes")))
    name = unique("notes")
    tables = tmp_path / "tables"
    tables.mkdir()
    env = {**os.environ, "DATABASE_URL": db_url}
    env.pop(KEY_ENV, None)
    with OpenAIServer(dimensions=8, latency=0.2) as server:
        (tables / "notes.yaml").write_text(
            f"name: {name}\nsource: {schema}.notes\ncolumns: [body]\nbuckets: 16\n"
            f"provider: {{kind: openai, model: text-embedding-3-small, dimensions: 8, base_url: '{server.base_url}', "
            f"api_key_env: {KEY_ENV}, batch_size: 64, max_concurrency: 4}}\n"
        )

        def run(*args: str) -> str:
            # The CLI's commands must start without Dagster's ~2.5 s of imports.
            code = ("import sys\nfrom orchestration.cli import main\n"
                    f"rc = main({['--tables', str(tables), *args]!r})\n"
                    "assert 'dagster' not in sys.modules, 'dagster was imported'\nsys.exit(rc)\n")
            done = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert name in run("install")
        out = run("sync", name, "--full")
        assert "rows_written=640" in out
        assert server.max_in_flight == 4
        line = next(row for row in run("status").splitlines() if row.startswith(name))
        assert line.split()[2:6] == ["640", "640", "640", "640"]
        assert "note number" in run("search", name, "note number 7", "-k", "1")


def test_a_long_english_text_is_split_only_past_8191_real_tokens() -> None:
    """About 4,500 tokens in 20,000 characters: one input for OpenAI's models, where bytes made it
    three."""
    from assets.text import fit_to_token_limit

    text = "The embedding follows the row, and the row follows the user's edits. " * 290
    exact = token_counter("text-embedding-3-small")
    assert 4000 < exact([text])[0] < 8191 < len(text.encode("utf-8"))
    assert fit_to_token_limit([text], exact, 8191) == [text]
    pieces = fit_to_token_limit([text], count_bytes, 8191)
    assert len(pieces) == 3 and "".join(pieces) == text
