"""The vector index of a store: built CONCURRENTLY once the store is large enough.

Below `index.min_rows` chunks an exact scan answers in milliseconds and a backfill writes faster
with no HNSW graph to update, so install does not build the index; the index upkeep schedule does,
while runs keep writing (CREATE INDEX CONCURRENTLY blocks no insert, update or delete).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import ResolvedTable
from .locks import held_elsewhere, try_lock, unlock

OPERATOR_CLASSES = {
    ("vector", "cosine"): "vector_cosine_ops",
    ("vector", "l2"): "vector_l2_ops",
    ("vector", "inner_product"): "vector_ip_ops",
    ("halfvec", "cosine"): "halfvec_cosine_ops",
    ("halfvec", "l2"): "halfvec_l2_ops",
    ("halfvec", "inner_product"): "halfvec_ip_ops",
}


@dataclass(frozen=True)
class IndexState:
    table: str
    index: str
    exists: bool
    valid: bool
    # Counted up to min_rows only: a bounded scan, however large the store.
    store_rows_at_least: int
    min_rows: int
    # Another session holds the build lock: its CREATE INDEX CONCURRENTLY is running, and the
    # index it is building reads as invalid until it finishes, so it must not be dropped.
    building: bool = False

    @property
    def needs_build(self) -> bool:
        return (
            not self.building
            and not (self.exists and self.valid)
            and self.store_rows_at_least >= self.min_rows
        )


def index_name(table: ResolvedTable) -> str:
    return table.spec.object_names["hnsw_index"]


def _build_lock(table: ResolvedTable) -> str:
    """Held for the whole of a build. A killed builder's connection closes and the lock goes with
    it, so the next upkeep run drops the invalid index it left."""
    version = "" if table.spec.version == 1 else f"@v{table.spec.version}"  # each version has its index
    return f"vectorsync-index:{table.spec.name}{version}"


def index_state(conn: psycopg.Connection, table: ResolvedTable, holding_lock: bool = False) -> IndexState:
    spec = table.spec
    building = not holding_lock and held_elsewhere(conn, _build_lock(table))
    found = conn.execute(
        """SELECT i.indisvalid FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s""",
        (spec.store_schema, index_name(table)),
    ).fetchone()
    # A literal limit, not a parameter: with parameters, psycopg reads a % in the store's name as one.
    rows = conn.execute(
        sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {}) t").format(
            table.store, sql.Literal(max(spec.index.min_rows, 1))
        )
    ).fetchone()[0]
    return IndexState(
        spec.name, index_name(table), found is not None, bool(found and found[0]), rows, spec.index.min_rows,
        building,
    )


def index_definition(table: ResolvedTable, concurrently: bool) -> sql.Composed:
    spec = table.spec
    return sql.SQL(
        "CREATE INDEX {concurrently} IF NOT EXISTS {name} ON {store} USING hnsw (embedding {ops}) "
        "WITH (m = {m}, ef_construction = {ef})"
    ).format(
        concurrently=sql.SQL("CONCURRENTLY" if concurrently else ""),
        name=sql.Identifier(index_name(table)),
        store=table.store,
        ops=sql.SQL(OPERATOR_CLASSES[(spec.vector_type, spec.distance)]),
        m=sql.Literal(spec.index.m),
        ef=sql.Literal(spec.index.ef_construction),
    )


def build_index(conn: psycopg.Connection, table: ResolvedTable) -> IndexState:
    """Build the index if the store is large enough and it is missing or invalid (an interrupted
    CONCURRENTLY build leaves an invalid index behind, which must be dropped first). While another
    session is building it, returns a state with `building` set and touches nothing."""
    if not conn.autocommit:
        raise ValueError("CREATE INDEX CONCURRENTLY needs an autocommit connection")
    lock = _build_lock(table)
    if not try_lock(conn, lock):
        return index_state(conn, table)
    try:
        state = index_state(conn, table, holding_lock=True)
        if not state.needs_build:
            return state
        if state.exists:
            conn.execute(
                sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                    sql.Identifier(table.spec.store_schema, state.index)
                )
            )
        conn.execute(index_definition(table, concurrently=True))
        return index_state(conn, table, holding_lock=True)
    finally:
        unlock(conn, lock)
