"""Backfills through the provider's batch API: the engine's side. Free of Dagster.

The safe core: a batch result is never written to a store. A sweep in batch mode renders, chunks
and hashes its buckets' rows as every sweep does, leaves out what is stored or cached already, and
sends the rest as one batch (a JSONL file of /v1/embeddings lines, custom_id = the text hash);
the buckets' sweep requests stay in the change log, parked, and no run sweeps those buckets while
their batch is pending (changes by key still go the ordinary way). Whoever runs next over those
buckets polls the batch; once it has ended, its vectors go into vectorsync.batch_vectors, a
pre-paid cache keyed by (model fingerprint, text hash), and the ordinary sweep stores the rows by
looking there before it calls the provider (Store.vectors). So a row whose text changed while its
batch was pending has a new hash and is embedded the ordinary way, never overwritten by the older
result; a row deleted meanwhile is not stored; a change leaves the change log only in the
transaction that stores its embedding, as always.

- A line that failed (or whose vector is unusable) is not cached: the sweep sends that text to the
  provider as an ordinary request, and if that fails too the row goes to the failure ledger like
  any other failure. The line's error is kept on its batch item.
- A batch that failed, expired or was cancelled: the lines it finished are cached, the rest go the
  ordinary way; the job records the provider's status and why.
- Never paying twice: a job and its items are recorded (with the sweep requests) before anything
  is sent, the input file's id as soon as it is uploaded, the batch's id as soon as it is made. A
  job is worked under an advisory lock, so a killed process's job is recognised: one killed
  before its upload is dropped (nothing was sent), one killed after it is resumed, and a batch
  made from its file is looked for before another is created.
- Cost: the tokens the provider billed for the lines, at the batch price (assets/usage.py), are
  recorded on the job in the transaction that caches its vectors, and in the run's figures.
"""

from __future__ import annotations

import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import psycopg
from psycopg import sql

from .batch_api import MAX_FILE_BYTES, MAX_LINES, BatchAPI, BatchState
from .catalog import ResolvedTable
from .locks import try_lock, unlock
from .pipeline import prepare_rows
from .providers.base import EmbeddingProvider, ProviderError
from .store import Store
from .sweep import Sweep
from .sync_stats import SyncStats
from .usage import BudgetExceeded, batch_price_per_million, cost_usd, price_per_million, spent_today

# How often a run that was asked to wait for its batch polls it.
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class _Job:
    id: int
    buckets: list[int]
    state: str
    input_file_id: str | None
    batch_id: str | None
    created_at: float


class BatchFill:
    def __init__(
        self, conn: psycopg.Connection, table: ResolvedTable, sweep: Sweep, store: Store,
        provider: EmbeddingProvider, api: Callable[[], BatchAPI] | None = None,
    ) -> None:
        self.conn, self.table, self.spec = conn, table, table.spec
        self.sweep, self.store, self.provider = sweep, store, provider
        self.enabled = conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is not None
        # Public: a caller may count or wrap the calls (the benchmark does).
        self.make_api = api or (lambda: BatchAPI(self.spec.provider))
        self._api: BatchAPI | None = None

    @property
    def api(self) -> BatchAPI:
        if self._api is None:  # built only when a batch is sent or polled: most runs never need it
            self._api = self.make_api()
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    def before_sweep(
        self, buckets: list[int], stats: dict[int, SyncStats], mode: bool | None, wait_seconds: float,
        should_stop: Callable[[], bool],
    ) -> list[int]:
        """Poll the batches of these buckets (collecting those that ended), send a batch for the
        others if in batch mode, wait for them if asked; returns the buckets to sweep now."""
        batch = self.spec.backfill.mode == "batch" if mode is None else mode
        if batch and self.spec.provider.kind != "openai":
            raise ValueError(f"table {self.spec.name}: batch mode needs provider.kind openai (a batch API)")
        if not self.enabled:
            if batch:
                raise RuntimeError(f"table {self.spec.name}: no batch tables (migration 005): run `vectorsync install`")
            return buckets
        parked, collected = self._poll(buckets, stats)
        if batch:
            fresh = [b for b in buckets if b not in parked and b not in collected]
            least = 1 if mode else self.spec.backfill.batch_min_chunks
            if fresh and self._submit(fresh, stats, least, should_stop):
                parked |= set(fresh)
        deadline = time.monotonic() + wait_seconds
        while parked and not should_stop() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_SECONDS, left))
            parked, _ = self._poll(sorted(parked), stats)
        return [b for b in buckets if b not in parked]

    def after_sweep(self, buckets: list[int]) -> None:
        """These buckets were swept to the end: a collected job all of whose buckets are swept is
        done, and its cached vectors and items are dropped (the store holds what was used)."""
        if not self.enabled:
            return
        with self.conn.transaction():
            done = [i for i, state in self.conn.execute(
                """UPDATE vectorsync.batch_jobs j SET updated_at = now(),
                       swept = ARRAY(SELECT DISTINCT x FROM unnest(j.swept || %(b)s::int[]) x ORDER BY x),
                       state = CASE WHEN j.buckets <@ (j.swept || %(b)s::int[]) THEN 'done' ELSE j.state END
                   WHERE table_name = %(t)s AND model = %(m)s AND state = 'collected' AND buckets && %(b)s::int[]
                   RETURNING id, state""", {"t": self.spec.name, "m": self.spec.fingerprint, "b": buckets})
                if state == "done"]
            if done:
                self.conn.execute("DELETE FROM vectorsync.batch_vectors WHERE job_id = ANY(%s)", (done,))
                self.conn.execute("DELETE FROM vectorsync.batch_items WHERE job_id = ANY(%s)", (done,))

    # Polling and collecting ----------------------------------------------------------------------

    def _poll(self, buckets: list[int], stats: dict[int, SyncStats]) -> tuple[set[int], set[int]]:
        """Move every unfinished job of these buckets on; returns (buckets parked, buckets whose
        job is collected and waits for its sweep)."""
        parked: set[int] = set()
        collected: set[int] = set()
        for job in self._jobs(buckets):
            mine = set(job.buckets) & set(buckets)
            if job.state == "collected":
                collected |= mine
                continue
            lock = f"vectorsync-batch-job:{job.id}"
            if not try_lock(self.conn, lock):
                parked |= mine  # a live process is sending or collecting it
                continue
            try:
                if job.state == "preparing":
                    # Its process died before the upload: nothing was sent, so nothing is lost.
                    self.conn.execute("DELETE FROM vectorsync.batch_jobs WHERE id = %s", (job.id,))
                    continue
                batch_id = job.batch_id or self._create(job)
                state = self.api.retrieve(batch_id)
                if not state.terminal:
                    self._note(job.id, state.status, None)
                    parked |= mine
                    continue
                self._collect(job, state, stats)
                collected |= mine
            except ProviderError as exc:
                if exc.fails_run:
                    raise
                self._note(job.id, None, f"polling failed, tried again at the next run: {exc}")
                parked |= mine
            finally:
                unlock(self.conn, lock)
        return parked, collected

    def _jobs(self, buckets: list[int]) -> list[_Job]:
        # By model fingerprint too: each model version of a table (assets/versions.py) has its own.
        return [_Job(*r) for r in self.conn.execute(
            """SELECT id, buckets, state, input_file_id, batch_id, extract(epoch FROM created_at)::float8
               FROM vectorsync.batch_jobs WHERE table_name = %s AND model = %s AND state <> 'done'
               AND buckets && %s::int[]
               ORDER BY id""", (self.spec.name, self.spec.fingerprint, buckets))]

    def _note(self, job_id: int, status: str | None, reason: str | None) -> None:
        self.conn.execute(
            """UPDATE vectorsync.batch_jobs SET provider_status = coalesce(%s, provider_status),
                   reason = coalesce(%s, reason), updated_at = now() WHERE id = %s""", (status, reason, job_id))

    def _create(self, job: _Job) -> str:
        """The job's batch: the one already made from its input file (by a process killed before
        it recorded the id), or a new one. Recorded at once."""
        assert job.input_file_id is not None
        batch_id = (self.api.find(job.input_file_id, since=job.created_at) if job.state == "uploaded" else None) or \
            self.api.create(job.input_file_id, {"vectorsync_table": self.spec.name, "vectorsync_job": str(job.id)})
        self.conn.execute(
            """UPDATE vectorsync.batch_jobs SET batch_id = %s, state = 'submitted', updated_at = now()
               WHERE id = %s""", (batch_id, job.id))
        return batch_id

    def _collect(self, job: _Job, state: BatchState, stats: dict[int, SyncStats]) -> None:
        """Cache the vectors of an ended batch and record what its lines cost, in one transaction."""
        results = self.api.results(state)  # downloaded before the transaction: no transaction waits on HTTP
        items = {h.hex(): (bytes(h), b) for h, b in self.conn.execute(
            "SELECT text_hash, bucket FROM vectorsync.batch_items WHERE job_id = %s", (job.id,))}
        vectors = {cid: v for cid, v in results.vectors.items() if cid in items}
        errors = {cid: e for cid, e in results.errors.items() if cid in items}
        tokens = {cid: results.tokens.get(cid, 0) for cid in vectors}
        reason = None if state.status == "completed" else f"batch {state.status}" + (f": {state.errors}" if state.errors else "")
        with self.conn.transaction():
            current = self.conn.execute(
                "SELECT state FROM vectorsync.batch_jobs WHERE id = %s FOR UPDATE", (job.id,)).fetchone()
            if current is None or current[0] != "submitted":
                return  # collected by another run meanwhile
            self._cache(job.id, {items[cid][0]: v for cid, v in vectors.items()})
            if errors:
                self.conn.execute(
                    """UPDATE vectorsync.batch_items i SET error = e.msg FROM unnest(%s::bytea[], %s::text[]) e(h, msg)
                       WHERE i.job_id = %s AND i.text_hash = e.h""",
                    ([items[c][0] for c in errors], list(errors.values()), job.id))
            total = sum(tokens.values())
            self.conn.execute(
                """UPDATE vectorsync.batch_jobs SET state = 'collected', provider_status = %s, output_file_id = %s,
                       error_file_id = %s, lines_ok = %s, lines_failed = %s, tokens = %s,
                       cost_usd = %s * price_per_million_tokens / 1e6, reason = %s, collected_at = now(),
                       updated_at = now() WHERE id = %s""",
                (state.status, state.output_file_id, state.error_file_id, len(vectors), len(items) - len(vectors),
                 total, total, reason, job.id))
        first = min(stats)
        for cid, n in tokens.items():
            bucket = items[cid][1]
            # A job's other buckets, not in this call, are counted on its first: the run's
            # totals are what the provider billed.
            s = stats[bucket] if bucket in stats else stats[first]
            s.batch_tokens += n
            s.batch_lines += 1

    def _cache(self, job_id: int, vectors: dict[bytes, object]) -> None:
        """Add vectors to the pre-paid cache (binary COPY; a text another job cached first keeps
        that job's vector, which is the same text's)."""
        if not vectors:
            return
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS vectorsync_batch_incoming "
                          "(text_hash bytea, embedding vector) ON COMMIT DELETE ROWS")
        with self.conn.cursor().copy(
            "COPY vectorsync_batch_incoming (text_hash, embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bytea", "bytea"])  # the vector in pgvector's binary input, as Store.copy writes it
            for digest, v in vectors.items():
                copy.write_row((digest, struct.pack(">HH", v.shape[0], 0) + v.astype(">f4").tobytes()))
        self.conn.execute(
            """INSERT INTO vectorsync.batch_vectors (model, text_hash, job_id, embedding)
               SELECT %s, text_hash, %s, embedding FROM vectorsync_batch_incoming ON CONFLICT DO NOTHING""",
            (self.spec.fingerprint, job_id))

    # Sending ---------------------------------------------------------------------------------------

    def _submit(
        self, buckets: list[int], stats: dict[int, SyncStats], least: int, should_stop: Callable[[], bool]
    ) -> bool:
        """Send what the buckets' rows need and neither the store nor the cache holds, in batches of
        at most MAX_LINES lines; returns whether anything was sent (nothing, below `least` texts)."""
        sent = False
        seen: set[bytes] = set()
        items: list[tuple[bytes, int, int]] = []
        fingerprint = self.spec.fingerprint
        with tempfile.TemporaryFile() as file:
            for rows in self.sweep.pages(buckets, should_stop):
                candidates, tokens = prepare_rows(rows, self.spec, self.provider, [], [])
                stored = self.store.hashes([r.key_json for r in candidates])
                texts: dict[bytes, tuple[str, int]] = {}
                for row in candidates:
                    if stored.get(row.key_json) != [(h, fingerprint) for h in row.hashes]:
                        for h, piece in zip(row.hashes, row.pieces):
                            if h not in seen:
                                texts.setdefault(h, (piece, row.bucket))
                cached = self.store.vectors(list(texts))
                todo = [(h, t, b) for h, (t, b) in texts.items() if h not in cached]
                uncounted = [t for h, t, _ in todo if h not in tokens]
                counted = iter(self.provider.count_tokens(uncounted) if uncounted else [])
                for h, text, bucket in todo:
                    line = self.api.line(h.hex(), text)
                    if len(items) >= MAX_LINES or file.tell() + len(line) > MAX_FILE_BYTES:
                        self._send(buckets, items, file, stats)
                        sent, items = True, []
                        file.seek(0)
                        file.truncate()
                    file.write(line)
                    seen.add(h)
                    items.append((h, bucket, tokens[h] if h in tokens else next(counted)))
            if items and not should_stop() and (sent or len(items) >= least):
                self._send(buckets, items, file, stats)
                sent = True
        return sent

    def _send(self, buckets: list[int], items: list[tuple[bytes, int, int]], file: IO[bytes],
              stats: dict[int, SyncStats]) -> None:
        """Record the job, its items and the buckets' sweep requests; upload; create the batch.
        A batch that would take the day's spend past the table's budget is not sent: a batch is
        paid for when it completes, so the batches in flight count as spent already."""
        budget = self.spec.budget.daily_usd if self.spec.budget else None
        if budget is not None:
            estimate = cost_usd(sum(n for *_, n in items), batch_price_per_million(self.spec.provider))
            spent = spent_today(self.conn, self.spec.name, with_batches_in_flight=True)
            if estimate > 0 and spent + estimate > budget:
                raise BudgetExceeded(self.spec.name, spent, estimate, budget)
        with self.conn.transaction():
            job_id = self.conn.execute(
                """INSERT INTO vectorsync.batch_jobs (table_name, model, buckets, items, price_per_million_tokens,
                       list_price_per_million_tokens) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id""",
                (self.spec.name, self.spec.fingerprint, buckets, len(items),
                 batch_price_per_million(self.spec.provider), price_per_million(self.spec.provider))).fetchone()[0]
            lock = f"vectorsync-batch-job:{job_id}"
            try_lock(self.conn, lock)  # a session lock: held past the commit, gone if we die
            with self.conn.cursor().copy(
                "COPY vectorsync.batch_items (job_id, text_hash, bucket, tokens) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "bytea", "int4", "int4"])
                for h, bucket, n in items:
                    copy.write_row((job_id, h, bucket, n))
            # The sweep these buckets wait for: it runs once the batch has ended.
            self.conn.execute(
                sql.SQL("INSERT INTO {q} (bucket, row_keys) SELECT b, NULL FROM unnest(%s::int[]) b "
                        "WHERE NOT EXISTS (SELECT 1 FROM {q} WHERE bucket = b AND row_keys IS NULL)")
                .format(q=self.table.queue), (buckets,))
        try:
            file.flush()
            file.seek(0)
            file_id = self.api.upload(file, f"vectorsync-{self.spec.name}-{job_id}.jsonl")
            self.conn.execute(
                """UPDATE vectorsync.batch_jobs SET input_file_id = %s, state = 'uploaded', updated_at = now()
                   WHERE id = %s""", (file_id, job_id))
            self._create(_Job(job_id, buckets, "new", file_id, None, time.time()))
        finally:
            unlock(self.conn, lock)
        stats[buckets[0]].batches_submitted += 1


def batch_jobs_pending(conn: psycopg.Connection, table_name: str) -> list[str]:
    """The table's batches not yet collected, as "batch id (status, buckets)"."""
    if conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is None:
        return []
    return [f"{batch_id or f'job {i}'} ({status or state}, buckets {buckets})" for i, batch_id, status, state, buckets
            in conn.execute("""SELECT id, batch_id, provider_status, state, buckets FROM vectorsync.batch_jobs
                               WHERE table_name = %s AND state IN ('preparing', 'uploaded', 'submitted')
                               ORDER BY id""", (table_name,))]
