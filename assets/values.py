"""Reading source values that Python cannot represent. Free of Dagster.

PostgreSQL holds dates and timestamps BC or at ±infinity, times of 24:00, intervals beyond
timedelta's range: psycopg refuses to load them, and one such value would fail the whole page it
is read in. Text columns are read through loaders that fall back to PostgreSQL's own text for the
value, so such a row renders as the database prints it ('infinity', '0044-03-15 BC') instead of
stopping its bucket. (Key columns never become Python values at all: see catalog.Column.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import Loader

from .catalog import Column

# Types whose every value psycopg loads (or keeps as text): reading them needs no fallback, and
# wrapping their fast loaders would slow every page for nothing.
_ALWAYS_LOADABLE = {
    16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 700, 701, 1042, 1043, 1700, 2950, 3802,
}


class PostgresText(str):
    """A value kept as PostgreSQL prints it because Python has no exact equivalent of it."""


def _tolerant(inner: type[Loader], encoding: str) -> type[Loader]:
    class Tolerant(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._inner = inner(oid, context)

        def load(self, data: Any) -> Any:
            try:
                return self._inner.load(data)
            except (psycopg.DataError, ValueError, OverflowError):
                return PostgresText(bytes(data).decode(encoding))

    return Tolerant


def tolerant_cursor(conn: psycopg.Connection, columns: Iterable[Column]) -> psycopg.Cursor:
    """A cursor that loads `columns` (text format) without ever failing on a value."""
    cur = conn.cursor()
    encoding = conn.info.encoding
    for oid in {c.type_oid for c in columns} - _ALWAYS_LOADABLE:
        inner = cur.adapters.get_loader(oid, pq.Format.TEXT)
        if inner is not None:
            cur.adapters.register_loader(oid, _tolerant(inner, encoding))
    return cur
