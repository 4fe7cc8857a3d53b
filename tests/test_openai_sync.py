"""Syncing through an OpenAI-compatible provider: exact token counts fill requests."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest
from conftest import TableFixture, unique
from openai_server import OpenAIServer
from psycopg import sql

from assets.providers import openai_compatible
from assets.providers.openai_compatible import OpenAICompatibleProvider, count_bytes, token_counter
from assets.spec import ProviderSpec, parse_spec

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
