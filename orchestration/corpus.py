"""The demo corpus: Python's own documentation, loaded into a PostgreSQL table.

Everything comes from the running interpreter, so the demo needs no download and no data files:

* ``pydoc_data.topics.topics`` — the language reference topics that ``help('assert')`` shows
  (kind ``topic``, doc_id ``topic:<key>`` because keys such as ``types`` or ``string`` would
  otherwise collide with module names);
* the docstrings of the standard library — each public module (kind ``module``) and its public
  top-level functions (``function``), classes (``class``) and exception classes (``exception``),
  ``builtins`` first so that ``builtins.open`` is the home of ``open``.

The rows are deterministic for a given interpreter (sorted, memory addresses scrubbed from
signatures), so reloading is a no-op: :func:`load_python_docs` only writes rows that differ, and
when nothing differs it issues no INSERT at all, so the table's statement-level change-capture
triggers do not even fire.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from types import ModuleType

import psycopg
from psycopg import sql

# Top-level modules never imported: they open a browser or print ('antigravity', 'this'), need a
# display or start GUI code ('tkinter', 'turtle', 'turtledemo', 'idlelib'), are tooling that
# installs things or is slow and noisy ('ensurepip', 'venv', 'lib2to3', 'pydoc', 'test'), touch
# the terminal or the process's readline state on import ('readline', 'rlcompleter'), or would be
# the setuptools shim rather than the stdlib inside a virtualenv ('distutils'). 'posixpath' and
# 'genericpath' are documented under their public name, 'os.path' (see MODULE_ALIASES).
SKIPPED_MODULES = frozenset(
    {
        "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
        "ensurepip", "venv", "pydoc", "test", "readline", "rlcompleter", "distutils",
        "posixpath", "genericpath", "ntpath" if sys.platform == "win32" else "",
    }
) - {""}

# Packages whose submodules are not walked: 'encodings' holds ~120 generated codec tables whose
# docstrings are boilerplate and would drown the corpus.
UNWALKED_PACKAGES = frozenset({"encodings"})

# Submodule name components that mark test suites shipped inside packages (ctypes.test,
# unittest.test, ...): skipped like the top-level 'test' package.
TEST_COMPONENTS = frozenset({"test", "tests", "idle_test"})

# Where an object's ``__module__`` is an implementation module, the public module users know it
# by. Private C accelerators ('_io', '_pickle', ...) are handled generically by dropping the
# underscore; these are the cases that rule does not cover.
MODULE_ALIASES = {
    "posix": "os",
    "nt": "os",
    "posixpath": "os.path",
    "ntpath": "os.path" if sys.platform == "win32" else "ntpath",
    "genericpath": "os.path",
    "_collections_abc": "collections.abc",
    "_pydecimal": "decimal",
    "_decimal": "decimal",
    "_pydatetime": "datetime",
}

# Default values in signatures can print as '<object object at 0x7f...>': scrub the address so
# titles are identical from one process to the next (otherwise every reload would "change" them).
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Longer default reprs are shown as '...': they are data (tables, environments), not API.
MAX_DEFAULT_REPR = 80


@dataclass(frozen=True)
class DocRow:
    doc_id: str
    kind: str  # 'topic', 'module', 'function', 'class' or 'exception'
    title: str
    body: str


def python_docs_rows(limit: int | None = None) -> list[DocRow]:
    """The corpus, in a deterministic order: topics (sorted by key), then ``builtins``, then every
    other documented module in name order, each module row followed by its members in name
    order. ``limit`` keeps the first rows of that order (importing nothing if the topics
    suffice)."""
    rows: list[DocRow] = []
    seen: set[str] = set()
    if limit is not None and limit <= 0:
        return rows
    for row in _iter_rows():
        # Module and member ids cannot normally collide, but the upsert fails outright on a
        # duplicate key in one statement, so guarantee uniqueness here.
        if row.doc_id in seen:
            continue
        seen.add(row.doc_id)
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _iter_rows() -> Iterator[DocRow]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        body = _clean(topics[key])
        if body:
            yield DocRow(f"topic:{key}", "topic", key, body)

    modules = _import_modules()
    exposed = _exposure_index(modules)
    emitted: set[int] = set()
    for mod_name, module in modules.items():
        doc = _clean(inspect.getdoc(module))
        if doc and mod_name != "builtins":  # builtins' docstring is just a note about itself
            yield DocRow(mod_name, "module", mod_name, doc)
        for name, obj in _public_members(module):
            if id(obj) in emitted or _home(obj, modules, exposed) not in (mod_name, None):
                # Reached from another module: documented once, at its canonical home.
                continue
            doc = _own_doc(obj)
            if not doc:
                continue
            emitted.add(id(obj))
            qualified = f"{mod_name}.{name}"
            kind = _kind(obj)
            title = qualified + _signature(obj)
            yield DocRow(qualified, kind, title, doc)


def _import_modules() -> dict[str, ModuleType]:
    """Every documentable stdlib module by public dotted name, builtins first then sorted."""
    names = sorted(
        n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIPPED_MODULES
    )
    names.remove("builtins")
    modules: dict[str, ModuleType] = {"builtins": sys.modules["builtins"]}
    for name in names + ["os.path"]:
        module = _safe_import(name)
        if module is None:
            continue
        modules[name] = module
        if hasattr(module, "__path__") and name not in UNWALKED_PACKAGES:
            for sub in _walk_package(module, name):
                modules[sub.__name__] = sub
    return dict(sorted(modules.items(), key=lambda item: (item[0] != "builtins", item[0])))


def _walk_package(package: ModuleType, name: str) -> Iterator[ModuleType]:
    """Public submodules of a stdlib package, recursively, without running any ``__main__``
    (private names are skipped, and ``__main__`` is one)."""
    try:
        found = sorted(pkgutil.iter_modules(package.__path__, name + "."), key=lambda m: m.name)
    except Exception:  # a broken __path__ only costs us this package's submodules
        return
    for info in found:
        last = info.name.rsplit(".", 1)[-1]
        if last.startswith("_") or last in TEST_COMPONENTS:
            continue
        sub = _safe_import(info.name)
        if sub is None:
            continue
        yield sub
        if info.ispkg:
            yield from _walk_package(sub, info.name)


def _safe_import(name: str) -> ModuleType | None:
    """Import ``name`` with stdout/stderr captured and warnings silenced (several modules are
    deprecated and warn on import). A module that raises, or prints anything, is left out:
    printing on import means it does things on import that a corpus builder should not rely on."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except (Exception, SystemExit):  # ImportError on other platforms, missing C libraries, ...
        return None
    if out.getvalue() or err.getvalue():
        return None
    return module


def _public_members(module: ModuleType) -> list[tuple[str, object]]:
    """Public top-level functions and classes: ``__all__`` when the module declares its API,
    otherwise every name without a leading underscore."""
    declared = getattr(module, "__all__", None)
    if isinstance(declared, (list, tuple)) and module.__name__ != "builtins":
        names = [n for n in declared if isinstance(n, str)]
    else:
        names = dir(module)
    members = []
    for name in sorted(set(names)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            members.append((name, obj))
    return members


def _exposure_index(modules: dict[str, ModuleType]) -> dict[str, dict[int, str]]:
    """For each module, which objects (by id) it exposes publicly, and under which name."""
    index: dict[str, dict[int, str]] = {}
    for mod_name, module in modules.items():
        exposed: dict[int, str] = {}
        for name, obj in _public_members(module):
            exposed.setdefault(id(obj), name)
        index[mod_name] = exposed
    return index


def _home(
    obj: object, modules: dict[str, ModuleType], exposed: dict[str, dict[int, str]]
) -> str | None:
    """The module an object is documented under, or None to take the first module that exposes
    it. Builtins always live in ``builtins``. Otherwise start from ``__module__`` (mapped to its
    public name), and prefer the shallowest package above it that re-exports the object, the way
    the Python docs say ``json.JSONDecoder`` and ``asyncio.Queue`` rather than
    ``json.decoder.JSONDecoder`` and ``asyncio.queues.Queue``."""
    if id(obj) in exposed["builtins"]:
        return "builtins"
    origin = getattr(obj, "__module__", None)
    if not isinstance(origin, str):
        return None
    candidates = [MODULE_ALIASES.get(origin, origin)]
    if origin.startswith("_"):
        candidates.append(origin.lstrip("_"))
    for candidate in candidates:
        parts = candidate.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in modules and id(obj) in exposed[prefix]:
                return prefix
    return None


def _own_doc(obj: object) -> str:
    """The object's docstring, cleaned. For classes only a docstring of their own counts:
    ``inspect.getdoc`` would otherwise give every undocumented subclass its base's text."""
    if inspect.isclass(obj) and not isinstance(vars(obj).get("__doc__"), str):
        # Some classes document themselves in __init__ instead (concurrent.futures'
        # ThreadPoolExecutor): use that if the class defines it itself.
        init = vars(obj).get("__init__")
        return _clean(init.__doc__) if inspect.isfunction(init) and init.__doc__ else ""
    try:
        return _clean(inspect.getdoc(obj))
    except Exception:
        return ""


def _kind(obj: object) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function"


def _signature(obj: object) -> str:
    """``(args)`` when inspect can tell, else nothing (many C functions and types have none)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signature = inspect.signature(obj)
        parameters = [
            p if p.default is p.empty else p.replace(default=_DefaultRepr(p.default))
            for p in signature.parameters.values()
        ]
        text = str(signature.replace(parameters=parameters))
    except Exception:
        return ""
    return _ADDRESS.sub("", text)


class _DefaultRepr:
    """Stands in for a parameter default when printing a signature. Some defaults are live
    objects whose repr is the process's state: ``cgi.parse(environ=os.environ)`` would print the
    whole environment (secrets included) into the title and change whenever it changes."""

    def __init__(self, value: object) -> None:
        if value is os.environ:
            self.text = "os.environ"
        elif isinstance(value, str) and value and value == sys.executable:
            self.text = "sys.executable"  # platform.architecture(): a path of this machine
        else:
            try:
                text = repr(value)
            except Exception:
                text = "..."
            self.text = text if len(text) <= MAX_DEFAULT_REPR else "..."

    def __repr__(self) -> str:
        return self.text


def _clean(text: str | None) -> str:
    # PostgreSQL text cannot hold NUL; no docstring should contain one, but be safe.
    return (text or "").replace("\x00", "\\x00").strip()


def load_python_docs(
    conn: psycopg.Connection,
    schema: str = "public",
    table: str = "python_docs",
    limit: int | None = None,
) -> int:
    """Create ``schema.table`` if missing and upsert the corpus into it, in one transaction.
    Returns how many rows were inserted or changed: 0 when the table already holds exactly
    these rows. Rows no longer in the corpus are left alone (a ``limit`` load must not delete
    the rest)."""
    rows = python_docs_rows(limit)
    target = sql.Identifier(schema, table)
    # A per-load staging table; ON COMMIT DROP cleans it up however the transaction ends.
    staging = sql.Identifier("vectorsync_python_docs_load")
    with conn.transaction():
        conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {target} (
                       doc_id text PRIMARY KEY,
                       kind text NOT NULL,
                       title text NOT NULL,
                       body text NOT NULL,
                       updated_at timestamptz DEFAULT now())"""
            ).format(target=target)
        )
        conn.execute(
            sql.SQL(
                """CREATE TEMPORARY TABLE {staging} (
                       doc_id text PRIMARY KEY, kind text NOT NULL,
                       title text NOT NULL, body text NOT NULL) ON COMMIT DROP"""
            ).format(staging=staging)
        )
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL("COPY {staging} (doc_id, kind, title, body) FROM STDIN").format(
                    staging=staging
                )
            ) as copy:
                for row in rows:
                    copy.write_row(astuple(row))
        # Drop the rows that are already there as they are, so that an unchanged corpus leads
        # to no INSERT at all: the change-capture triggers are statement-level and would fire
        # (and notify) even for an INSERT that touches nothing.
        conn.execute(
            sql.SQL(
                """DELETE FROM {staging} s USING {target} t
                   WHERE t.doc_id = s.doc_id
                     AND (t.kind, t.title, t.body) IS NOT DISTINCT FROM (s.kind, s.title, s.body)"""
            ).format(staging=staging, target=target)
        )
        pending = conn.execute(sql.SQL("SELECT count(*) FROM {staging}").format(staging=staging))
        if pending.fetchone()[0] == 0:
            return 0
        # The WHERE keeps the upsert honest if a concurrent writer already made the same change.
        cur = conn.execute(
            sql.SQL(
                """INSERT INTO {target} AS t (doc_id, kind, title, body)
                   SELECT doc_id, kind, title, body FROM {staging} ORDER BY doc_id
                   ON CONFLICT (doc_id) DO UPDATE
                   SET kind = EXCLUDED.kind, title = EXCLUDED.title, body = EXCLUDED.body,
                       updated_at = now()
                   WHERE (t.kind, t.title, t.body)
                         IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.title, EXCLUDED.body)"""
            ).format(target=target, staging=staging)
        )
        return cur.rowcount
