"""Search quality on golden queries (assets/golden.py): recall@k and MRR@10, and the gate a
candidate version must pass before it replaces the active one. Free of Dagster.

Metrics are computed from any `search(query, depth) -> ranked keys` callable, so one function
scores the active table through the real search path (`table_search`), or any store relation with
its own query model (`store_search`: a candidate version, another model, an exact scan).

* Source rows, not chunks, are ranked: a row with several chunks counts once, at its best rank.
* Ties are scored by their expected value over every order of the tied rows (McSherry and Najork,
  "Computing information retrieval performance measures efficiently in the presence of tied
  scores", ECIR 2008), so a figure never depends on how the database happened to break a tie. A
  callable that returns plain keys, without scores, has no ties.
* recall@k of a query is the share of its expected rows among the first k rows; MRR@10 is the
  mean of 1 / the rank of its first expected row, 0 when none is in the first 10.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from .catalog import ResolvedTable
from .golden import GoldenSet, key_text, same_key
from .providers.base import EmbeddingProvider
from .search import Fusion, embed_query, run_search

MRR_DEPTH = 10
# A ranked result: the key's json text alone, or with its score (equal scores are ties).
Ranked = Sequence[str | tuple[str, float]]
SearchFunction = Callable[[str, int], Ranked]
# pgvector's distance operators, as vectorsync.hybrid_search chooses them.
OPERATORS = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}


@dataclass(frozen=True)
class QueryScore:
    query: str
    expected: int  # answers scored (present in the source)
    recall: float
    reciprocal_rank: float


@dataclass(frozen=True)
class Metrics:
    k: int
    recall_at_k: float
    mrr_at_10: float
    queries: int
    per_query: tuple[QueryScore, ...] = ()

    def metadata(self, prefix: str = "") -> dict[str, float | int]:
        """Numeric figures under stable names, for Dagster metadata (plotted over time)."""
        return {f"{prefix}recall@{self.k}": self.recall_at_k, f"{prefix}mrr@{MRR_DEPTH}": self.mrr_at_10,
                f"{prefix}golden_queries": self.queries}


@dataclass(frozen=True)
class GateResult:
    """A promotion gate's verdict (assets/promotion.py), with the figures it judged by."""

    passed: bool
    reason: str = ""
    metadata: dict[str, float | int] = field(default_factory=dict)  # e.g. recall@10 of each version


def evaluate(golden: GoldenSet, search: SearchFunction, k: int = 10) -> Metrics:
    """recall@k and MRR@10 of `search` over the golden queries (see the module's doc). Run it on
    the set `golden.check_answers` returns, so that a row that is gone is not scored as a miss."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if not golden.queries:
        raise ValueError(f"{golden.source}: no golden query left to evaluate (are the answers' rows gone?)")
    depth = max(k, MRR_DEPTH)
    scores = []
    for q in golden.queries:
        groups = _tie_groups(search(q.query, depth))
        relevant = {same_key(key) for key in q.expected}
        scores.append(QueryScore(q.query, len(relevant), _recall(groups, relevant, k), _reciprocal_rank(groups, relevant)))
    return Metrics(
        k=k,
        recall_at_k=float(np.mean([s.recall for s in scores])),
        mrr_at_10=float(np.mean([s.reciprocal_rank for s in scores])),
        queries=len(scores),
        per_query=tuple(scores),
    )


def compare(active: Metrics, candidate: Metrics, max_drop: float) -> GateResult:
    """Whether the candidate is not worse than the active version by more than `max_drop` on both
    recall@k and MRR@10. Figures from different k or different query sets are not comparable."""
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be 0 or more, not {max_drop}")
    if active.k != candidate.k or active.queries != candidate.queries:
        return GateResult(False, f"not comparable: active has recall@{active.k} over {active.queries} queries, "
                                 f"candidate recall@{candidate.k} over {candidate.queries}")
    if candidate.queries == 0:
        return GateResult(False, "no golden query was evaluated")
    parts, ok = [], True
    for name, a, c in ((f"recall@{active.k}", active.recall_at_k, candidate.recall_at_k),
                       (f"MRR@{MRR_DEPTH}", active.mrr_at_10, candidate.mrr_at_10)):
        # 1e-9: two figures equal up to float noise are equal.
        worse = a - c > max_drop + 1e-9
        ok = ok and not worse
        parts.append(f"{name} {c:.4f} against {a:.4f}" + (f" (drops {a - c:.4f}, more than {max_drop:g})" if worse else ""))
    verdict = "candidate passes" if ok else "candidate is worse"
    return GateResult(ok, f"{verdict} on {candidate.queries} golden queries: " + "; ".join(parts),
                      {**active.metadata("active_"), **candidate.metadata("candidate_")})


def table_search(
    conn: psycopg.Connection, table: ResolvedTable, provider: EmbeddingProvider | None, hybrid: bool = False
) -> SearchFunction:
    """The table's own search, as `vectorsync search` runs it (vectorsync.hybrid_search over the
    store the registry names), with the table's query model."""

    def search(query: str, depth: int) -> list[tuple[str, float]]:
        vector = embed_query(table, provider, query)
        hits = run_search(conn, table, vector, query if hybrid else None, depth, None, Fusion(), typed_rows=False)
        # The score decides ties: the distance for vector search, the fused score for hybrid.
        return [(key_text(h.key), h.score) for h in hits]

    return search


def store_search(
    conn: psycopg.Connection,
    table: ResolvedTable,
    store: sql.Composable,
    provider: EmbeddingProvider,
    distance: str | None = None,
    exact: bool = False,
    ef_search: int | None = None,
    candidates: int | None = None,
) -> SearchFunction:
    """Vector search over any store relation of `table` (same key columns), its queries embedded by
    `provider`: the shape of vectorsync.hybrid_search's vector side (the nearest `candidates`
    chunks, default max(8 x depth, 40), one per row at its best distance). `exact` turns index
    scans off (the exact ranking, for comparison with HNSW); otherwise `ef_search` (default the
    declaration's) is the graph search's width, set for each query's own transaction (on an
    autocommit connection; inside a caller's transaction it lasts until that one ends). `store` is
    composed for statements with parameters (ResolvedTable.with_parameters())."""
    operator = OPERATORS[distance or table.spec.distance]
    t = table.with_parameters()
    if conn.adapters.types.get("vector") is None:
        register_vector(conn)
    vector_type = conn.execute(sql.SQL("SELECT pg_typeof(embedding)::text FROM {} LIMIT 1").format(store)).fetchone()
    if vector_type is None:
        return lambda query, depth: []  # an empty store finds nothing
    statement = sql.SQL(
        """WITH hits AS MATERIALIZED (
               SELECT {key} AS row_key, (e.embedding {op} %(v)s::vector::{type})::float8 AS distance
               FROM {store} e ORDER BY e.embedding {op} %(v)s::vector::{type} LIMIT %(candidates)s)
           SELECT row_key::text, min(distance) AS distance FROM hits
           GROUP BY row_key ORDER BY distance, row_key LIMIT %(k)s"""
    ).format(key=t.key_json("e"), op=sql.SQL(operator), type=sql.SQL(vector_type[0]), store=store)
    setting = ("enable_indexscan", "off") if exact else ("hnsw.ef_search", str(ef_search or table.spec.index.ef_search))

    def search(query: str, depth: int) -> list[tuple[str, float]]:
        vector = provider.embed([query]).vectors[0].astype(np.float32)
        with conn.transaction():
            conn.execute("SELECT set_config(%s, %s, true)", setting)
            rows = conn.execute(statement, {"v": vector, "k": depth,
                                            "candidates": candidates or max(depth * 8, 40)}).fetchall()
        return [(key, float(d)) for key, d in rows]

    return search


def _tie_groups(ranked: Ranked) -> list[list[str]]:
    """Distinct keys in rank order (a key's first place counts), grouped where scores are equal."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    last: Any = None
    for item in ranked:
        key, score = (item, None) if isinstance(item, str) else item
        key = same_key(key)
        if key in seen:
            continue
        seen.add(key)
        if score is not None and groups and score == last:
            groups[-1].append(key)
        else:
            groups.append([key])
        last = score
    return groups


def _recall(groups: list[list[str]], relevant: set[str], k: int) -> float:
    """Expected share of the relevant keys in the first k places; a tied group that the cutoff
    cuts holds its relevant keys in proportion to its places inside."""
    found, start = 0.0, 0
    for group in groups:
        if start >= k:
            break
        inside = min(len(group), k - start)
        found += sum(key in relevant for key in group) * inside / len(group)
        start += len(group)
    return found / len(relevant)


def _reciprocal_rank(groups: list[list[str]], relevant: set[str]) -> float:
    """Expected 1 / rank of the first relevant key within MRR_DEPTH places, over every order of
    the tied group that holds it: with r relevant among g tied keys after s places, the first
    relevant is at place s + i with probability C(g - i, r - 1) / C(g, r)."""
    start = 0
    for group in groups:
        if start >= MRR_DEPTH:
            return 0.0
        r, g = sum(key in relevant for key in group), len(group)
        if r:
            return sum(comb(g - i, r - 1) / comb(g, r) / (start + i)
                       for i in range(1, g - r + 2) if start + i <= MRR_DEPTH)
        start += g
    return 0.0
