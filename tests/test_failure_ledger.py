"""Provider faults end to end (issue 4, items 1 and 2): the real `openai` client against the
OpenAI-compatible test server, through the engine, into vectorsync.failures.

test_openai_provider.py pins how each fault maps to an error kind; here each fault goes all the
way: what is stored, what the ledger says (kind, error text, attempts, next attempt, dead), what
is left in the change log, and what happens on the next attempt.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from openai_server import Fault, OpenAIServer
from psycopg import sql

from assets.catalog import ResolvedTable, resolve
from assets.engine import EmbeddingEngine, RetryPolicy, SyncStats
from assets.install import install
from assets.providers import build_provider
from assets.providers.base import ProviderError
from assets.spec import parse_spec
from assets.status import change_backlog

from conftest import unique

DIMENSIONS = 8
BASE_SECONDS = 60.0
DEFAULT_RETRY = RetryPolicy(base_seconds=BASE_SECONDS)


@dataclass
class LedgerTable:
    """One source table (id, body), embedded whole (no chunking) through a test server."""

    conn: psycopg.Connection
    table: ResolvedTable
    engine: EmbeddingEngine

    @property
    def name(self) -> str:
        return self.table.spec.name

    def sync(self, full: bool = False) -> SyncStats:
        return self.engine.sync_bucket(0, full=full)

    def stored(self) -> dict[int, str]:
        return dict(self.conn.execute(sql.SQL("SELECT id, chunk FROM {}").format(self.table.store)).fetchall())

    def pending(self) -> int:
        return change_backlog(self.conn, self.table.queue)[0]

    def ledger(self) -> dict[int, dict[str, Any]]:
        """row id -> its failure_report row, with the backoff delay in seconds."""
        cur = self.conn.execute(
            """SELECT (row_key ->> 0)::int AS id, error_kind, last_error, attempts, state,
                      extract(epoch FROM next_attempt_at - last_failed_at)::float8 AS delay,
                      first_failed_at, last_failed_at
               FROM vectorsync.failure_report WHERE table_name = %s""",
            (self.name,),
        )
        names = [d.name for d in cur.description]
        return {row[0]: dict(zip(names, row)) for row in cur}

    def make_due(self) -> None:
        # Stands in for waiting out the backoff: the retry schedule would see these rows due now.
        self.conn.execute(
            "UPDATE vectorsync.failures SET next_attempt_at = now() - interval '1 second' "
            "WHERE table_name = %s AND next_attempt_at IS NOT NULL", (self.name,))


MakeTable = Callable[..., LedgerTable]


@pytest.fixture
def make_ledger_table(conn: psycopg.Connection) -> Iterator[MakeTable]:
    made: list[LedgerTable] = []

    def make(base_url: str, texts: list[str], retry: RetryPolicy = DEFAULT_RETRY,
             **provider: Any) -> LedgerTable:
        schema = unique("led")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        source = sql.Identifier(schema, "docs")
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(source))
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(source), list(enumerate(texts, 1)))
        fields = {"kind": "openai", "model": "test-embed", "dimensions": DIMENSIONS, "base_url": base_url,
                  "api_key_env": "VECTORSYNC_TEST_UNSET_KEY", "max_concurrency": 1, "max_retries": 0,
                  "timeout_seconds": 5, **provider}
        spec = parse_spec({"name": unique("led"), "source": {"schema": schema, "table": "docs"},
                           "columns": ["body"], "chunking": None, "buckets": 1, "provider": fields}, "ledger-test")
        install(conn, [(spec, "ledger-test")])
        table = resolve(conn, spec, "ledger-test")
        t = LedgerTable(conn, table, EmbeddingEngine(conn, table, build_provider(spec.provider), retry=retry))
        made.append(t)
        return t

    yield make
    for t in made:
        t.engine.close()
        t.engine.provider.close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TEXTS = [f"row number {i} says something" for i in range(1, 9)]


# Transient faults: retried by the client, nothing reaches the ledger -----------------------------


@pytest.mark.parametrize(
    ("fault", "min_wait"),
    [
        pytest.param(Fault(status=429, retry_after="1"), 0.9, id="429-retry-after"),
        pytest.param(Fault(status=429), 0.3, id="429-no-retry-after"),
        pytest.param(Fault(status=500), 0.3, id="500"),
        pytest.param(Fault(status=503), 0.3, id="503"),
        pytest.param(Fault(delay=30), 0.5, id="timeout"),
    ],
)
def test_a_transient_fault_is_retried_and_leaves_no_trace(
    fault: Fault, min_wait: float, make_ledger_table: MakeTable
) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, TEXTS, max_retries=1, timeout_seconds=0.5)
        server.fail_next(fault)

        stats = t.sync()

        assert t.stored() == dict(enumerate(TEXTS, 1)) and t.ledger() == {} and t.pending() == 0
        assert stats.rows_written == len(TEXTS) and stats.rows_failed == 0
        first, second = server.requests
        assert second.inputs == first.inputs
        # The client waited before its retry: Retry-After when given, its own backoff otherwise.
        assert second.received_at - first.received_at >= min_wait


# Persistent faults of the provider: every row of the batch is recorded, with backoff ------------


@pytest.mark.parametrize(
    ("faults", "kind", "message"),
    [
        pytest.param([Fault(status=429, retry_after="1")] * 10, "rate_limited", "429", id="429-retry-after"),
        pytest.param([Fault(status=429)] * 10, "rate_limited", "429", id="429-no-retry-after"),
        pytest.param([Fault(status=500)] * 10, "server_error", "500", id="500"),
        pytest.param([Fault(status=503)] * 10, "server_error", "503", id="503"),
        pytest.param([Fault(delay=30)] * 10, "timeout", "no answer within", id="timeout"),
        pytest.param(None, "connection", "cannot reach the provider", id="connection-refused"),
    ],
)
def test_a_persistent_provider_fault_is_recorded_for_every_row_with_backoff(
    faults: list[Fault] | None, kind: str, message: str, make_ledger_table: MakeTable
) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        base_url = server.base_url if faults else f"http://127.0.0.1:{unused_port()}/v1"
        t = make_ledger_table(base_url, TEXTS, timeout_seconds=0.3)
        server.fail_next(faults or [])

        stats = t.sync()

        assert t.stored() == {} and stats.rows_failed == len(TEXTS)
        # A fault of the whole provider is not split: one request for the batch, not one per row.
        assert len(server.requests) == (1 if faults else 0)
        ledger = t.ledger()
        assert set(ledger) == set(range(1, len(TEXTS) + 1))
        for row_id, entry in ledger.items():
            assert (entry["error_kind"], entry["attempts"], entry["state"]) == (kind, 1, "retrying")
            assert message in entry["last_error"]
            assert f"table {t.name}, row [{row_id}]" in entry["last_error"]
            assert 0.8 * BASE_SECONDS <= entry["delay"] <= 1.2 * BASE_SECONDS
        # Recorded, so cleared from the change log: the retry schedule brings the rows back.
        assert t.pending() == 0


def test_a_long_retry_after_is_honoured_by_the_next_attempt(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, TEXTS[:2], max_retries=2)
        server.fail_next(Fault(status=429, retry_after="600"))

        t.sync()

        ledger = t.ledger()
        assert ledger and all(e["error_kind"] == "rate_limited" for e in ledger.values())
        assert all(e["delay"] >= 600 for e in ledger.values()), [e["delay"] for e in ledger.values()]


def test_a_run_level_fault_fails_the_run_and_records_nothing(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, TEXTS)
        pending = t.pending()
        server.fail_next(Fault(status=401))

        with pytest.raises(ProviderError) as info:
            t.sync()

        assert info.value.kind == "auth"
        # Not the rows' fault: no row is blamed, no change leaves the log, the next run does it all.
        assert t.ledger() == {} and t.stored() == {} and t.pending() == pending
        t.sync()
        assert len(t.stored()) == len(TEXTS) and t.pending() == 0


# Faults one input can cause: the batch is split until the bad inputs are alone ------------------


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(malformed=True), id="malformed-json"),
        pytest.param(Fault(vector_count_delta=-1), id="too-few-vectors"),
        pytest.param(Fault(vector_count_delta=2), id="too-many-vectors"),
        pytest.param(Fault(dimensions=DIMENSIONS + 1), id="wrong-dimension"),
        pytest.param(Fault(nan=True), id="nan"),
    ],
)
def test_an_unusable_response_is_split_and_the_halves_are_stored(
    fault: Fault, make_ledger_table: MakeTable
) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, TEXTS)
        server.fail_next(fault)

        stats = t.sync()

        assert [len(r.inputs) for r in server.requests] == [8, 4, 4]
        assert t.stored() == dict(enumerate(TEXTS, 1)) and t.ledger() == {} and t.pending() == 0
        assert stats.provider_requests == 3


def test_an_unusable_response_every_time_is_recorded_per_row(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, TEXTS[:4])
        server.fail_next([Fault(dimensions=3)] * 20)

        t.sync()

        # 4 -> 2 + 2 -> 1 + 1 + 1 + 1: seven requests, then each row is on its own in the ledger.
        assert len(server.requests) == 7
        ledger = t.ledger()
        assert set(ledger) == {1, 2, 3, 4} and t.stored() == {}
        assert all(e["error_kind"] == "bad_response" and "dimensions" in e["last_error"] for e in ledger.values())


def test_poison_rows_are_isolated_and_the_rest_of_the_batch_is_stored(make_ledger_table: MakeTable) -> None:
    texts = [f"ordinary row {i}" for i in range(1, 33)]
    for i in (5, 6, 20):
        texts[i - 1] = f"POISON row {i}"
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text) as server:
        t = make_ledger_table(server.base_url, texts, batch_size=32)

        stats = t.sync()

        assert set(t.ledger()) == {5, 6, 20}
        assert set(t.stored()) == set(range(1, 33)) - {5, 6, 20}
        assert stats.rows_written == 29 and stats.rows_failed == 3 and t.pending() == 0
        for row_id, entry in t.ledger().items():
            assert entry["error_kind"] == "bad_request" and f"row [{row_id}]" in entry["last_error"]
        # Halving finds 3 bad rows among 32 in fewer requests than one per row (at most 1+2+4+6+6+6).
        assert len(server.requests) <= 25
        # Every good row was sent until it was stored; the poison rows were sent whole.
        assert {text for r in server.requests for text in r.inputs} == set(texts)


# Inputs over the token limit ---------------------------------------------------------------------


def test_an_input_over_the_token_limit_is_split_never_cut(make_ledger_table: MakeTable) -> None:
    # OpenAI's limit is 8191 tokens per input; the provider counts UTF-8 bytes, so 30,000
    # characters must reach the server as several inputs that together are the whole text.
    words = [f"w{i}" for i in range(6000)]
    long_text = " ".join(words)[:30_000]
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, [long_text, "short"])

        t.sync()

        pieces = t.conn.execute(
            sql.SQL("SELECT chunk FROM {} WHERE id = 1 ORDER BY chunk_seq").format(t.table.store)
        ).fetchall()
        assert len(pieces) >= 4 and "".join(p for (p,) in pieces) == long_text
        sent = [text for r in server.requests for text in r.inputs]
        assert max(len(s.encode()) for s in sent) <= 8191
        assert t.ledger() == {}


def test_an_input_the_server_finds_too_long_is_recorded_whole(make_ledger_table: MakeTable) -> None:
    # A compatible server with a smaller window than declared (a local model, say) refuses the
    # input: the row is recorded, the rest stored, and nothing is shortened to make it fit.
    long_text = "a sentence that goes on. " * 200
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: len(text) > 1000) as server:
        t = make_ledger_table(server.base_url, ["short one", long_text, "short two"])

        t.sync()

        assert set(t.stored()) == {1, 3}
        ledger = t.ledger()
        assert set(ledger) == {2} and ledger[2]["error_kind"] == "bad_request"
        sent = [text for r in server.requests for text in r.inputs]
        assert long_text in sent and not [s for s in sent if s != long_text and s in long_text]


# Backoff, dead letters, and leaving the ledger ---------------------------------------------------


def test_backoff_grows_with_jitter_rows_die_after_max_attempts_and_cured_rows_leave(
    make_ledger_table: MakeTable,
) -> None:
    cured: set[str] = set()
    texts = [f"{'POISON ' if i % 3 == 0 else ''}row {i}" for i in range(1, 31)]
    poisoned = {i for i in range(1, 31) if i % 3 == 0}
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text and text not in cured) as server:
        t = make_ledger_table(server.base_url, texts,
                              retry=RetryPolicy(max_attempts=3, base_seconds=BASE_SECONDS, max_seconds=3600))
        t.sync()
        first = t.ledger()
        assert set(first) == poisoned
        delays = [e["delay"] for e in first.values()]
        assert all(0.8 * BASE_SECONDS <= d <= 1.2 * BASE_SECONDS for d in delays), delays
        # Jitter: ten rows failing in one statement are not all due at the same instant.
        assert len({round(d, 3) for d in delays}) >= 8 and max(delays) - min(delays) > 1.0, delays

        # Not due yet: nothing goes back.
        assert t.engine.requeue_due_failures() == 0
        t.make_due()
        assert t.engine.requeue_due_failures() == len(poisoned)
        t.sync()
        second = t.ledger()
        assert {e["attempts"] for e in second.values()} == {2}
        assert all(2 * 0.8 * BASE_SECONDS <= e["delay"] <= 2 * 1.2 * BASE_SECONDS for e in second.values())
        assert all(second[i]["first_failed_at"] == first[i]["first_failed_at"] for i in poisoned)
        assert all(second[i]["last_failed_at"] > first[i]["last_failed_at"] for i in poisoned)

        # The provider accepts three of them now: they are stored and leave the ledger.
        cured.update(texts[i - 1] for i in (3, 6, 9))
        t.make_due()
        assert t.engine.requeue_due_failures() == len(poisoned)
        t.sync()
        third = t.ledger()
        assert set(third) == poisoned - {3, 6, 9}
        assert {3, 6, 9} <= set(t.stored())
        # The third failure is the last: dead, with no next attempt, and no longer re-queued.
        assert all(e["attempts"] == 3 and e["state"] == "dead" and e["delay"] is None for e in third.values())
        t.make_due()
        assert t.engine.requeue_due_failures() == 0

        # A dead row whose text the application fixes is embedded and leaves the ledger.
        t.conn.execute(sql.SQL("UPDATE {} SET body = 'fixed row 12' WHERE id = 12").format(t.table.source))
        t.sync()
        assert 12 not in t.ledger() and t.stored()[12] == "fixed row 12"
        assert len(t.ledger()) == len(poisoned) - 4 and t.pending() == 0


def test_a_row_skipped_before_counts_its_real_attempts_from_one(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text) as server:
        t = make_ledger_table(server.base_url, ["fine", "   "],
                              retry=RetryPolicy(max_attempts=2, base_seconds=BASE_SECONDS))
        t.sync()
        assert t.ledger()[2]["error_kind"] == "skipped"

        t.conn.execute(sql.SQL("UPDATE {} SET body = 'POISON now' WHERE id = 2").format(t.table.source))
        t.sync()

        entry = t.ledger()[2]
        assert entry["error_kind"] == "bad_request"
        assert (entry["attempts"], entry["state"]) == (1, "retrying"), entry
        assert 0.8 * BASE_SECONDS <= entry["delay"] <= 1.2 * BASE_SECONDS


def test_a_sweep_does_not_resend_dead_or_not_yet_due_rows(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text) as server:
        t = make_ledger_table(server.base_url, ["fine", "POISON dead", "POISON waiting"])
        t.sync()
        assert set(t.ledger()) == {2, 3}
        # Row 2 has used up its attempts; row 3 is not due for an hour.
        t.conn.execute("UPDATE vectorsync.failures SET dead = true, attempts = 6, next_attempt_at = NULL "
                       "WHERE table_name = %s AND row_key = '[2]'", (t.name,))
        t.conn.execute("UPDATE vectorsync.failures SET next_attempt_at = now() + interval '1 hour' "
                       "WHERE table_name = %s AND row_key = '[3]'", (t.name,))
        sent = len(server.requests)

        t.sync(full=True)

        resent = [text for r in server.requests[sent:] for text in r.inputs]
        assert resent == [], resent


def test_max_attempts_one_means_the_first_failure_is_dead(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text) as server:
        t = make_ledger_table(server.base_url, ["POISON"], retry=RetryPolicy(max_attempts=1))

        t.sync()

        entry = t.ledger()[1]
        assert (entry["attempts"], entry["state"], entry["delay"]) == (1, "dead", None), entry


def test_a_provider_outage_never_makes_a_row_dead(make_ledger_table: MakeTable) -> None:
    """Only errors a row can cause count toward max_attempts: an outage longer than every retry
    leaves the rows retrying (capped backoff), and they are stored once the provider is back."""
    cap = 3 * BASE_SECONDS
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        t = make_ledger_table(server.base_url, TEXTS[:3],
                              retry=RetryPolicy(max_attempts=2, base_seconds=BASE_SECONDS, max_seconds=cap))
        for attempt in range(1, 6):
            server.fail_next([Fault(status=503)])  # one request per sync: the batch is not split
            t.make_due()
            t.engine.requeue_due_failures()
            t.sync()
            ledger = t.ledger()
            assert {(e["error_kind"], e["attempts"], e["state"]) for e in ledger.values()} == {
                ("server_error", attempt, "retrying")}, ledger
            # Doubling from the base, capped (jitter included) at max_seconds.
            expected = min(cap, BASE_SECONDS * 2 ** (attempt - 1))
            assert all(0.8 * expected - 1 <= e["delay"] <= min(cap, 1.2 * expected) + 1 for e in ledger.values())
        t.make_due()
        assert t.engine.requeue_due_failures() == 3
        t.sync()
        assert t.ledger() == {} and set(t.stored()) == {1, 2, 3} and t.pending() == 0


def test_a_row_level_error_still_dies_after_max_attempts(make_ledger_table: MakeTable) -> None:
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text) as server:
        t = make_ledger_table(server.base_url, ["POISON"], retry=RetryPolicy(max_attempts=2, base_seconds=BASE_SECONDS))
        t.sync()
        assert (t.ledger()[1]["attempts"], t.ledger()[1]["state"]) == (1, "retrying")
        t.make_due()
        t.engine.requeue_due_failures()
        t.sync()
        entry = t.ledger()[1]
        assert (entry["error_kind"], entry["attempts"], entry["state"], entry["delay"]) == (
            "bad_request", 2, "dead", None), entry
