"""The search benchmark's table: Python's documentation, embedded for real with the local model, padded
to the benchmark's row count with filler rows, then indexed with HNSW.

The labelled queries (bench/data/python_docs_queries.json) only have answers among the real rows.
Embedding 60,000 more rows with the model would take the better part of an hour on this machine, so
the filler rows get cheap but realistic vectors instead: each is a blend of two real chunks'
vectors plus noise, renormalised, so the fillers lie among the real ones (where they compete with
them and the HNSW graph must find its way past them) rather than in an empty corner of the space
that no query visits. Their text is prose-like words from a small vocabulary (bench.common.WORDS),
so the full-text side meets a large table too, without the fillers copying real documents' words.
They are written straight into the store with COPY, as the engine would store them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector
from psycopg import sql

from assets.catalog import ResolvedTable
from assets.index import index_definition
from assets.providers import provider_for
from assets.spec import TableSpec
from assets.text import text_hash
from bench.common import Context, body_text, create_source, declare, drop_hnsw, load_rows, sync_all

SCHEMA = "bench_search"
STORE_COLUMNS = sql.SQL("doc_id, chunk_seq, chunk, text_hash, model, bucket, embedding")
QUERIES = Path(__file__).resolve().parent / "data" / "python_docs_queries.json"


def labelled_queries() -> list[dict[str, Any]]:
    return json.loads(QUERIES.read_text())["queries"]


def build(ctx: Context, rows: int) -> tuple[TableSpec, ResolvedTable]:
    """The table, `rows` source rows in all, embedded and indexed."""
    from assets.engine import EmbeddingEngine
    from orchestration.corpus import python_docs_rows

    conn = ctx.connect()
    docs = python_docs_rows()
    create_source(conn, SCHEMA, "doc_id text PRIMARY KEY, kind text NOT NULL, title text NOT NULL, body text NOT NULL")
    load_rows(conn, SCHEMA, [(d.doc_id, d.kind, d.title, d.body) for d in docs], ("doc_id", "kind", "title", "body"))
    # The demo's declaration (orchestration/defs/python_docs/defs.yaml); the index is built below, once.
    spec, table = declare(conn, SCHEMA, template="# {title}\n\n{body}", chunking={"size": 800, "overlap": 100})
    drop_hnsw(conn, spec)
    cache = _cache_file(spec, docs)
    if cache.exists():
        ctx.log(f"restoring the embedded documents from {cache}")
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table.store, STORE_COLUMNS)) as copy:
            copy.write(cache.read_bytes())
    else:
        ctx.log(f"embedding {len(docs)} documents with the local model")
        engine = EmbeddingEngine(conn, table, provider_for(spec.provider))
        try:
            stats = sync_all(engine, spec.buckets, full=True)
        finally:
            engine.close()
        ctx.log(f"embedded: {stats.as_dict()}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        with conn.cursor().copy(sql.SQL("COPY {} ({}) TO STDOUT (FORMAT BINARY)").format(table.store, STORE_COLUMNS)) as copy:
            cache.write_bytes(b"".join(bytes(block) for block in copy))

    fillers = max(rows - len(docs), 0)
    if fillers:
        ctx.log(f"adding {fillers} filler rows with blended vectors")
        _add_fillers(conn, spec, table, fillers)
    conn.execute(sql.SQL("TRUNCATE {}").format(table.queue))  # the fillers' change-log entries
    ctx.log("building the HNSW index")
    conn.execute("SET maintenance_work_mem = '1GB'")
    conn.execute(index_definition(table, concurrently=False))
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table.store))
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table.source))
    conn.close()
    return spec, table


def _cache_file(spec: TableSpec, docs: list[Any]) -> Path:
    """Where the engine's output for this corpus and model is kept between runs: embedding the
    documentation takes minutes on a busy 2-core machine, and none of it is measured. Keyed by the
    model's fingerprint and the documents' text, so another interpreter or template embeds anew."""
    digest = hashlib.sha256(spec.fingerprint.encode())
    for d in docs:
        digest.update(f"{d.doc_id}\0{d.kind}\0{d.title}\0{d.body}\0".encode())
    root = Path(os.environ.get("VECTORSYNC_BENCH_CACHE", Path(tempfile.gettempdir()) / "vectorsync-bench-cache"))
    return root / f"search-{digest.hexdigest()[:16]}.copy"


def _add_fillers(conn: Any, spec: TableSpec, table: ResolvedTable, count: int) -> None:
    register_vector(conn)
    real = np.stack([
        v.to_numpy() for (v,) in conn.execute(
            # ordered, so that the same seed blends the same vectors from one run to the next
            sql.SQL("SELECT embedding FROM {} ORDER BY doc_id, chunk_seq").format(table.store))
    ]).astype(np.float32)
    rng = np.random.default_rng(16)
    a = real[rng.integers(0, len(real), count)]
    b = real[rng.integers(0, len(real), count)]
    share = rng.uniform(0.5, 0.9, (count, 1)).astype(np.float32)
    noise = rng.standard_normal((count, real.shape[1])).astype(np.float32)
    noise *= 0.35 / np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = share * a + (1 - share) * b + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    keys = [f"filler:{n}" for n in range(count)]
    texts = [body_text(n, 600) for n in range(count)]
    load_rows(conn, SCHEMA, [(k, "filler", f"Filler {n}", t) for n, (k, t) in enumerate(zip(keys, texts))],
              ("doc_id", "kind", "title", "body"))
    buckets = dict(conn.execute(
        sql.SQL("SELECT doc_id, vectorsync.bucket_of(jsonb_build_array(doc_id), %s) FROM {} WHERE kind = 'filler'")
        .format(table.source), (spec.buckets,),
    ).fetchall())
    head = struct.pack(">HH", spec.provider.dimensions, 0)
    copy_sql = sql.SQL(
        "COPY {} (doc_id, chunk_seq, chunk, text_hash, model, bucket, embedding) FROM STDIN (FORMAT BINARY)"
    ).format(table.store)
    with conn.transaction(), conn.cursor().copy(copy_sql) as copy:
        copy.set_types(["text", "int4", "text", "bytea", "text", "int4", "bytea"])
        for n, key in enumerate(keys):
            chunk = f"# Filler {n}\n\n{texts[n]}"
            copy.write_row((key, 0, chunk, text_hash(chunk), spec.fingerprint, buckets[key],
                            head + vectors[n].astype(">f4").tobytes()))
