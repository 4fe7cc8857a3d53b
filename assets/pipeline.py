"""The read-ahead pipeline: pages of source rows on their way to the store. Free of Dagster.

While the provider embeds one page, the next pages are read and prepared (rendered, chunked,
hashed, compared with the store) and their requests queued, up to the provider's concurrency;
pages are written in the order they were read, each in one short transaction that writes its
chunks, updates the ledger and clears the change-log entries it completes. A key that an unwritten
page will write is never judged unchanged from the store, and a text an unwritten page is
embedding is borrowed from it, never sent twice.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import psycopg

from .batches import Batch, embed_isolating
from .changelog import ChangeLog
from .ledger import Failure, FailureLedger
from .providers.base import EmbeddingProvider, ProviderError
from .source_rows import Row
from .spec import TableSpec
from .store import Store
from .sync_stats import SyncStats
from .template import RenderError, render
from .text import chunk, fit_to_token_limit, text_hash

# A cap on the pipeline's read-ahead, in source rows (see Pipeline.max_rows).
_MAX_ROWS_IN_FLIGHT = 20_000


@dataclass
class Page:
    """One page on its way through the pipeline: read, prepared (texts queued), written."""

    rows: list[Row]
    absent: list[tuple[str, int]] = field(default_factory=list)  # (key json, bucket) of vanished rows
    change_ids: list[int] = field(default_factory=list)
    stats: dict[int, SyncStats] = field(default_factory=dict)
    skipped: list[tuple[Row, str]] = field(default_factory=list)
    unprocessable: list[tuple[Row, str]] = field(default_factory=list)  # rows that cannot be rendered
    changed: list[Row] = field(default_factory=list)
    unchanged: list[Row] = field(default_factory=list)
    vectors: dict[bytes, np.ndarray] = field(default_factory=dict)
    # The requests whose vectors this page needs: its own, and those of earlier pages still in
    # flight that carry the same texts (borrowed, never sent twice).
    needs: dict[bytes, Batch] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    has_chunks: set[str] = field(default_factory=set)
    has_failures: set[str] = field(default_factory=set)
    # Called once this page and every page before it are written (the engine releases a bucket's
    # lock here). A page with nothing else in it is only this marker: no statement, no room taken.
    after_write: Callable[[], None] | None = None
    # Every page before this one is written before any page after it is read: a key read again
    # while an earlier page still has it in flight is written twice (see _prepare).
    flush: bool = False

    def is_marker(self) -> bool:
        return not self.rows and not self.absent and not self.change_ids

    def size(self) -> int:
        """Rows, for the read-ahead's count (at least 1: every page takes room)."""
        return max(1, len(self.rows) + len(self.absent))

    def of(self, bucket: int) -> SyncStats:
        return self.stats.setdefault(bucket, SyncStats())

    def batches(self) -> list[Batch]:
        return list({id(b): b for b in self.needs.values()}.values())

    def ready(self) -> bool:
        return all(b.done() for b in self.batches())


class Pipeline:
    def __init__(
        self, conn: psycopg.Connection, spec: TableSpec, provider: EmbeddingProvider, store: Store,
        ledger: FailureLedger, changes: ChangeLog,
    ) -> None:
        self.conn, self.spec, self.provider = conn, spec, provider
        self.store, self.ledger, self.changes = store, ledger, changes
        # Called with each page's figures per bucket as soon as the page is written (progress,
        # spend): a call of sync_buckets returns only when all of its buckets are done.
        self.on_page: Callable[[dict[int, SyncStats]], None] | None = None
        self.fingerprint = spec.fingerprint
        self._pool = ThreadPoolExecutor(max_workers=provider.max_concurrency)
        # Rows in flight (read, not yet written): enough requests queued to keep every concurrent
        # slot busy three times over (so slots never idle while the oldest page is written and the
        # next ones are read), at least two full pages (the next page is prepared while the
        # provider works on this one), and at most _MAX_ROWS_IN_FLIGHT: memory stays bounded
        # whatever a bucket holds. Counted in rows, not pages: a run reads bucket by bucket, and
        # a bucket's last page (every page of a small bucket) is short.
        per_page = max(1, -(-spec.page_size // max(1, provider.max_inputs_per_request)))
        self.max_rows = spec.page_size * min(
            max(2, -(-3 * provider.max_concurrency // per_page)),
            max(2, _MAX_ROWS_IN_FLIGHT // spec.page_size),
        )
        self._inflight_keys: Counter[str] = Counter()
        self._inflight_hashes: dict[bytes, Batch] = {}
        self._open: Batch | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def run(self, pages: Iterator[Page], stats: dict[int, SyncStats]) -> int:
        """Prepare each page (requests submitted) as it is read, and write pages in the order they
        were read, as soon as their requests are done; at most max_rows are in flight.
        Returns how many pages were processed."""
        inflight: deque[Page] = deque()
        done = unwritten = 0  # pages written, rows in flight

        def finish_oldest() -> None:
            nonlocal done, unwritten
            page = inflight.popleft()
            if not page.is_marker():
                done, unwritten = done + 1, unwritten - page.size()
            self._finish(page, stats)

        try:
            for page in pages:
                if not page.is_marker():
                    self._prepare(page)
                    unwritten += page.size()
                inflight.append(page)
                while inflight and (unwritten >= self.max_rows or inflight[0].ready() or page.flush):
                    finish_oldest()
            while inflight:
                finish_oldest()
        except BaseException:
            # Nothing of an unwritten page is cleared: its changes stay in the log for the next run.
            futures = [b.future for page in inflight for b in page.batches() if b.future is not None]
            for future in futures:
                future.cancel()
            wait(futures)
            for page in inflight:
                self._release(page)
            self._open = None
            self._inflight_hashes.clear()
            raise
        return done

    def _prepare(self, page: Page) -> None:
        """Render, chunk and hash the page's rows, decide what is unchanged, reuse stored vectors,
        and submit the misses to the provider."""
        candidates, tokens = prepare_rows(page.rows, self.spec, self.provider, page.skipped, page.unprocessable)

        # A key that an earlier, unwritten page is about to write must be written again after it,
        # whatever the store says now: the store does not show that write yet.
        pending = self._inflight_keys
        page.keys = [r.key_json for r in page.rows] + [k for k, _ in page.absent]
        in_flight = {k for k in page.keys if k in pending}
        # One lookup of what is stored, and one of the failure ledger, serve every row of the page.
        stored = self.store.hashes(
            [r.key_json for r in candidates] + [r.key_json for r, _ in page.skipped + page.unprocessable]
        )
        failures = self.ledger.kinds(page.keys)
        # Only these keys can have chunks to delete or ledger entries to clear when the page is
        # written: a backfill into an empty store then skips both statements.
        page.has_chunks = set(stored) | in_flight
        page.has_failures = set(failures) | in_flight
        unchanged = Counter()
        if page.skipped:
            # A row already recorded as skipped, with nothing stored, needs no new decision.
            keep = []
            for row, reason in page.skipped:
                k = row.key_json
                if failures.get(k) == "skipped" and k not in stored and k not in in_flight:
                    unchanged[row.bucket] += 1
                else:
                    keep.append((row, reason))
            page.skipped = keep
        fingerprint = self.fingerprint
        for row in candidates:
            k = row.key_json
            if k not in in_flight and stored.get(k) == [(h, fingerprint) for h in row.hashes]:
                page.unchanged.append(row)
                unchanged[row.bucket] += 1
            else:
                page.changed.append(row)
        for bucket, n in unchanged.items():
            page.of(bucket).rows_unchanged += n

        texts: dict[bytes, str] = {}
        first_bucket: dict[bytes, int] = {}
        for row in page.changed:
            for h, p in zip(row.hashes, row.pieces):
                if h not in texts:
                    texts[h] = p
                    first_bucket[h] = row.bucket
        for h in texts:
            if h in self._inflight_hashes:
                page.needs[h] = self._inflight_hashes[h]
        page.vectors.update(self.store.vectors([h for h in texts if h not in page.needs]))
        misses = [(h, t) for h, t in texts.items() if h not in page.vectors and h not in page.needs]
        own = {h for h, _ in misses}
        credited: set[bytes] = set()
        reused: Counter[int] = Counter()
        for row in page.changed:
            for h in row.hashes:
                if h in own and h not in credited:
                    credited.add(h)
                else:
                    reused[row.bucket] += 1
        for bucket, n in reused.items():
            page.of(bucket).chunks_reused += n
        if misses:
            limit_inputs = self.provider.max_inputs_per_request
            limit_tokens = self.provider.max_tokens_per_request
            for (h, text), n in zip(misses, self._count_missing(misses, tokens)):
                batch = self._open
                if batch is not None and (len(batch.items) >= limit_inputs or batch.tokens + n > limit_tokens):
                    self._send_open()
                    batch = None
                if batch is None:
                    batch = self._open = Batch(first_bucket[h])
                batch.items.append((h, text))
                batch.tokens += n
                batch.bucket_of[h] = first_bucket[h]
                batch.bucket_tokens[first_bucket[h]] += n
                self._inflight_hashes[h] = batch
                page.needs[h] = batch
            if self._open is not None and len(self._open.items) >= limit_inputs:
                self._send_open()
        for batch in page.batches():
            batch.waiting += 1
        self._inflight_keys.update(page.keys)

    def _send_open(self) -> None:
        batch, self._open = self._open, None
        if batch is not None and batch.items:
            batch.future = self._pool.submit(embed_isolating, self.provider, batch.items)

    def _count_missing(self, items: list[tuple[bytes, str]], tokens: dict[bytes, int]) -> list[int]:
        unknown = [t for h, t in items if h not in tokens]
        counted = iter(self.provider.count_tokens(unknown) if unknown else [])
        return [tokens[h] if h in tokens else next(counted) for h, _ in items]

    def _finish(self, page: Page, stats: dict[int, SyncStats]) -> None:
        """Wait for the requests the page needs, then write it in one short transaction."""
        if page.is_marker():
            if page.after_write is not None:
                page.after_write()
            return
        try:
            if self._open is not None and any(b is self._open for b in page.batches()):
                self._send_open()
            errors: dict[bytes, ProviderError] = {}
            for batch in page.batches():
                outcome = batch.future.result()  # type: ignore[union-attr]
                for part_stats, part_vectors, part_errors in outcome:
                    if not batch.booked:
                        batch.book(page.of, part_stats, part_vectors)
                    for h, v in part_vectors.items():
                        if h in page.needs:
                            page.vectors[h] = v
                    for h, e in part_errors.items():
                        if h in page.needs:
                            errors[h] = e
                batch.booked = True
            written: list[Row] = []
            failed: list[tuple[Row, ProviderError]] = []
            for row in page.changed:
                error = next((errors[h] for h in row.hashes if h in errors), None)
                if error is None:
                    written.append(row)
                else:
                    failed.append((row, error))
            self._write(page, written, failed)
        finally:
            self._release(page)
        for name, buckets in (
            ("rows_written", [r.bucket for r in written]),
            ("rows_skipped", [r.bucket for r, _ in page.skipped]),
            ("rows_failed", [r.bucket for r, _ in failed] + [r.bucket for r, _ in page.unprocessable]),
            ("rows_seen", [r.bucket for r in page.rows] + [b for _, b in page.absent]),
        ):
            for bucket, n in Counter(buckets).items():
                setattr(page.of(bucket), name, getattr(page.of(bucket), name) + n)
        for bucket, s in page.stats.items():
            stats[bucket].merge(s)
        if self.on_page is not None:
            self.on_page(page.stats)
        if page.after_write is not None:
            page.after_write()

    def _release(self, page: Page) -> None:
        """The page is written (or abandoned): a request no unwritten page needs any more is
        forgotten, since its vectors are in the store now and the cache lookup finds them."""
        for batch in page.batches():
            batch.waiting -= 1
            if batch.waiting <= 0 and batch.future is not None:
                for h, _ in batch.items:
                    if self._inflight_hashes.get(h) is batch:
                        del self._inflight_hashes[h]
        page.needs = {}
        self._inflight_keys.subtract(page.keys)
        for k in page.keys:
            if self._inflight_keys[k] <= 0:
                del self._inflight_keys[k]
        page.keys = []

    def _write(self, page: Page, written: list[Row], failed: list[tuple[Row, ProviderError]]) -> None:
        """One short transaction: replace the page's chunks, update the ledger, and clear the
        change-log entries the page completes. Killed before it commits, none of it happened."""
        absent = [k for k, _ in page.absent]
        replaced = absent + [
            k for k in [r.key_json for r in written] + [r.key_json for r, _ in page.skipped + page.unprocessable]
            if k in page.has_chunks
        ]
        succeeded = [
            k for k in [r.key_json for r in written] + [r.key_json for r in page.unchanged] + absent
            if k in page.has_failures
        ]
        with self.conn.transaction():
            if replaced:
                gone = self.store.delete(replaced)
                for key, bucket in page.absent:
                    if key in gone:
                        page.of(bucket).rows_deleted += 1
            if written:
                for bucket, n in self.store.copy(written, page.vectors).items():
                    page.of(bucket).chunks_written += n
            if succeeded:
                self.ledger.forget(succeeded)
            if page.skipped:
                self.ledger.record([_failure(r, "skipped", reason) for r, reason in page.skipped], retry=False)
            if page.unprocessable:
                self.ledger.record(
                    [_failure(r, "unprocessable", reason) for r, reason in page.unprocessable], retry=False, dead=True
                )
            if failed:
                self.ledger.record(
                    [_failure(r, e.kind, str(e), e.retry_after or 0.0) for r, e in failed], retry=True
                )
            if page.change_ids:
                self.changes.clear(page.change_ids, page.of)


def prepare_rows(
    rows: list[Row], spec: TableSpec, provider: EmbeddingProvider,
    skipped: list[tuple[Row, str]], unprocessable: list[tuple[Row, str]],
) -> tuple[list[Row], dict[bytes, int]]:
    """Render, chunk and hash rows (every sweep does it alike, the batch mode's too): returns the
    rows with text, their pieces and hashes set, and the tokens of each piece counted on the way
    (by hash). Rows with no text go to `skipped`, rows whose template does not render to
    `unprocessable`."""
    template = spec.template_parts
    candidates: list[Row] = []
    for row in rows:
        try:
            text = render(template, row.values)
        except RenderError as exc:
            # Never stored as something else: the row goes to the ledger with its column.
            unprocessable.append((row, f"cannot render the template: {exc}"))
            continue
        if not text.strip() or all(v is None or not str(v).strip() for v in row.values.values()):
            skipped.append((row, "no content: every text column is NULL or empty"))
            continue
        row.pieces = chunk(text, spec.chunking)
        candidates.append(row)
    return candidates, _fit_to_token_limit(candidates, provider)


def _fit_to_token_limit(rows: list[Row], provider: EmbeddingProvider) -> dict[bytes, int]:
    """Split any piece the model would truncate (never cut silently), and hash every piece.
    Tokens are counted in one call per page rather than one per row; returns them by hash."""
    pieces = [p for r in rows for p in r.pieces]
    if not pieces:
        return {}
    counts = iter(provider.count_tokens(pieces))
    limit = provider.max_tokens_per_input
    tokens: dict[bytes, int] = {}
    for row in rows:
        row_counts = [next(counts) for _ in row.pieces]
        if max(row_counts) > limit:
            row.pieces = fit_to_token_limit(row.pieces, provider.count_tokens, limit)
            row.hashes = [text_hash(p) for p in row.pieces]
            continue  # counted again, if it is embedded, by _count_missing
        row.hashes = [text_hash(p) for p in row.pieces]
        tokens.update(zip(row.hashes, row_counts))
    return tokens


def _failure(row: Row, kind: str, message: str, at_least: float = 0.0) -> Failure:
    return Failure(row.key_json, row.bucket, kind, message, at_least)
