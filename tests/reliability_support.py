"""Helpers for the reliability, failure-ledger and security tests: source tables of generated
text, declarations that embed through the OpenAI-compatible test server, and an audit that
recomputes from the source what the store must hold and lists every way it does not."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from openai_server import vector_for
from psycopg import sql

from assets.catalog import ResolvedTable
from assets.providers.base import EmbeddingProvider
from assets.spec import TableSpec, parse_spec
from assets.status import change_backlog
from assets.text import chunk, fit_to_token_limit, render, text_hash

from conftest import unique

WORDS = (
    "vector", "postgres", "trigger", "bucket", "embedding", "chunk", "model", "provider", "retry",
    "ledger", "backfill", "sensor", "schedule", "index", "cosine", "partition", "dagster", "asset",
    "lineage", "failure", "commit", "rollback", "snapshot", "lock", "advisory", "notify", "listen",
    "sweep", "hash", "token", "batch", "window", "overlap", "quorum", "replica", "vacuum",
)
DIMENSIONS = 8


def sentence_text(rng: random.Random, low: int = 40, high: int = 600) -> str:
    """A paragraph of sentences between `low` and `high` characters: with 200-character chunks a
    row has one to four chunks, so rewrites change how many chunks a row has."""
    target = rng.randint(low, high)
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < target:
        words = rng.choices(WORDS, k=rng.randint(4, 12))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def create_source(conn: psycopg.Connection, rows: int, seed: int, table: str = "docs") -> tuple[str, str]:
    """A fresh schema with `table` (id int primary key, title, body, views) holding `rows` rows;
    returns (schema, table)."""
    schema = unique("rel")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, table)
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, title text, body text, views int DEFAULT 0)")
                 .format(source))
    rng = random.Random(seed)
    with conn.cursor().copy(sql.SQL("COPY {} (id, title, body) FROM STDIN").format(source)) as copy:
        for i in range(1, rows + 1):
            copy.write_row((i, f"doc {i}", sentence_text(rng)))
    return schema, table


def openai_spec(source: tuple[str, str], base_url: str, **fields: Any) -> TableSpec:
    """A declaration of `source` (schema, table) embedded by the OpenAI-compatible test server at `base_url`."""
    provider = {
        "kind": "openai", "model": "test-embed", "dimensions": DIMENSIONS, "base_url": base_url,
        "api_key_env": "VECTORSYNC_TEST_UNSET_KEY", "batch_size": 32, "max_concurrency": 2,
        "timeout_seconds": 5, "max_retries": 0,
    }
    provider.update(fields.pop("provider", {}))
    schema, table = source
    data = {
        "name": unique("rel"), "source": {"schema": schema, "table": table},
        "template": "{title}\n{body}", "chunking": {"size": 200, "overlap": 20},
        "buckets": 4, "page_size": 100, "provider": provider, **fields,
    }
    return parse_spec(data, "reliability-test")


@dataclass
class Audit:
    """What the store holds against what the source says it must hold."""

    source_rows: int
    stored_rows: int
    chunks: int
    pending_changes: int
    # (key, stored hashes, expected hashes) of rows whose stored chunks are not their current text's
    stale: list[tuple[Any, ...]] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)  # rows with content and no chunk
    orphans: list[Any] = field(default_factory=list)  # stored keys with no source row
    wrong_model: list[Any] = field(default_factory=list)
    wrong_vectors: list[tuple[Any, int]] = field(default_factory=list)  # (key, chunk_seq)
    unrecorded_skips: list[Any] = field(default_factory=list)  # empty rows not in the ledger as skipped
    ledger: list[tuple[Any, str, str]] = field(default_factory=list)  # (key, kind, error), not skips

    def problems(self) -> dict[str, Any]:
        """Every non-empty finding, capped so an assertion message stays readable."""
        found = {
            "stale": self.stale, "missing": self.missing, "orphans": self.orphans,
            "wrong_model": self.wrong_model, "wrong_vectors": self.wrong_vectors,
            "unrecorded_skips": self.unrecorded_skips, "ledger": self.ledger,
        }
        result: dict[str, Any] = {k: (len(v), v[:5]) for k, v in found.items() if v}
        if self.pending_changes:
            result["pending_changes"] = self.pending_changes
        return result


def audit(conn: psycopg.Connection, table: ResolvedTable, provider: EmbeddingProvider,
          check_vectors: bool = True) -> Audit:
    """Recompute every row's chunks from the source exactly as the engine does (render, chunk,
    split to the token limit, sha256) and compare with the store, chunk by chunk, in order. With
    `check_vectors`, each stored vector must be the test server's vector of its stored chunk."""
    spec = table.spec
    names = [c.name for c in table.text_columns]
    source_rows = conn.execute(
        sql.SQL("SELECT {}, {} FROM {} s").format(
            table.key_json("s"), sql.SQL(", ").join(sql.Identifier("s", n) for n in names), table.source)
    ).fetchall()
    expected: dict[str, list[bytes]] = {}
    empty: set[str] = set()
    for key, *values in source_rows:
        row = dict(zip(names, values))
        text = render(spec.template_parts, row)
        k = json.dumps(key)
        if not text.strip() or all(v is None or not str(v).strip() for v in values):
            empty.add(k)
            continue
        pieces = fit_to_token_limit(chunk(text, spec.chunking), provider.count_tokens,
                                    provider.max_tokens_per_input)
        expected[k] = [text_hash(p) for p in pieces]

    stored: dict[str, list[tuple[int, bytes, str, str, str]]] = {}
    for key, seq, digest, model, chunk_text, vector in conn.execute(
        sql.SQL("SELECT {}, chunk_seq, text_hash, model, chunk, embedding::text FROM {} ORDER BY {}, chunk_seq")
        .format(table.key_json(), table.store, table.key_list())
    ):
        stored.setdefault(json.dumps(key), []).append((seq, bytes(digest), model, chunk_text, vector))

    pending = change_backlog(conn, table.queue)[0]
    ledger_rows = conn.execute(
        "SELECT row_key, error_kind, last_error FROM vectorsync.failures WHERE table_name = %s ORDER BY row_key",
        (spec.name,),
    ).fetchall()
    skips = {json.dumps(k) for k, kind, _ in ledger_rows if kind == "skipped"}
    result = Audit(
        source_rows=len(source_rows), stored_rows=len(stored),
        chunks=sum(len(v) for v in stored.values()), pending_changes=pending,
        ledger=[(k, kind, err) for k, kind, err in ledger_rows if kind != "skipped"],
        unrecorded_skips=sorted(empty - skips),
    )
    for k, hashes in expected.items():
        have = stored.get(k)
        if have is None:
            result.missing.append(k)
        elif [(seq, digest) for seq, digest, *_ in have] != list(enumerate(hashes)):
            result.stale.append((k, [d.hex()[:8] for _, d, *_ in have], [h.hex()[:8] for h in hashes]))
    for k, chunks in stored.items():
        if k not in expected:
            # A row that exists with no content must have no chunk either: both are orphans here.
            result.orphans.append(k)
            continue
        if any(model != spec.fingerprint for _, _, model, _, _ in chunks):
            result.wrong_model.append(k)
        if check_vectors:
            for seq, digest, _, chunk_text, vector in chunks:
                want = vector_for(chunk_text, spec.provider.dimensions)
                if text_hash(chunk_text) != digest or not np.allclose(json.loads(vector), want, atol=1e-6):
                    result.wrong_vectors.append((k, seq))
    return result
