"""Golden queries of one table: each query with the source rows that answer it. Free of Dagster.

A set comes from a small file, YAML or JSON Lines:

    queries:                                   # YAML; a bare list of entries works too
      - query: delete a directory and everything inside it
        expected: shutil.rmtree                # one key of a one-column primary key
      - query: copy one file to another
        expected: [shutil.copyfile, shutil.copy]   # several answers
      - query: the second line of order 7
        expected: [[7, 2]]                     # a composite key: a list of its values

    {"query": "copy one file to another", "expected": ["shutil.copyfile", "shutil.copy"]}   # .jsonl

or from a SQL query yielding (query text, expected key) rows, one row per answer, where a key is
a jsonb array of the key's values (or a plain value for a one-column key). Every key becomes the
text of a jsonb array, as the store and search print keys: '["shutil.rmtree"]'.

A set is validated as it is loaded (an empty set, a repeated query, a key of the wrong arity are
refused, naming `file: line N`), and `check_answers` checks it against the source table: a
golden answer whose row is gone is reported and left out, never scored as a miss of the search.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from .catalog import ResolvedTable

FIELDS = {"query", "expected", "note"}  # note: free text, e.g. how the answer was checked


class GoldenError(ValueError):
    """A golden set that cannot be used, naming its file (or query) and the line or entry."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source, self.where, self.message = source, where, message
        super().__init__(f"{source}: {where}: {message}" if where else f"{source}: {message}")


@dataclass(frozen=True)
class GoldenQuery:
    query: str
    expected: tuple[str, ...]  # keys as jsonb arrays' text, e.g. '["shutil.rmtree"]'
    where: str  # "line 12" or "row 3", for messages


@dataclass(frozen=True)
class GoldenSet:
    source: str  # the file, or "sql"
    queries: tuple[GoldenQuery, ...]


@dataclass(frozen=True)
class MissingAnswer:
    where: str
    query: str
    key: str


@dataclass(frozen=True)
class AnswerCheck:
    """`golden` holds only the answers whose row exists, spelled as the source prints its key;
    a query none of whose answers is left is dropped. `missing` lists what was left out."""

    golden: GoldenSet
    missing: tuple[MissingAnswer, ...]

    def describe(self) -> list[str]:
        return [f"{self.golden.source}: {m.where}: query {m.query!r}: expected row {m.key} is not in the source "
                "table any more" for m in self.missing]


def key_text(values: Sequence[Any]) -> str:
    """A key as the text of a jsonb array (the form the store and search give keys in)."""
    return json.dumps(list(values), ensure_ascii=False)


def same_key(text: str) -> str:
    """One spelling of a key's json text, whatever spacing or escapes it was written with."""
    return json.dumps(json.loads(text), ensure_ascii=False)


def load_golden(path: Path | str, key_columns: Sequence[str] | None = None) -> GoldenSet:
    """A golden set from a YAML (.yaml, .yml) or JSON Lines (.jsonl) file. With `key_columns`
    (the table's primary key), every key must have that many values."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GoldenError(source, "", f"cannot read it: {exc.strerror or exc}") from None
    if path.suffix in (".yaml", ".yml"):
        entries = _yaml_entries(source, text)
    elif path.suffix == ".jsonl":
        entries = _jsonl_entries(source, text)
    else:
        raise GoldenError(source, "", "a golden set is a .yaml, .yml or .jsonl file")
    return _golden(source, entries, key_columns)


def golden_from_sql(
    conn: psycopg.Connection, query: str, key_columns: Sequence[str] | None = None, source: str = "sql"
) -> GoldenSet:
    """A golden set from a query yielding (query text, expected key) rows, one row per answer: rows
    of one query text make one golden query. A key is a jsonb (or json, or its text) array of the
    key's values, or a plain value for a one-column key."""
    by_query: dict[str, dict[str, Any]] = {}
    try:
        rows = conn.execute(query).fetchall()  # type: ignore[arg-type]  # the user's own query
    except psycopg.Error as exc:
        raise GoldenError(source, "", f"the golden query failed: {exc}") from None
    for n, row in enumerate(rows, 1):
        if len(row) != 2:
            raise GoldenError(source, f"row {n}", f"give 2 columns (query text, expected key), not {len(row)}")
        text, key = row
        if isinstance(key, str):
            try:
                key = json.loads(key)
            except ValueError:
                pass  # not JSON: a plain value of a one-column key
        # One row is one key: a plain value is a key of one column.
        entry = by_query.setdefault(text, {"query": text, "expected": [], "_where": f"row {n}"})
        entry["expected"].append(key if isinstance(key, list) else [key])
    return _golden(source, [(e.pop("_where"), e) for e in by_query.values()], key_columns)


def check_answers(conn: psycopg.Connection, table: ResolvedTable, golden: GoldenSet) -> AnswerCheck:
    """Look every expected key up in the source table. A key that is not a valid value of its
    column's type is an error naming the query and key; a key whose row is gone is reported."""
    columns = [c.name for c in table.key]
    keys = list(dict.fromkeys(k for q in golden.queries for k in q.expected))
    for q in golden.queries:
        for k in q.expected:
            _check_arity(golden.source, q.where, json.loads(k), columns)
    t = table.with_parameters()
    statement = sql.SQL(
        "SELECT (SELECT {}::text FROM {} s WHERE {}) FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS u(k, i) "
        "ORDER BY u.i"
    ).format(t.key_json("s"), t.source, t.key_matches("s"))
    try:
        with conn.transaction():
            found = [r[0] for r in conn.execute(statement, ("[" + ",".join(keys) + "]",))]
    except psycopg.DataError:
        # Which key? One at a time, to name it (a golden set is small).
        for q in golden.queries:
            for k in q.expected:
                try:
                    with conn.transaction():
                        conn.execute(statement, (f"[{k}]",))
                except psycopg.DataError as exc:
                    raise GoldenError(golden.source, q.where, f"query {q.query!r}: expected key {k} does not fit "
                                      f"the key ({', '.join(columns)}) of {table.spec.source.qualified}: "
                                      f"{exc.diag.message_primary or exc}") from None
        raise
    as_stored = dict(zip(keys, found))
    queries, missing = [], []
    for q in golden.queries:
        present = tuple(as_stored[k] for k in q.expected if as_stored[k] is not None)
        missing += [MissingAnswer(q.where, q.query, k) for k in q.expected if as_stored[k] is None]
        if present:
            queries.append(replace(q, expected=present))
    return AnswerCheck(GoldenSet(golden.source, tuple(queries)), tuple(missing))


def _yaml_entries(source: str, text: str) -> list[tuple[str, Any]]:
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader that records lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise GoldenError(source, where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if isinstance(data, dict):
        data.pop("__line__", None)
        unknown = set(data) - {"queries"}
        if unknown:
            raise GoldenError(source, "", f"unknown field {sorted(unknown)[0]!r}; the file holds `queries:`")
        data = data.get("queries")
    if data is None:
        data = []
    if not isinstance(data, list):
        raise GoldenError(source, "queries", "must be a list of {query, expected} entries")
    entries = []
    for n, entry in enumerate(data, 1):
        line = entry.pop("__line__", None) if isinstance(entry, dict) else None
        entries.append((f"line {line}" if line else f"entry {n}", entry))
    return entries


def _jsonl_entries(source: str, text: str) -> list[tuple[str, Any]]:
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {n}", json.loads(line)))
        except ValueError as exc:
            raise GoldenError(source, f"line {n}", f"not valid JSON: {exc}") from None
    return entries


def _golden(
    source: str, entries: Iterable[tuple[str, Any]], key_columns: Sequence[str] | None
) -> GoldenSet:
    queries: list[GoldenQuery] = []
    seen: dict[str, str] = {}
    arity: tuple[int, str] | None = None  # the first key's arity, when the table's is not given
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise GoldenError(source, where, "an entry is a mapping with `query` and `expected`")
        unknown = set(entry) - FIELDS
        if unknown:
            raise GoldenError(source, where, f"unknown field {sorted(unknown)[0]!r}; use query, expected and note")
        query = entry.get("query")
        if not isinstance(query, str) or not query.strip():
            raise GoldenError(source, where, "`query` must be a non-empty text")
        folded = " ".join(query.split()).casefold()
        if folded in seen:
            raise GoldenError(source, where, f"query {query!r} repeats the query of {seen[folded]}")
        seen[folded] = where
        keys = _keys(source, where, query, entry.get("expected"))
        for key in keys:
            if key_columns is not None:
                _check_arity(source, where, key, key_columns)
            elif arity is None:
                arity = (len(key), where)
            elif len(key) != arity[0]:
                raise GoldenError(source, where, f"query {query!r}: key {key_text(key)} has {_values(len(key))}, "
                                  f"the key at {arity[1]} has {arity[0]}")
        texts = [key_text(k) for k in keys]
        if len(set(texts)) != len(texts):
            raise GoldenError(source, where, f"query {query!r}: an expected key is listed twice")
        queries.append(GoldenQuery(query, tuple(texts), where))
    if not queries:
        raise GoldenError(source, "", "the golden set is empty: give at least one query with its expected key")
    return GoldenSet(source, tuple(queries))


def _keys(source: str, where: str, query: str, expected: Any) -> list[list[Any]]:
    """The expected keys of one entry: a plain value is one key of one column; a list holds
    several keys, each a value or a list of a composite key's values."""
    if expected is None or expected == [] or expected == "":
        raise GoldenError(source, where, f"query {query!r}: `expected` must name at least one key")
    items = expected if isinstance(expected, list) else [expected]
    keys = []
    for item in items:
        key = item if isinstance(item, list) else [item]
        bad = [v for v in key if v is None or isinstance(v, dict | list)]
        if not key or bad:
            raise GoldenError(source, where, f"query {query!r}: a key's values are texts or numbers, not "
                              f"{json.dumps(bad[0]) if bad else 'an empty list'}")
        keys.append(key)
    return keys


def _check_arity(source: str, where: str, key: list[Any], columns: Sequence[str]) -> None:
    if len(key) != len(columns):
        hint = f"; write a composite key as a list: [{', '.join(columns)}]" if len(key) == 1 else ""
        raise GoldenError(source, where, f"key {key_text(key)} has {_values(len(key))}, the table's key "
                          f"({', '.join(columns)}) has {len(columns)}{hint}")


def _values(n: int) -> str:
    return f"{n} value" if n == 1 else f"{n} values"


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that notes each mapping's line, so errors can name it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping
