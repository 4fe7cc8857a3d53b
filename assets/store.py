"""The store of one table: what is stored for a key, vectors by text hash, and the writes.
Free of Dagster; the one module that writes the store's chunks (the sweep deletes orphans).

Chunks are written with binary COPY: key columns in their type's binary form as read from the
source, the vector in pgvector's binary input. Writes run in the caller's transaction (the one
that also clears the page's change-log entries and updates the ledger).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from .catalog import ResolvedTable, key_array
from .source_rows import Row


class Store:
    """`reuse_from`: the (schema, table) of the stores of the table's other live model versions made by the same provider
    model, dimensions and vector type (assets/versions.py). The embedding cache looks there too,
    so a change of template or chunking re-sends no chunk text whose vector is already stored."""

    def __init__(
        self, conn: psycopg.Connection, table: ResolvedTable, reuse_from: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.conn = conn
        self.fingerprint = table.spec.fingerprint
        p = table.spec.provider
        # A fingerprint is kind/model/dimensions/<hash of template and chunking>: the same text
        # under any fingerprint with this head has the same vector.
        self._model_head = f"{p.kind}/{p.model}/{p.dimensions}/"
        t = table
        # Key columns are copied in their binary form, as read (bytea carries those bytes as they are).
        self._copy_types = ["bytea"] * len(t.key) + ["int4", "text", "bytea", "text", "int4", "bytea"]
        self._vector_format = ">f2" if t.spec.vector_type == "halfvec" else ">f4"
        # Ordered by chunk_seq: the chunks of each key come back in order (keys may interleave).
        self._hashes = sql.SQL(
            "SELECT x.k, x.text_hash, x.model FROM {} CROSS JOIN LATERAL "
            "(SELECT {}::text AS k, e.text_hash, e.model, e.chunk_seq FROM {} e WHERE {} OFFSET 0) x "
            "ORDER BY x.chunk_seq"
        ).format(t.key_probe(), t.key_json("e"), t.store, t.key_matches("e"))
        # %b: a bytea[] in binary, which psycopg builds without quoting each element in Python.
        # A text not in the store is looked up in the other live versions' stores of the same model
        # (reuse_from), then in the batch mode's pre-paid cache (migration 005, assets/batch_fill.py);
        # the Append stops at the first branch that answers.
        cached = conn.execute("SELECT to_regclass('vectorsync.batch_vectors')").fetchone()[0] is not None
        siblings = [sql.SQL(" UNION ALL (SELECT embedding::vector FROM {} WHERE text_hash = h.x "
                            "AND starts_with(model, %(head)s) LIMIT 1)").format(t.ident(*other)) for other in reuse_from]
        self._vectors = sql.SQL(
            "SELECT h.x, c.embedding FROM unnest(%(h)b::bytea[]) AS h(x) CROSS JOIN LATERAL "
            "((SELECT embedding::vector FROM {} WHERE text_hash = h.x AND model = %(m)s LIMIT 1){}{} LIMIT 1) c"
        ).format(t.store, sql.SQL("").join(siblings), sql.SQL(
            " UNION ALL (SELECT embedding FROM vectorsync.batch_vectors WHERE model = %(m)s AND text_hash = h.x)"
            if cached else ""))
        self._delete = sql.SQL(
            "DELETE FROM {} e WHERE e.ctid = ANY(ARRAY(SELECT x.ctid FROM {} CROSS JOIN LATERAL "
            "(SELECT d.ctid FROM {} d WHERE {} OFFSET 0) x)) RETURNING {}::text"
        ).format(t.store, t.key_probe(), t.store, t.key_matches("d"), t.key_json("e"))
        # COPY runs without parameters, so psycopg leaves its % alone: names as resolved.
        plain = t.without_parameters()
        self._copy = sql.SQL(
            "COPY {} ({}, chunk_seq, chunk, text_hash, model, bucket, embedding) FROM STDIN (FORMAT BINARY)"
        ).format(plain.store, plain.key_list())

    def hashes(self, key_jsons: list[str]) -> dict[str, list[tuple[bytes, str]]]:
        """key -> (text hash, model) of each stored chunk, in chunk order."""
        stored: dict[str, list[tuple[bytes, str]]] = {}
        if not key_jsons:
            return stored
        for key, digest, model in self.conn.execute(self._hashes, (key_array(key_jsons),)):
            stored.setdefault(key, []).append((bytes(digest), model))
        return stored

    def vectors(self, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
        """Stored vectors of these texts under the current model: the embedding cache."""
        if not hashes:
            return {}
        # Binary results: pgvector reads a binary vector with one frombuffer, its text form float by
        # float (1.6 s per 20,000 vectors of 256 dimensions, measured).
        cur = self.conn.execute(self._vectors, {"h": hashes, "m": self.fingerprint, "head": self._model_head},
                                binary=True)
        return {bytes(h): _as_array(v) for h, v in cur}

    def delete(self, key_jsons: list[str]) -> set[str]:
        """Delete every chunk of these keys; returns the keys that had any."""
        return {k for (k,) in self.conn.execute(self._delete, (key_array(key_jsons),))}

    def copy(self, rows: Iterable[Row], vectors: dict[bytes, np.ndarray]) -> Counter[int]:
        """Write each row's chunks with its pieces' vectors; returns chunks written per bucket."""
        chunks: Counter[int] = Counter()
        with self.conn.cursor().copy(self._copy) as copy:
            copy.set_types(self._copy_types)
            for row in rows:
                for seq, (piece, digest) in enumerate(zip(row.pieces, row.hashes)):
                    copy.write_row(
                        (*row.key_values, seq, piece, digest, self.fingerprint, row.bucket,
                         self._vector_bytes(vectors[digest]))
                    )
                chunks[row.bucket] += len(row.pieces)
        return chunks

    def _vector_bytes(self, vector: np.ndarray) -> bytes:
        # pgvector's binary input: int16 dimensions, int16 unused, then the big-endian elements.
        return struct.pack(">HH", vector.shape[0], 0) + vector.astype(self._vector_format).tobytes()


def _as_array(vector: Any) -> np.ndarray:
    # pgvector's loader gives numpy arrays in some versions and Vector objects in others.
    as_numpy = getattr(vector, "to_numpy", None)
    return np.asarray(as_numpy() if as_numpy else vector, dtype=np.float32)
