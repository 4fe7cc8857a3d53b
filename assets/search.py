"""Search over one embedding table: vector search, and hybrid search (full-text plus vector, merged
by reciprocal rank fusion), both optionally filtered on source columns.

The query itself lives in one place, the SQL function vectorsync.hybrid_search (sql/functions/
hybrid_search.sql), so Python, the CLI and plain SQL clients rank and filter alike. Python adds what
SQL cannot do: embedding the query with the table's model, and returning the source rows with their
own column types rather than as jsonb. Given no provider, the query is embedded by the warm search
service (`vectorsync serve`, assets/search_service.py) when one runs, and by the model loaded here
only when none does.

Model versions (assets/versions.py): the query is embedded with the ACTIVE version's model, as the
database has it (not the declaration, which may already name a new model that is still filling),
and the SQL function is told that model's fingerprint, so it answers from the store of that very
version or refuses (VersionSwitched) when a promotion or rollback committed in between; the search
is then run again with the new active model. No search compares vectors of two models.

Query text is plain text: its words are matched as words, never read as operators, unless the
caller asks for web-search syntax with text_match="web".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .catalog import ResolvedTable
from .providers.base import EmbeddingProvider
from .spec_sections import ProviderSpec
from .versions import installed_spec

# What the SQL function raises when the caller's query model is no longer the active version's.
VERSION_SWITCHED = "VS409"
# A promotion and a rollback in the very moment of one search are rare; three never happen at once.
_ATTEMPTS = 3

# How a distance becomes a score where higher is closer.
DISTANCE_TO_SCORE = {
    "cosine": lambda d: 1.0 - d,
    "l2": lambda d: -d,
    "inner_product": lambda d: -d,
}
# The fusion's defaults, chosen on the labelled Python-documentation queries of bench/search.py
# (`python -m bench search` prints the sweep); the SQL function's own defaults are the same.
# 60 is the usual constant of reciprocal rank fusion (Cormack et al., 2009): large enough that a
# first place in one list does not drown second places in both.
DEFAULT_RRF_K = 60
DEFAULT_VECTOR_WEIGHT = 1.0
DEFAULT_TEXT_WEIGHT = 1.0
# None: a row missing from one side gets nothing from it. A number: it is scored there as if ranked
# that far down, so a row found by one side only still competes with rows found by both.
DEFAULT_ABSENT_RANK: int | None = None
TextMatch = Literal["all", "any", "web"]


@dataclass(frozen=True)
class SearchHit:
    """One source row. `score` is 1 - cosine distance (or -distance) for vector search, the RRF score
    for hybrid search. The per-method fields say how each list ranked the row (1 is best) and its
    raw figure there; None where the row was not in that list."""

    key: tuple[Any, ...]
    score: float
    chunk: str
    row: dict[str, Any]
    vector_rank: int | None = None
    text_rank: int | None = None
    vector_distance: float | None = None
    text_score: float | None = None
    model: str | None = None  # the fingerprint of the model that embedded `chunk`


class SearchError(ValueError):
    """A search that cannot run as asked (an unknown filter column, a value its type refuses),
    naming the table and the field."""

    def __init__(self, table: str, field: str, message: str) -> None:
        self.table = table
        self.field = field
        self.message = message
        super().__init__(f"table {table}: {field}: {message}" if field else f"table {table}: {message}")


def search(
    conn: psycopg.Connection,
    table: ResolvedTable,
    provider: EmbeddingProvider | None,
    query: str,
    k: int = 5,
    where: Mapping[str, Any] | None = None,
) -> list[SearchHit]:
    """The `k` source rows nearest to `query`, best first, each with its best-matching chunk.
    `where` keeps only rows whose columns equal the given values (see `hybrid_search`). With
    `provider` None the query is embedded by the running search service, or locally without one."""
    return _on_active(conn, table, provider, query, None, k, where, Fusion())


def hybrid_search(
    conn: psycopg.Connection,
    table: ResolvedTable,
    provider: EmbeddingProvider | None,
    query: str,
    k: int = 5,
    where: Mapping[str, Any] | None = None,
    rrf_k: int = DEFAULT_RRF_K,
    candidates: int | None = None,
    text_match: TextMatch = "all",
    vector_weight: float = DEFAULT_VECTOR_WEIGHT,
    text_weight: float = DEFAULT_TEXT_WEIGHT,
    absent_rank: int | None = DEFAULT_ABSENT_RANK,
) -> list[SearchHit]:
    """The `k` best source rows for `query` by vector distance and full-text match together.

    Each method ranks its `candidates` best chunks (default max(8k, 40)), one hit per source row;
    the lists are merged by weighted reciprocal rank fusion, score = sum of weight / (rrf_k + rank)
    over the lists the row is in (or, with `absent_rank`, over both, a missing row counting as
    ranked `absent_rank`). The full-text side uses the table's `text_search_config`, ranked by
    ts_rank_cd, and reads the query as plain words: "all" (default) matches chunks with every word,
    "any" chunks with any of them (wider, and slower on big tables: every chunk sharing a common
    word is ranked); only "web" reads web-search syntax ("a phrase", `or`, -exclude).

    `where` maps source columns to values, all of which must hold: a value is compared with the
    column after a cast to its type ({"id": 7} and {"id": "7"} agree), a list means any of its
    values, None means IS NULL. An unknown column or a value the type refuses raises SearchError.
    """
    fusion = Fusion(rrf_k, candidates, text_match, vector_weight, text_weight, absent_rank)
    return _on_active(conn, table, provider, query, query, k, where, fusion)


class VersionSwitched(RuntimeError):
    """The active version changed between embedding the query and searching: embed again."""


def _same_model(a: ProviderSpec, b: ProviderSpec) -> bool:
    return (a.kind, a.model, a.dimensions) == (b.kind, b.model, b.dimensions)


def _on_active(
    conn: psycopg.Connection, table: ResolvedTable, provider: EmbeddingProvider | None, query: str,
    text: str | None, k: int, where: Mapping[str, Any] | None, fusion: Fusion,
) -> list[SearchHit]:
    """Embed the query with the active version's model and search that version, again if it was
    switched meanwhile. A caller's provider is used only if it is that model."""
    for attempt in range(_ATTEMPTS):
        active = replace(table, spec=installed_spec(conn, table.spec))
        own = provider if provider is not None and _same_model(table.spec.provider, active.spec.provider) else None
        vector = embed_query(active, own, query)
        try:
            return run_search(conn, active, vector, text, k, where, fusion, fingerprint=active.spec.fingerprint)
        except VersionSwitched:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Fusion:
    """How hybrid search merges its two lists (see `hybrid_search`)."""

    rrf_k: int = DEFAULT_RRF_K
    candidates: int | None = None
    text_match: str = "all"
    vector_weight: float = DEFAULT_VECTOR_WEIGHT
    text_weight: float = DEFAULT_TEXT_WEIGHT
    absent_rank: int | None = DEFAULT_ABSENT_RANK

    def check(self, table: str) -> None:
        if self.rrf_k < 0:
            raise SearchError(table, "rrf_k", f"must be 0 or more, not {self.rrf_k}")
        if self.candidates is not None and self.candidates < 1:
            raise SearchError(table, "candidates", f"must be at least 1, not {self.candidates}")
        if self.text_match not in ("all", "any", "web"):
            raise SearchError(table, "text_match", f"must be 'all', 'any' or 'web', not {self.text_match!r}")
        for field in ("vector_weight", "text_weight"):
            if not getattr(self, field) >= 0:
                raise SearchError(table, field, f"must be 0 or more, not {getattr(self, field)}")
        if self.absent_rank is not None and self.absent_rank < 1:
            raise SearchError(table, "absent_rank", f"must be at least 1, not {self.absent_rank}")


def embed_query(table: ResolvedTable, provider: EmbeddingProvider | None, query: str) -> np.ndarray:
    """The query's vector by the table's model: from `provider`; without one, from the running
    search service, whose model is already loaded; only when none runs, from the model loaded here."""
    if provider is None:
        from .search_client import find_service

        client = find_service()
        vector = client.embed(table.spec.name, table.spec.fingerprint, query) if client else None
        if vector is not None:
            return vector
        from .providers import provider_for

        provider = provider_for(table.spec.provider)
    return provider.embed([query]).vectors[0].astype(np.float32)


def run_search(
    conn: psycopg.Connection,
    table: ResolvedTable,
    vector: np.ndarray,
    text: str | None,
    k: int,
    where: Mapping[str, Any] | None,
    fusion: Fusion,
    typed_rows: bool = True,
    fingerprint: str | None = None,
    version: int | None = None,
) -> list[SearchHit]:
    """Vector search (text None) or hybrid search for a query vector already computed: what the
    search service runs. Vector hits are scored as `search` scores them. With `typed_rows` False
    the rows are the function's jsonb (dates as text), saving a second join with the source: the
    service sends JSON anyway. `fingerprint`: the model the vector was made with; raises
    VersionSwitched if the active version has another. `version`: search that live version
    instead of the active one (to evaluate a candidate)."""
    hits = _run(conn, table, vector, text, k, where, fusion, typed_rows, fingerprint, version)
    if text is not None:
        return hits
    to_score = DISTANCE_TO_SCORE[table.spec.distance]
    return [replace(h, score=to_score(h.vector_distance), text_rank=None, text_score=None) for h in hits]


def _run(
    conn: psycopg.Connection,
    table: ResolvedTable,
    vector: np.ndarray | None,
    text: str | None,
    k: int,
    where: Mapping[str, Any] | None,
    fusion: Fusion,
    typed_rows: bool = True,
    fingerprint: str | None = None,
    version: int | None = None,
) -> list[SearchHit]:
    name = table.spec.name
    if k < 1:
        raise SearchError(name, "k", f"must be at least 1, not {k}")
    fusion.check(name)
    if conn.adapters.types.get("vector") is None:  # registering looks the types up: once per connection
        register_vector(conn)
    # Dates, decimals and UUIDs go as their text, which the function casts to the column's type.
    filter_json = Jsonb(dict(where or {}), dumps=lambda v: json.dumps(v, default=str))
    # The function returns the key and the ranks; joining the source here gives the row back with
    # its own column types (to_jsonb would turn dates into strings and numerics into floats).
    statement = sql.SQL(
        """SELECT h.row_key AS vs_key, h.score AS vs_score, h.vector_rank AS vs_vector_rank,
                  h.text_rank AS vs_text_rank, h.vector_distance AS vs_vector_distance,
                  h.text_score AS vs_text_score, h.chunk AS vs_chunk, h.embedding_model AS vs_model, {row}
           FROM vectorsync.hybrid_search(%(name)s, %(vector)s, %(text)s, %(k)s, %(filter)s, %(rrf_k)s,
                                         %(candidates)s, %(text_match)s, %(vector_weight)s,
                                         %(text_weight)s, %(absent_rank)s, %(fingerprint)s,
                                         %(version)s) WITH ORDINALITY h
           {join}
           ORDER BY h.ordinality"""
    ).format(
        row=sql.SQL("s.*" if typed_rows else "h.source_row AS vs_row"),
        join=sql.SQL("JOIN {source} s ON ({keys}) = ({typed_key})").format(
            source=table.source,
            keys=table.key_list("s"),
            typed_key=table.key_from_json(sql.Identifier("h", "row_key")),
        ) if typed_rows else sql.SQL(""),
    )
    params = {"name": name, "vector": vector, "text": text, "k": k, "filter": filter_json,
              "rrf_k": fusion.rrf_k, "candidates": fusion.candidates, "text_match": fusion.text_match,
              "vector_weight": float(fusion.vector_weight), "text_weight": float(fusion.text_weight),
              "absent_rank": fusion.absent_rank, "fingerprint": fingerprint, "version": version}
    hits = []
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(statement, params)
            for record in cur:
                hits.append(SearchHit(
                    key=tuple(record.pop("vs_key")),
                    score=float(record.pop("vs_score")),
                    chunk=record.pop("vs_chunk"),
                    vector_rank=record.pop("vs_vector_rank"),
                    text_rank=record.pop("vs_text_rank"),
                    vector_distance=_float(record.pop("vs_vector_distance")),
                    text_score=_float(record.pop("vs_text_score")),
                    model=record.pop("vs_model"),
                    row=record if typed_rows else record["vs_row"],
                ))
    except psycopg.Error as exc:
        if exc.sqlstate == VERSION_SWITCHED:
            raise VersionSwitched(str(exc)) from None
        # The function names the offending filter column in the error's COLUMN field.
        column = exc.diag.column_name
        if column is not None and exc.diag.table_name == name:
            raise SearchError(name, f"where.{column}", exc.diag.message_detail or str(exc)) from None
        raise
    return hits


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
