"""The full sweep of some buckets: every source row compared with the store, in one pass in key
order, then the store rows whose source row is gone deleted. Free of Dagster.

It runs in a full run, and when the change log asks for it (a TRUNCATE, an install). The ledger
decides when a failed row is tried again, not the sweep: a dead row, or one not yet due, is left
alone (a change to its text still reaches it through the change log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
from psycopg import sql

from .catalog import ResolvedTable
from .changelog import ChangeLog
from .ledger import FailureLedger
from .source_rows import Row, SourceReader
from .sync_stats import SyncStats, count_by_bucket


class Sweep:
    def __init__(
        self, conn: psycopg.Connection, table: ResolvedTable, source: SourceReader, ledger: FailureLedger,
        changes: ChangeLog,
    ) -> None:
        self.conn, self.table, self.source, self.ledger, self.changes = conn, table, source, ledger, changes
        # One result row per deleted source row (not per chunk), with its bucket.
        self._delete_orphans = sql.SQL(
            "WITH gone AS (DELETE FROM {} e WHERE e.bucket = ANY(%s::int[]) "
            "AND NOT EXISTS (SELECT 1 FROM {} s WHERE {}) RETURNING e.bucket, {} AS k) "
            "SELECT bucket FROM gone GROUP BY bucket, k"
        ).format(table.store, table.source, table.key_equal("s", "e"), table.key_json("e"))
        self.finished = False

    def pages(self, buckets: list[int], should_stop: Callable[[], bool]) -> Iterator[list[Row]]:
        """The source rows of `buckets`, a page at a time, without those the ledger holds back.
        Sets `finished` once every row has been read."""
        self.finished = False
        after: str | None = None
        page_size = self.table.spec.page_size
        while not should_stop():
            rows = self.source.in_key_order(buckets, after, page_size)
            if not rows:
                self.finished = True
                return
            after = rows[-1].key_json
            held = self.ledger.held_back([r.key_json for r in rows])
            if held:
                rows = [r for r in rows if r.key_json not in held]
            if rows:
                yield rows

    def finish(self, buckets: list[int], stats: dict[int, SyncStats], markers: list[int]) -> None:
        """After every page is written: delete what the source no longer has, and clear the sweep
        requests this sweep answered. Not called when the sweep stopped early: its markers stay,
        so the sweep is asked for again."""
        with self.conn.transaction():
            for bucket, n in count_by_bucket(self.conn.execute(self._delete_orphans, (buckets,))).items():
                stats[bucket].rows_deleted += n
            self.ledger.forget_orphans(buckets)
            if markers:
                self.changes.clear(markers, stats.__getitem__)
