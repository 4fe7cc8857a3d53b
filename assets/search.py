"""Nearest-neighbour search over one embedding table: the query is embedded with the table's model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.rows import dict_row

from .catalog import ResolvedTable
from .providers.base import EmbeddingProvider

# Distance operator, and how a distance becomes a score where higher is closer.
DISTANCE = {
    "cosine": ("<=>", lambda d: 1.0 - d),
    "l2": ("<->", lambda d: -d),
    "inner_product": ("<#>", lambda d: -d),
}


@dataclass(frozen=True)
class SearchHit:
    key: tuple[Any, ...]
    score: float
    chunk: str
    row: dict[str, Any]


def search(
    conn: psycopg.Connection,
    table: ResolvedTable,
    provider: EmbeddingProvider,
    query: str,
    k: int = 5,
) -> list[SearchHit]:
    """The `k` source rows nearest to `query`, best first, each with its best-matching chunk."""
    if k < 1:
        raise ValueError("k must be at least 1")
    register_vector(conn)
    spec = table.spec
    vector = provider.embed([query]).vectors[0].astype(np.float32)
    operator, to_score = DISTANCE[spec.distance]
    # Rows have several chunks: take enough nearest chunks to find k distinct rows, keep the best.
    statement = sql.SQL(
        """WITH nearest AS (
               SELECT {keys}, chunk, embedding {op} %(q)s::vector::{vtype} AS distance
               FROM {store} e ORDER BY embedding {op} %(q)s::vector::{vtype} LIMIT %(chunks)s),
           best AS (
               SELECT DISTINCT ON ({keys}) * FROM nearest ORDER BY {keys}, distance)
           SELECT {key_json} AS vs_key, b.chunk AS vs_chunk, b.distance AS vs_distance, s.*
           FROM best b JOIN {source} s ON {join}
           ORDER BY b.distance LIMIT %(k)s"""
    ).format(
        keys=table.key_list(),
        op=sql.SQL(operator),
        vtype=sql.SQL(f"{spec.vector_type}({spec.provider.dimensions})"),
        store=table.store,
        key_json=table.key_json("b"),
        source=table.source,
        join=table.key_equal("b", "s"),
    )
    hits = []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(statement, {"q": vector, "chunks": k * 8, "k": k})
        for record in cur:
            key = tuple(record.pop("vs_key"))
            chunk = record.pop("vs_chunk")
            distance = float(record.pop("vs_distance"))
            hits.append(SearchHit(key, to_score(distance), chunk, record))
    return hits
