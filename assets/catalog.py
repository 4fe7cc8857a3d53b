"""A declaration checked against the live catalog: the source exists, its key, its columns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from .spec import TEMPLATE_SYNTAX, SpecError, TableSpec, parse_template

# Columns vectorsync adds to each store row; a source key column may not share these names.
STORE_COLUMNS = ("chunk_seq", "chunk", "text_hash", "model", "bucket", "embedding", "embedded_at",
                 "chunk_tsv")
# Columns the view adds next to the source's own.
VIEW_COLUMNS = ("chunk_seq", "chunk", "embedding", "embedding_model", "embedded_at")


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # as format_type() prints it, already quoted where needed
    type_oid: int
    comparable: bool  # has an `=` operator; json, xml and point do not
    # The type's binary output function (e.g. date_send). Key values travel from the source to
    # the store in this form, never as Python objects: a date BC, 'infinity' or a numeric NaN
    # has no exact Python value, and a key must round-trip bit for bit.
    send_function: str = "-"


# A key's text (jsonb) form depends on these settings (timestamptz on TimeZone, interval on
# IntervalStyle, bytea on bytea_output, float on extra_float_digits). The capture triggers and every
# engine session use these values, so one row has one key text and one bucket whichever session
# wrote it or reads it.
KEY_TEXT_SETTINGS = {
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "bytea_output": "hex",
    "extra_float_digits": "1",
}


def use_key_text_settings(conn: psycopg.Connection, local: bool = False) -> None:
    """Put a session (or, with `local`, the current transaction) on KEY_TEXT_SETTINGS."""
    conn.execute(
        sql.SQL("SELECT {}").format(sql.SQL(", ").join(
            sql.SQL("set_config({}, {}, {})").format(sql.Literal(n), sql.Literal(v), sql.Literal(local))
            for n, v in KEY_TEXT_SETTINGS.items()
        ))
    )


# Key types whose buckets the triggers and sweeps compute from the typed column (bucket_expr).
INT2_OID, INT4_OID, INT8_OID, TEXT_OID, VARCHAR_OID = 21, 23, 20, 25, 1043


@dataclass(frozen=True)
class ResolvedTable:
    spec: TableSpec
    origin: str
    key: tuple[Column, ...]
    text_columns: tuple[Column, ...]
    all_columns: tuple[Column, ...]
    # Whether the fragments below go into statements executed with parameters (see
    # with_parameters); only the engine's statements are.
    parameterized: bool = False

    def with_parameters(self) -> ResolvedTable:
        """This table, composing fragments for statements executed with parameters: psycopg reads
        every % in such a statement as a placeholder, the % of a name like "100%" included, so
        names and catalog types double it (psycopg turns %% back into % when it merges the
        parameters). A statement run without parameters (the DDL) must use the table as resolved."""
        return replace(self, parameterized=True)

    def without_parameters(self) -> ResolvedTable:
        return replace(self, parameterized=False)

    def ident(self, *parts: str) -> sql.Identifier:
        return _ParameterSafeIdentifier(*parts) if self.parameterized else sql.Identifier(*parts)

    def raw(self, text: str) -> sql.SQL:
        """A fragment from the catalog (a type or function name as PostgreSQL quotes it)."""
        return sql.SQL(text.replace("%", "%%") if self.parameterized else text)

    def _col(self, alias: str | None, name: str) -> sql.Identifier:
        return self.ident(alias, name) if alias else self.ident(name)

    # Composed SQL fragments, all identifiers quoted --------------------------------------------
    @property
    def source(self) -> sql.Identifier:
        return self.ident(self.spec.source.schema_, self.spec.source.table)

    @property
    def store(self) -> sql.Identifier:
        return self.ident(self.spec.store_schema, self.spec.store_name)

    @property
    def view(self) -> sql.Identifier:
        return self.ident(self.spec.store_schema, self.spec.view_name)

    @property
    def queue(self) -> sql.Identifier:
        return self.ident("vectorsync", self.spec.queue_name)

    def key_list(self, alias: str | None = None) -> sql.Composed:
        return sql.SQL(", ").join(self._col(alias, c.name) for c in self.key)

    def key_json(self, alias: str | None = None) -> sql.Composed:
        """The canonical key: a jsonb array of the key's values, as the change log stores it."""
        return sql.SQL("jsonb_build_array({})").format(self.key_list(alias))

    def bucket_expr(self, alias: str | None = None) -> sql.Composed:
        """Each row's bucket, as vectorsync.bucket_of gives it for the row's jsonb key, computed
        from the typed column where that function's rules allow: an int2/int4/int8 key of up to
        18 digits hashes as int8, a text or varchar key as text (sql/functions/bucket_of.sql).
        Hashing a jsonb key per row was a large part of the capture triggers' cost."""
        buckets = sql.Literal(self.spec.buckets)
        hashed: sql.Composable | None = None
        if len(self.key) == 1:
            column = self._col(alias, self.key[0].name)
            oid = self.key[0].type_oid
            if oid in (INT2_OID, INT4_OID):
                hashed = sql.SQL("hashint8extended({}::int8, 0)").format(column)
            elif oid == INT8_OID:
                hashed = sql.SQL(
                    "CASE WHEN {c} BETWEEN -999999999999999999 AND 999999999999999999 "
                    "THEN hashint8extended({c}, 0) ELSE jsonb_hash_extended(jsonb_build_array({c}), 0) END"
                ).format(c=column)
            elif oid in (TEXT_OID, VARCHAR_OID):
                hashed = sql.SQL('hashtextextended({}::text COLLATE "C", 0)').format(column)
        if hashed is None:
            return sql.SQL("vectorsync.bucket_of({}, {})").format(self.key_json(alias), buckets)
        # mod(), not %, which psycopg would read as a placeholder in a statement with parameters.
        return sql.SQL("mod(({}) & 2147483647, {})::int").format(hashed, buckets)

    def key_from_json(self, expression: sql.Composable) -> sql.Composed:
        """Typed key values out of a jsonb key array, for joins against the source or store."""
        return sql.SQL(", ").join(
            sql.SQL("({} ->> {})::{}").format(expression, sql.Literal(i), self.raw(c.type_sql))
            for i, c in enumerate(self.key)
        )

    def key_probe(self) -> sql.SQL:
        """The keys of a key_array parameter, one row u(k) each, for
        `FROM <this> CROSS JOIN LATERAL (SELECT ... FROM t alias WHERE <key_matches> OFFSET 0)`.

        Every keyed lookup is a LATERAL probe per key, fenced by OFFSET 0 so the planner cannot
        turn it into a hash join over the whole table: a store emptied or created just before a
        backfill has no statistics, and that plan then scans the growing store once per page."""
        return sql.SQL("jsonb_array_elements(%s::jsonb) AS u(k)")

    def key_matches(self, alias: str) -> sql.Composed:
        """The typed key columns of `alias` equal to the probed key u.k."""
        return sql.SQL(" AND ").join(
            sql.SQL("{} = (u.k ->> {})::{}").format(self.ident(alias, c.name), sql.Literal(i), self.raw(c.type_sql))
            for i, c in enumerate(self.key)
        )

    def key_equal(self, left: str, right: str) -> sql.Composed:
        return sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(self._col(left, c.name), self._col(right, c.name)) for c in self.key
        )


def key_array(key_jsons: Iterable[str]) -> str:
    """Keys (each a jsonb array's text) as one jsonb array, the parameter of every keyed lookup.
    Joined in Python, with no per-key quoting; keys come back as jsonb's own text, so a key read
    from the source, the store or the log compares equal."""
    return "[" + ",".join(key_jsons) + "]"


class _ParameterSafeIdentifier(sql.Identifier):
    """An identifier whose % are doubled, for a statement executed with parameters."""

    def as_bytes(self, context: Any = None) -> bytes:
        return super().as_bytes(context).replace(b"%", b"%%")


def _check_template(spec: TableSpec, columns: dict[str, Column], origin: str) -> None:
    """A placeholder such as {a:b} means column a formatted with spec b; if the table also has a
    column named 'a:b' the template is ambiguous, and if it has only that one, the user meant it
    but a template cannot name it. Both are refused rather than rendered as the wrong thing."""
    for _, name, format_spec, conversion in parse_template(spec.template or ""):
        if name is None:
            continue
        whole = name + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "")
        if whole == name or whole not in columns:
            continue
        if name in columns:
            raise SpecError(origin, "template", f"placeholder {{{whole}}} is ambiguous: column {name!r} "
                            f"formatted with {whole[len(name):]!r}, or column {whole!r}; rename the column")
        raise SpecError(origin, "template", f"placeholder {{{whole}}} reads as column {name!r} with a format "
                        f"spec; a column whose name holds any of {TEMPLATE_SYNTAX!r} cannot be named in a "
                        "template: list it in `columns` and drop `template`")


def resolve(conn: psycopg.Connection, spec: TableSpec, origin: str = "<python>") -> ResolvedTable:
    """Check a declaration against the database, before any DDL runs."""
    src = spec.source
    oid = conn.execute(
        """SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')""",
        (src.schema_, src.table),
    ).fetchone()
    if oid is None:
        raise SpecError(origin, "source", f"table {src.qualified} does not exist")
    rows = conn.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int,
                  EXISTS (SELECT 1 FROM pg_operator o
                          WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid),
                  coalesce((SELECT quote_ident(n.nspname) || '.' || quote_ident(p.proname)
                            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE p.oid = t.typsend), '-')
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
        (oid[0],),
    ).fetchall()
    columns = {row[0]: Column(*row) for row in rows}

    pk_names = spec.primary_key
    field = "primary_key"
    if pk_names is None:
        field = "source"
        found = conn.execute(
            """SELECT array_agg(a.attname ORDER BY k.ord)
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE i.indrelid = %s AND i.indisprimary""",
            (oid[0],),
        ).fetchone()
        if not found or not found[0]:
            raise SpecError(
                origin, "primary_key",
                f"table {src.qualified} has no primary key; add one or name unique, non-null "
                "columns in `primary_key`",
            )
        pk_names = list(found[0])
    missing = [c for c in pk_names if c not in columns]
    if missing:
        raise SpecError(origin, field, f"table {src.qualified} has no column {missing[0]!r}")
    clash = [c for c in pk_names if c in STORE_COLUMNS]
    if clash:
        raise SpecError(origin, field, f"key column {clash[0]!r} clashes with a store column; "
                        "rename it or set a different primary_key")
    unsendable = [c for c in pk_names if columns[c].send_function == "-"]
    if unsendable:
        raise SpecError(origin, field, f"key column {unsendable[0]!r} of {src.qualified} has type "
                        f"{columns[unsendable[0]].type_sql}, which has no binary form to copy it by")
    if spec.template is not None:
        _check_template(spec, columns, origin)
    missing = [c for c in spec.text_columns if c not in columns]
    if missing:
        where = "columns" if spec.columns is not None else "template"
        raise SpecError(origin, where, f"table {src.qualified} has no column {missing[0]!r}")
    clash = [c for c in columns if c in VIEW_COLUMNS]
    if clash:
        raise SpecError(origin, "source", f"column {clash[0]!r} of {src.qualified} clashes with a "
                        "column the embeddings view adds")
    # Checked here rather than left to the index DDL, whose error would name neither file nor field.
    # An unqualified name must be a built-in one: vectorsync.hybrid_search resolves it with only
    # pg_catalog on its search_path, so a configuration of another schema needs that schema's name.
    ts_schema, _, ts_name = spec.text_search_config.rpartition(".")
    if not conn.execute(
        """SELECT 1 FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
           WHERE c.cfgname = %s AND n.nspname = %s""",
        (ts_name, ts_schema or "pg_catalog"),
    ).fetchone():
        hint = "" if ts_schema else "; a configuration outside pg_catalog needs its schema, e.g. public.my_config"
        raise SpecError(origin, "text_search_config", f"no text search configuration "
                        f"{spec.text_search_config!r} in the database (see \\dF in psql){hint}")
    return ResolvedTable(
        spec=spec,
        origin=origin,
        key=tuple(columns[c] for c in pk_names),
        text_columns=tuple(columns[c] for c in spec.text_columns),
        all_columns=tuple(columns.values()),
    )
