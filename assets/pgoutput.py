"""pgoutput's messages (logical replication protocol version 1), as
pg_logical_slot_peek_binary_changes returns them: only what change capture needs, the keys of the
rows each change touched and whether a TRUNCATE came. Free of Dagster and of the database.

A Relation message ('R') names a relation's columns before its first change in each decoding
session; an Insert ('I') carries the new row ('N'), a Delete ('D') the old key ('K', or the whole
old row 'O' under REPLICA IDENTITY FULL), an Update ('U') the new row after the old key when the
key changed; a Commit ('C') the end of its transaction in the WAL. Values come as text, printed by
the types' output functions in the decoding session.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Decoded:
    """What one peek found: the keys to log (each a tuple of key texts), whether a TRUNCATE came,
    and where the last transaction read ended."""

    keys: list[tuple[str, ...]] = field(default_factory=list)
    truncated: bool = False
    last_end: str | None = None
    messages: int = 0


def parse_messages(messages: Iterator[bytes], key_names: list[str], into: Decoded) -> None:
    """Collect the keys of inserted, updated (old and new key when it changed) and deleted rows,
    and TRUNCATEs, of the one table the publication holds. Other messages are skipped."""
    key_positions: dict[int, list[int]] = {}  # relation oid -> the key columns' positions
    for data in messages:
        into.messages += 1
        kind = data[0:1]
        if kind == b"R":
            relid = struct.unpack_from("!I", data, 1)[0]
            key_positions[relid] = _key_positions(data, key_names)
        elif kind in (b"I", b"U", b"D"):
            relid = struct.unpack_from("!I", data, 1)[0]
            positions = key_positions[relid]
            # An INSERT's new row ('N'); a DELETE's old key ('K', or the old row 'O' under
            # REPLICA IDENTITY FULL); an UPDATE's new row, after its old key when the key changed.
            offset, keys = 5, []
            while offset < len(data):
                values, offset = _tuple(data, offset + 1)
                key = tuple(values[p] for p in positions)
                if None in key:
                    raise ValueError(f"a decoded change of relation {relid} has no value for a key column")
                if key not in keys:
                    keys.append(key)
            into.keys.extend(keys)  # type: ignore[arg-type]
        elif kind == b"T":
            into.truncated = True
        elif kind == b"C":
            # flags (1 byte), the commit's LSN, then the transaction's end LSN.
            end = struct.unpack_from("!Q", data, 10)[0]
            into.last_end = f"{end >> 32:X}/{end & 0xFFFFFFFF:X}"


def _key_positions(data: bytes, key_names: list[str]) -> list[int]:
    """The positions of `key_names` among a Relation message's columns."""
    offset = 5
    for _ in range(2):  # namespace and relation name, each NUL-terminated
        offset = data.index(b"\0", offset) + 1
    offset += 1  # replica identity setting
    count = struct.unpack_from("!H", data, offset)[0]
    offset += 2
    names = []
    for _ in range(count):
        end = data.index(b"\0", offset + 1)
        names.append(data[offset + 1:end].decode())
        offset = end + 1 + 8  # type oid and type modifier
    missing = [k for k in key_names if k not in names]
    if missing:
        raise ValueError(f"the decoded relation has no column {missing[0]!r}")
    return [names.index(k) for k in key_names]


def _tuple(data: bytes, offset: int) -> tuple[list[str | None], int]:
    """A TupleData: each column's text (None for NULL, an unchanged TOAST value or binary)."""
    count = struct.unpack_from("!H", data, offset)[0]
    offset += 2
    values: list[str | None] = []
    for _ in range(count):
        kind = data[offset]
        offset += 1
        if kind in (0x74, 0x62):  # 't' text, 'b' binary
            length = struct.unpack_from("!I", data, offset)[0]
            offset += 4
            values.append(data[offset:offset + length].decode() if kind == 0x74 else None)
            offset += length
        else:  # 'n' NULL, 'u' unchanged TOAST value
            values.append(None)
    return values, offset
