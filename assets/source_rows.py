"""Reading rows of the source table: by key (for the change log) and in key order (for the sweep).
Free of Dagster.

A row comes back with its key as jsonb prints it (the identity of a row everywhere in the engine),
each key column in its type's binary form (so the key is copied to the store bit for bit, whatever
Python could make of it), and the text columns as Python values (assets/values.py keeps those that
Python cannot hold as PostgreSQL prints them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .catalog import ResolvedTable, key_array
from .values import tolerant_cursor


@dataclass
class Row:
    key_json: str  # the key as jsonb prints it: the identity of a row everywhere in the engine
    key_values: tuple[bytes, ...]  # each key column in its type's binary form (catalog.Column.send_function)
    values: dict[str, Any]
    bucket: int = 0
    pieces: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class SourceReader:
    def __init__(self, conn: psycopg.Connection, table: ResolvedTable) -> None:
        self.conn = conn
        self.table = table
        t = table
        key_text = sql.SQL("{}::text").format(t.key_json("s"))
        key_sent = sql.SQL(", ").join(
            sql.SQL("{}({})").format(t.raw(c.send_function), t.ident("s", c.name)) for c in t.key
        )
        text_columns = [t.ident("s", c.name) for c in t.text_columns]
        bucket_expr = t.bucket_expr("s")
        self._by_keys = sql.SQL(
            "SELECT x.* FROM {} CROSS JOIN LATERAL (SELECT {} FROM {} s WHERE {} OFFSET 0) x"
        ).format(t.key_probe(), sql.SQL(", ").join([key_text, key_sent, *text_columns]), t.source, t.key_matches("s"))
        # One scan in key order serves every requested bucket: a backfill of all buckets reads the
        # source once, not once per bucket.
        swept = sql.SQL(", ").join([key_text, bucket_expr, key_sent, *text_columns])
        in_buckets = sql.SQL("{} = ANY(%(buckets)s::int[])").format(bucket_expr)
        self._first = sql.SQL("SELECT {} FROM {} s WHERE {} ORDER BY {} LIMIT %(limit)s").format(
            swept, t.source, in_buckets, t.key_list("s")
        )
        self._next = sql.SQL("SELECT {} FROM {} s WHERE {} AND ({}) > ({}) ORDER BY {} LIMIT %(limit)s").format(
            swept, t.source, in_buckets, t.key_list("s"),
            t.key_from_json(sql.SQL("%(after)s::jsonb")), t.key_list("s"),
        )

    def by_keys(self, key_jsons: list[str]) -> list[Row]:
        """The rows that still exist among these keys (bucket left 0 for the caller to set)."""
        cur = tolerant_cursor(self.conn, self.table.text_columns)
        return self._rows(cur.execute(self._by_keys, (key_array(key_jsons),)), with_bucket=False)

    def in_key_order(self, buckets: list[int], after: str | None, limit: int) -> list[Row]:
        """The next `limit` rows of `buckets` after the key `after` (from the first if None)."""
        cur = tolerant_cursor(self.conn, self.table.text_columns)
        cur.execute(self._first if after is None else self._next, {"buckets": buckets, "after": after, "limit": limit})
        return self._rows(cur, with_bucket=True)

    def _rows(self, cursor: psycopg.Cursor, with_bucket: bool) -> list[Row]:
        nkey = len(self.table.key)
        first_value = 2 + nkey if with_bucket else 1 + nkey
        names = [c.name for c in self.table.text_columns]
        return [
            Row(
                key_json=record[0],
                key_values=tuple(record[first_value - nkey : first_value]),
                values=dict(zip(names, record[first_value:])),
                bucket=record[1] if with_bucket else 0,
            )
            for record in cursor
        ]
