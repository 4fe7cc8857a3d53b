"""The cost of a fill, estimated before it starts (assets/estimate.py): the chunks and tokens it
predicts are the ones a real sync then sends to the OpenAI-compatible test server, reuse of stored
vectors is counted by text and model, and `vectorsync estimate` reports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import TableFixture, unique
from openai_server import OpenAIServer
from psycopg import sql

from assets.catalog import resolve
from assets.estimate import estimate_fill, reuse_prefix
from assets.install import install
from assets.providers.openai_compatible import OpenAICompatibleProvider, token_counter
from assets.spec import parse_spec

PROJECT = Path(__file__).resolve().parent.parent
KEY_ENV = "VECTORSYNC_TEST_NO_KEY"
WORDS = ("catalogue", "embedding", "ledger", "bucket", "sweep", "vector", "postgres", "dagster", "row", "key")


def _schema_with_docs(conn: psycopg.Connection) -> str:
    """A source whose rows cover every case a fill meets: short rows (one chunk), long rows
    (several chunks), rows sharing a text (sent once), a row with no content (skipped), a row the
    template cannot render (ledger), and one row over OpenAI's 8,191-token input limit (split)."""
    schema = unique("est")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "docs")
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, title text, body text, score text)").format(source))
    rows: list[tuple[Any, ...]] = []
    for i in range(1, 121):
        words = " ".join(WORDS[(i * j) % len(WORDS)] for j in range(3 + (i % 7) * 25))
        rows.append((i, f"Doc {i}", f"{words}. Row {i}.", None))
    # Row 203's score is text where the template formats a number ({score:d}): unrenderable.
    rows += [(200, "Same", "A text two rows share.", None), (201, "Same", "A text two rows share.", None),
             (202, None, None, None), (203, "Bad", "Its score is no number.", "many"),
             (204, "Huge", " ".join(f"w{n} {WORDS[n % 10]}" for n in range(9000)), None)]
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(source), rows)
    return schema


def _spec(schema: str, server: OpenAIServer, name: str, **fields: Any) -> Any:
    return parse_spec({
        "name": name, "source": {"schema": schema, "table": "docs"}, "buckets": 4,
        "template": "# {title}\n\n{body}{score:d}", "chunking": {"size": 300, "overlap": 30},
        "provider": {"kind": "openai", "model": "text-embedding-3-small", "dimensions": 8,
                     "base_url": server.base_url, "api_key_env": KEY_ENV, "batch_size": 64},
        **fields,
    }, "test")


def _fill(conn: psycopg.Connection, spec: Any) -> tuple[TableFixture, Any]:
    provider = OpenAICompatibleProvider(spec.provider)
    table = TableFixture(conn, provider, spec)
    try:
        stats = table.engine.sync_buckets(range(spec.buckets), full=True)
    finally:
        table.engine.close()
        provider.close()
    return table, stats


def _sent(server: OpenAIServer, since: int = 0) -> list[str]:
    return [text for r in server.requests[since:] for text in r.inputs]


@pytest.mark.parametrize("chunking", [{"size": 300, "overlap": 30}, None], ids=["chunked", "whole-rows"])
def test_the_estimate_is_what_a_sync_then_sends(conn: psycopg.Connection, chunking: dict | None) -> None:
    schema = _schema_with_docs(conn)
    with OpenAIServer(dimensions=8) as server:
        spec = _spec(schema, server, unique("est"), chunking=chunking)
        install(conn, [(spec, "test")])
        table = resolve(conn, spec, "test")
        estimate = estimate_fill(conn, table)
        assert not server.requests  # counting tokens sends nothing
        _, stats = _fill(conn, spec)
        sent = _sent(server)
    written = sum(s.chunks_written for s in stats.values())
    assert estimate.rows == 125 == sum(s.rows_seen for s in stats.values())
    assert estimate.rows_empty == 1 == sum(s.rows_skipped for s in stats.values())
    assert estimate.rows_unrenderable == 1 == sum(s.rows_failed for s in stats.values())
    # Long rows make several chunks; unchunked, the row of ~35,000 tokens is split to fit 8,191.
    assert estimate.chunks == written > 123
    assert estimate.chunks_to_send == len(sent) == len(set(sent))
    assert estimate.chunks_reused == written - len(sent) >= 1  # the two rows sharing one text
    assert estimate.tokens == sum(token_counter("text-embedding-3-small")(sent))
    assert estimate.price_per_million == 0.02
    assert estimate.usd == pytest.approx(estimate.tokens * 0.02 / 1_000_000)
    assert estimate.usd_batch == pytest.approx(estimate.usd / 2)
    # Streamed in small pages, the count is the same.
    small = estimate_fill(conn, table, page_size=7)
    assert small.as_dict() | {"seconds": 0} == estimate.as_dict() | {"seconds": 0}


def test_reuse_is_counted_by_text_and_provider_model(conn: psycopg.Connection) -> None:
    """A new chunking keeps the short rows' texts: they are reused from the old store, and what is
    left is exactly what a fill of the new version sends that the old one had not sent. A store of
    another model or dimension reuses nothing."""
    schema = _schema_with_docs(conn)
    with OpenAIServer(dimensions=8) as server:
        old_spec = _spec(schema, server, unique("old"))
        old, _ = _fill(conn, old_spec)
        old_texts = set(_sent(server))
        old_store = old.table.with_parameters().store

        # The table's own store, as stored: nothing left to send.
        again = estimate_fill(conn, old.table, [old_store])
        assert (again.chunks_to_send, again.tokens, again.chunks_reused) == (0, 0, again.chunks)

        new_spec = _spec(schema, server, unique("new"), chunking={"size": 500, "overlap": 30})
        assert reuse_prefix(new_spec) == reuse_prefix(old_spec) != new_spec.fingerprint
        install(conn, [(new_spec, "test")])
        new_table = resolve(conn, new_spec, "test")
        estimate = estimate_fill(conn, new_table, [old_store])
        before = len(server.requests)
        _fill(conn, new_spec)
        new_texts = _sent(server, before)
    unseen = [t for t in new_texts if t not in old_texts]
    assert 0 < len(unseen) < len(new_texts)
    assert estimate.chunks_to_send == len(unseen)
    assert estimate.tokens == sum(token_counter("text-embedding-3-small")(unseen))
    assert estimate.chunks_reused == estimate.chunks - len(unseen)

    other = parse_spec({**new_spec.model_dump(mode="json", by_alias=True), "name": unique("dims"),
                        "provider": {**new_spec.provider.model_dump(), "dimensions": 16}}, "test")
    install(conn, [(other, "test")])
    across = estimate_fill(conn, resolve(conn, other, "test"), [old_store])
    assert across.chunks_to_send == len(set(new_texts))  # only the fill's own repeated text is spared


def test_a_change_in_place_is_estimated_as_todays_engine_sends_it(conn: psycopg.Connection) -> None:
    """Today's engine looks its cache up by the whole fingerprint: a chunking changed in place
    re-sends every chunk, and reuse_by="fingerprint" says so; reuse_by="model" is what a version
    filled beside the old one, reusing by model, would send."""
    schema = _schema_with_docs(conn)
    with OpenAIServer(dimensions=8) as server:
        spec = _spec(schema, server, unique("inplace"))
        old, _ = _fill(conn, spec)
        store = old.table.with_parameters().store
        changed = parse_spec({**spec.model_dump(mode="json", by_alias=True), "chunking": {"size": 500, "overlap": 30}},
                             "test")
        table = resolve(conn, changed, "test")
        by_fingerprint = estimate_fill(conn, table, [store], reuse_by="fingerprint")
        by_model = estimate_fill(conn, table, [store])
        before = len(server.requests)
        _fill(conn, changed)  # installs the new chunking over the same store, then a full sync
        sent = _sent(server, before)
    assert by_fingerprint.chunks_to_send == len(sent) == len(set(sent))
    assert by_fingerprint.tokens == sum(token_counter("text-embedding-3-small")(sent))
    assert by_model.chunks_to_send < by_fingerprint.chunks_to_send


def test_cli_estimate(tmp_path: Path, db_url: str, conn: psycopg.Connection) -> None:
    schema = _schema_with_docs(conn)
    tables = tmp_path / "tables"
    tables.mkdir()
    name, uninstalled = unique("cli"), unique("cli")
    env = {**os.environ, "DATABASE_URL": db_url}
    env.pop(KEY_ENV, None)  # no key: an estimate needs none
    with OpenAIServer(dimensions=8) as server:
        spec = _spec(schema, server, name)
        for n in (name, uninstalled):
            data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True) | {"name": n}
            (tables / f"{n}.yaml").write_text(_yaml(data))
        install(conn, [(spec, "test")])
        expected = estimate_fill(conn, resolve(conn, spec, "test"), [resolve(conn, spec, "test").with_parameters().store])

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "orchestration.cli", "--tables", str(tables), *args],
                                  env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)

        done = run("estimate", name)
        assert done.returncode == 0, done.stderr
        assert not server.requests
        figures = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
        assert int(figures["rows"].split()[0].replace(",", "")) == expected.rows
        assert int(figures["chunks to send"].replace(",", "")) == expected.chunks_to_send
        assert int(figures["tokens"].replace(",", "")) == expected.tokens
        for missing in ("no_such_table", uninstalled):
            done = run("estimate", missing)
            assert done.returncode == 2
            assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
            assert missing in done.stderr


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data)


def test_the_local_model_estimate(conn: psycopg.Connection, make_table, recording) -> None:
    """With the local model: its tokenizer counts, and a store that holds every text leaves
    nothing to send (no empty batch reaches the tokenizer)."""
    t = make_table("id int PRIMARY KEY, body text", columns=["body"], chunking={"size": 120, "overlap": 20})
    conn.execute(sql.SQL("INSERT INTO {} SELECT i, repeat('Sentence ' || i || ' of the catalogue. ', 1 + i % 9) "
                         "FROM generate_series(1, 60) i").format(t.table.source))
    estimate = estimate_fill(conn, t.table, provider=recording)
    t.sync()
    assert estimate.chunks_to_send == len(recording.inputs) == len(set(recording.inputs))
    assert estimate.tokens == sum(recording.count_tokens(recording.inputs))
    assert estimate.usd == 0.0  # a local model costs nothing
    again = estimate_fill(conn, t.table, [t.table.with_parameters().store])  # its own counter, loaded here
    assert (again.chunks_to_send, again.tokens, again.chunks) == (0, 0, estimate.chunks)
