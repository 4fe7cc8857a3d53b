"""The change log of one table: what the triggers logged, claimed page by page. Free of Dagster.

An entry is one statement's keys in one bucket (NULL keys: a sweep of the bucket is asked for).
An entry of a bulk statement may hold far more keys than a page: it is paged in slices, and its id
goes with the page of its last key, so it leaves the log only once every key of it is written,
in the transaction that writes that page (Pipeline.write). A run drains only what was logged
before it began: under a steady stream of writes it must end (what comes later is the next
run's, or the lingering loop's next pass).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import ResolvedTable
from .sync_stats import SyncStats


@dataclass
class _Entry:
    """A claimed entry: the keys one statement changed in one bucket."""

    id: int
    bucket: int
    keys: list[str]  # each key as jsonb prints it
    taken: int = 0  # how many of them are in pages already


@dataclass
class ClaimedPage:
    """Keys to process (key json -> bucket) and the ids of the entries this page completes."""

    bucket_of: dict[str, int]
    entry_ids: list[int]


class ChangeLog:
    def __init__(self, conn: psycopg.Connection, table: ResolvedTable) -> None:
        self.conn = conn
        self.table = table
        # The next entries in id order, as many as it takes to reach the last parameter's number
        # of keys (a sweep request counts as one): each entry's keys as jsonb prints them.
        self._claim = sql.SQL(
            """SELECT id, bucket, row_keys::text[]
               FROM (SELECT id, bucket, row_keys,
                            sum(coalesce(cardinality(row_keys), 1)) OVER (ORDER BY id)
                              - coalesce(cardinality(row_keys), 1) AS before
                     FROM (SELECT id, bucket, row_keys FROM {} WHERE bucket = ANY(%s::int[])
                           AND id > %s AND id <= %s ORDER BY id LIMIT %s) AS next) AS counted
               WHERE before < %s ORDER BY id"""
        ).format(table.queue)
        self._sweep_requested = sql.SQL(
            "SELECT DISTINCT bucket FROM {} WHERE bucket = ANY(%s::int[]) AND row_keys IS NULL ORDER BY 1"
        ).format(table.queue)
        self._last = sql.SQL("SELECT max(id) FROM {} WHERE bucket = ANY(%s::int[])").format(table.queue)
        # With each entry's age (queued_at is when the change was logged, in the writer's
        # transaction) and how many keys it held: the commit-to-embedding lag.
        self._delete = sql.SQL(
            "DELETE FROM {} WHERE id = ANY(%s) RETURNING bucket, "
            "extract(epoch FROM clock_timestamp() - queued_at)::float8, coalesce(cardinality(row_keys), 1)"
        ).format(table.queue)

    def sweep_requested(self, buckets: list[int]) -> list[int]:
        """The buckets of `buckets` with a sweep request in the log, ascending."""
        return [b for (b,) in self.conn.execute(self._sweep_requested, (buckets,))]

    def pages(
        self, buckets: list[int], page_size: int, should_stop: Callable[[], bool],
        markers: dict[int, list[int]], load: Callable[[ClaimedPage], object],
    ) -> Iterator[object]:
        """Claim entries of `buckets` page by page and yield `load(page)` for each, called inside
        the claiming transaction (so the rows are read as of the claim). Sweep requests found on
        the way go to `markers` (bucket -> entry ids)."""
        bound = self.conn.execute(self._last, (buckets,)).fetchone()[0]
        if bound is None:
            return
        after = 0
        held: deque[_Entry] = deque()  # claimed entries whose keys are not all paged yet
        exhausted = False
        while not should_stop():
            with self.conn.transaction():
                have = sum(len(e.keys) - e.taken for e in held)
                if have < page_size and not exhausted:
                    claimed = self.conn.execute(
                        self._claim, (buckets, after, bound, page_size, page_size - have)
                    ).fetchall()
                    if claimed:
                        after = claimed[-1][0]
                    else:
                        exhausted = True
                    for i, b, keys in claimed:
                        if keys is None:
                            markers.setdefault(b, []).append(i)
                        else:
                            held.append(_Entry(i, b, keys))
                if not held:
                    if exhausted:
                        return
                    continue  # only sweep markers so far
                page = ClaimedPage({}, [])
                room = page_size
                while held and room > 0:
                    entry = held[0]
                    end = min(len(entry.keys), entry.taken + room)
                    for k in entry.keys[entry.taken:end]:
                        page.bucket_of.setdefault(k, entry.bucket)
                    room -= end - entry.taken
                    entry.taken = end
                    if end == len(entry.keys):
                        page.entry_ids.append(held.popleft().id)
                loaded = load(page)
            yield loaded

    def clear(self, entry_ids: list[int], stats_of: Callable[[int], SyncStats]) -> None:
        """Delete entries (in the caller's transaction), counting them and their lags per bucket."""
        for bucket, lag, keys in self.conn.execute(self._delete, (entry_ids,)):
            stats = stats_of(bucket)
            stats.changes_cleared += 1
            stats.change_lags.append((lag, keys))
