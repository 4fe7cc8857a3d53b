"""The names of the objects vectorsync creates for a table. Free of Dagster.

PostgreSQL cuts an identifier at 63 bytes, silently: two long names that differ only past that
point become one, and `CREATE INDEX IF NOT EXISTS` then skips the second index without a word.
Every derived name here fits: a name that is short enough is kept as it is (so existing installs
keep their objects), and a longer one is cut at a character boundary and given a hash of the whole
name, so distinct names stay distinct.
"""

from __future__ import annotations

import hashlib

MAX_IDENTIFIER_BYTES = 63
_HASH_CHARS = 8


def fit_identifier(name: str, suffix: str = "") -> str:
    """`name + suffix` if it fits PostgreSQL's 63 bytes; otherwise the head of `name`, '_', 8 hex
    digits of the whole name's hash, and `suffix` kept whole (so `\\d` still shows which index is
    which)."""
    whole = (name + suffix).encode("utf-8")
    if len(whole) <= MAX_IDENTIFIER_BYTES:
        return name + suffix
    digest = hashlib.sha256(whole).hexdigest()[:_HASH_CHARS]
    room = MAX_IDENTIFIER_BYTES - _HASH_CHARS - 1 - len(suffix.encode("utf-8"))
    head = name.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    return f"{head}_{digest}{suffix}"


def fits(name: str) -> bool:
    return len(name.encode("utf-8")) <= MAX_IDENTIFIER_BYTES


def slot_name(name: str) -> str:
    """The logical replication slot and the publication of a table with `capture: logical`
    (a table's name is [a-z][a-z0-9_]{0,39}, so it fits as it is)."""
    return f"vectorsync_{name}"


def table_object_names(name: str, destination: str | None, version: int = 1) -> dict[str, str]:
    """Every object of one declared table, by role. Each is built from the whole, uncut name of
    what it belongs to, then fitted: a cut store name never makes two index names equal.

    Model version 1 keeps the names every install had before versions existed; version N >= 2
    has its own store (`<view>_v<N>_store`) and change log (`changes_<name>_v<N>`) and their
    indexes. The view, the capture function and the triggers belong to the table, not a version."""
    view = destination or f"{name}_embeddings"
    tag = "" if version == 1 else f"_v{version}"
    store = f"{view}{tag}_store"
    queue = f"changes_{name}{tag}"
    trigger = f"vectorsync_{name}"
    parts = {
        "view": (view, ""),
        "store": (view, f"{tag}_store"),
        "hash_index": (store, "_hash"),
        "bucket_index": (store, "_bkt"),
        "fts_index": (store, "_fts"),
        "hnsw_index": (store, "_hnsw"),
        "queue": (queue, ""),
        "queue_bucket_index": (queue, "_bkt"),
        "capture_function": (f"capture_{name}", ""),
        "insert_trigger": (trigger, "_insert"),
        "update_trigger": (trigger, "_update"),
        "delete_trigger": (trigger, "_delete"),
        "truncate_trigger": (trigger, "_truncate"),
    }
    return {role: fit_identifier(base, suffix) for role, (base, suffix) in parts.items()}
