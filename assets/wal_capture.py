"""Change capture from the write-ahead log (`capture: logical`). Free of Dagster.

Why: the capture triggers copy every changed row into transition tables and join old with new rows
inside the writer's statement: 1.45-1.74x the statement's time on bulk writes (`python -m bench b`),
and 1.23-1.31x for the transition tables alone, before any query runs. With logical decoding the
writer pays only for wal_level=logical (0.95-1.02x in the same benchmark); the keys are read back
from the WAL afterwards, off the writer's path, by whoever next looks at the table's changes (the
tables sensor, a run, continuous mode).

How: one publication (FOR TABLE the source) and one logical replication slot (pgoutput) per table,
both named vectorsync_<name>. `drain` peeks the slot's changes up to a bound, writes their keys to
the change log of every live model version in one transaction, and advances the slot only after
that commit: a crash in between logs the same keys again (harmless: a key is processed as often as
it is logged), never loses one. A statement-level trigger without transition tables stays on the
table to send the NOTIFY that wakes continuous mode (sql/table/capture_wake.sql).

What it needs: wal_level=logical, and the table's key as its replica identity (its primary key, or
REPLICA IDENTITY USING INDEX on the key's unique index), since a DELETE carries only those columns.
What it costs elsewhere: an UPDATE of a column the text does not use is logged too (the WAL does not
carry the old row); the run then finds the text unchanged and sends nothing. A slot nobody drains
keeps WAL; a slot PostgreSQL invalidated (max_slot_wal_keep_size) or that vanished has lost changes,
so `drain` recreates it and asks for a sweep of every bucket (the sweep compares every row).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import versions
from .catalog import ResolvedTable, resolve, use_key_text_settings
from .names import slot_name
from .pgoutput import Decoded, parse_messages
from .spec import SpecError, TableSpec
# slot_state is table_ddl's (it decides which triggers install_capture writes); callers of this
# module find it here too.
from .table_ddl import fan_out, slot_state, triggers_capture

PLUGIN = "pgoutput"
# Changes per peek: a transaction is never split, so one bigger than this is read whole.
MAX_CHANGES = 200_000
# Keys per INSERT into the change logs: bounds the statement's parameters.
KEYS_PER_STATEMENT = 50_000
# The advisory-lock class of drains (an arbitrary constant of ours, beside the bucket locks'
# hashtext keys): one drain of a slot at a time, across processes.
DRAIN_LOCK_CLASS = 7_311_005


# Preparing and leaving ------------------------------------------------------------------------


def check_ready(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """Refuse `capture: logical` where it cannot work, naming the declaration and the field."""
    spec = table.spec
    level = conn.execute("SHOW wal_level").fetchone()[0]
    if level != "logical":
        raise SpecError(table.origin, "capture", f"`logical` needs the server's wal_level = logical (it is "
                        f"{level}): ALTER SYSTEM SET wal_level = logical and restart PostgreSQL, or "
                        "declare `capture: triggers`")
    identity, columns = conn.execute(
        """SELECT c.relreplident::text,
                  ARRAY(SELECT a.attname::text FROM pg_index i
                        CROSS JOIN LATERAL unnest(i.indkey) k(attnum)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                        WHERE i.indrelid = c.oid
                          AND ((c.relreplident = 'd' AND i.indisprimary)
                               OR (c.relreplident = 'i' AND i.indisreplident)))
           FROM pg_class c WHERE c.oid = to_regclass(%s)""",
        (table.source.as_string(conn),),
    ).fetchone()
    key = [c.name for c in table.key]
    if identity != "f" and sorted(columns) != sorted(key):
        found = f"the replica identity is ({', '.join(columns)})" if columns else "the table has no replica identity"
        raise SpecError(table.origin, "capture", f"`logical` needs the key ({', '.join(key)}) to be "
                        f"{spec.source.qualified}'s replica identity, and {found}: a DELETE in the WAL carries "
                        "only those columns. Make the key the primary key or ALTER TABLE ... REPLICA IDENTITY "
                        "USING INDEX on its unique index, or declare `capture: triggers`")


def create_publication(conn: psycopg.Connection, table: ResolvedTable) -> None:
    """The publication of the source table (in the caller's transaction). It must be committed
    before the slot is created: a slot cannot decode with a publication younger than itself."""
    name = sql.Identifier(slot_name(table.spec.name))
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (slot_name(table.spec.name),)).fetchone():
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(name, table.source))
    else:
        # Through the root of a partitioned table: a row moving between partitions is a DELETE
        # and an INSERT of the table declared, not changes of partitions nobody declared.
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate', "
                             "publish_via_partition_root = true)").format(name, table.source))


@dataclass(frozen=True)
class SlotHealth:
    slot: str
    state: str | None  # as slot_state
    retained_bytes: int  # WAL kept for the slot (from its restart point)
    undrained_bytes: int  # WAL not yet confirmed drained


def slot_health(conn: psycopg.Connection, table_name: str) -> SlotHealth:
    """What the capture_slot check reports."""
    found = conn.execute(
        """SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
           FROM pg_replication_slots WHERE slot_name = %s""", (slot_name(table_name),),
    ).fetchone() or (0, 0)
    return SlotHealth(slot_name(table_name), slot_state(conn, table_name), found[0] or 0, found[1] or 0)


def create_slot(conn: psycopg.Connection, table_name: str) -> bool:
    """Create the slot if missing (autocommit: PostgreSQL refuses it in a transaction that wrote;
    it waits for transactions in progress to end). Returns whether it was created."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError(f"table {table_name}: a replication slot is created outside any transaction")
    state = slot_state(conn, table_name)
    if state == "ok":
        return False
    if state == "lost":
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name(table_name),))
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot_name(table_name), PLUGIN))
    except psycopg.errors.DuplicateObject:
        return False  # created meanwhile by a drain (drain_table) or another install
    return True


def drop_slot_and_publication(conn: psycopg.Connection, table_name: str) -> None:
    """Stop decoding for the table (after its triggers capture again, and a last drain)."""
    name = slot_name(table_name)
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,))
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


# Draining --------------------------------------------------------------------------------------


def capture_mode(conn: psycopg.Connection, table_name: str) -> str:
    """How the installed table captures its changes: 'triggers' or 'logical' (as last installed)."""
    found = conn.execute(
        "SELECT coalesce(spec ->> 'capture', 'triggers') FROM vectorsync.embedding_tables WHERE name = %s",
        (table_name,),
    ).fetchone()
    return found[0] if found else "triggers"


def drain_table(conn: psycopg.Connection, table: ResolvedTable) -> int | None:
    """`drain` into the change log of every live version, when the installed table captures from
    the WAL; 0 for a table whose triggers capture (they log in the writer's transaction)."""
    if capture_mode(conn, table.spec.name) != "logical":
        return 0
    return _drain_live(conn, table)


def drain_declared(conn: psycopg.Connection, spec: TableSpec) -> int | None:
    """`drain_table` for a declaration, resolved only when the installed table captures from the
    WAL (the tables sensor's tick, which has the declaration alone)."""
    if capture_mode(conn, spec.name) != "logical":
        return 0
    return _drain_live(conn, resolve(conn, spec))


def _drain_live(conn: psycopg.Connection, table: ResolvedTable) -> int | None:
    queues = [table.ident("vectorsync", v.queue_table) for v in versions.versions(conn, table.spec.name)]
    return drain(conn, table, queues or [table.queue])


def drain(conn: psycopg.Connection, table: ResolvedTable, live_queues: Iterable[sql.Composable]) -> int | None:
    """Move what the slot decoded into the change logs `live_queues`: returns the keys logged, or
    None when another drain holds the slot (its keys reach the logs as soon as it commits).
    Needs an autocommit connection with no transaction open."""
    queues = list(live_queues)
    name = table.spec.name
    if not conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (DRAIN_LOCK_CLASS, name)).fetchone()[0]:
        return None
    try:
        if slot_state(conn, name) != "ok":
            # Changes since the slot was lost (or dropped) are nowhere, unless the full capture
            # triggers were logging them meanwhile: a sweep of every bucket finds them.
            create_slot(conn, name)
            if not triggers_capture(conn, table):
                with conn.transaction():
                    log_sweep(conn, table, queues)
        logged = 0
        # What was committed when the drain began; later commits are the next drain's, so a drain
        # ends however fast writers write.
        bound = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]
        while True:
            with conn.transaction():
                # The keys' text as the engine prints them: decoding runs the types' output functions
                # in this session (time zones, float digits).
                use_key_text_settings(conn, local=True)
                decoded = _peek(conn, table, bound)
                if decoded.truncated:
                    log_sweep(conn, table, queues)
                _log_keys(conn, table, queues, decoded.keys)
            logged += len(decoded.keys)
            full = decoded.messages >= MAX_CHANGES
            # Every transaction that committed before `bound` was read, unless the peek stopped at
            # MAX_CHANGES: then only up to the end of the last one it read.
            upto = decoded.last_end if full else bound
            if upto is not None:
                conn.execute(
                    """SELECT pg_replication_slot_advance(slot_name, greatest(%s::pg_lsn, confirmed_flush_lsn))
                       FROM pg_replication_slots WHERE slot_name = %s""",
                    (upto, slot_name(name)),
                )
            if not full:
                return logged
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (DRAIN_LOCK_CLASS, name))


def _peek(conn: psycopg.Connection, table: ResolvedTable, bound: str) -> Decoded:
    decoded = Decoded()
    with conn.cursor(name=f"vectorsync_drain_{table.spec.name}") as cur:
        cur.itersize = 500  # rows carry whole new rows (a 90,000-character text is 90 kB): bounded memory
        cur.execute(
            """SELECT data FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, %s,
                   'proto_version', '1', 'publication_names', %s)""",
            (slot_name(table.spec.name), bound, MAX_CHANGES, slot_name(table.spec.name)),
        )
        parse_messages((bytes(data) for (data,) in cur), [c.name for c in table.key], decoded)
    return decoded


def _log_keys(conn: psycopg.Connection, table: ResolvedTable, queues: list[sql.Composable],
              keys: list[tuple[str, ...]]) -> None:
    """Log keys given as text in every live change log, one entry per bucket and statement, as
    the capture trigger does: the texts are cast to the key's types, then made into the canonical
    jsonb key and bucket by the same expressions the trigger uses."""
    if not keys:
        return
    t = table.with_parameters()
    columns = sql.SQL(", ").join(
        sql.SQL("CAST({} AS {}) AS {}").format(sql.Identifier(f"k{i}"), t.raw(c.type_sql), t.ident(c.name))
        for i, c in enumerate(t.key)
    )
    arrays = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in t.key)
    aliases = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(t.key)))
    statement = sql.SQL(
        "WITH n AS (SELECT {columns} FROM unnest({arrays}) AS r({aliases})), "
        "c(bucket, row_keys) AS (SELECT {bucket}, array_agg({key}) FROM n GROUP BY 1) {fan_out}"
    ).format(columns=columns, arrays=arrays, aliases=aliases, bucket=t.bucket_expr("n"), key=t.key_json("n"),
             fan_out=fan_out(queues))
    for start in range(0, len(keys), KEYS_PER_STATEMENT):
        part = keys[start:start + KEYS_PER_STATEMENT]
        conn.execute(statement, [list(column) for column in zip(*part)])


def log_sweep(conn: psycopg.Connection, table: ResolvedTable, queues: list[sql.Composable]) -> None:
    """A sweep request for every bucket in every live change log (what a TRUNCATE logs)."""
    for queue in queues:
        conn.execute(sql.SQL("INSERT INTO {} (bucket, row_keys) SELECT b, NULL FROM generate_series(0, {} - 1) b")
                     .format(queue, sql.Literal(table.spec.buckets)))
