"""The asset checks (issue 4, item 3), each evaluated by Dagster against a Postgres-backed instance:
shown failing in the very state it exists to catch, then passing once that state is repaired.
Also the per-table `retry:` block of a YAML declaration, which decides when a failed row is dead.

Tables are embedded through the OpenAI-compatible test server: fast, deterministic, and able to
reject chosen inputs, which is how rows are made to fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import yaml
from openai_server import OpenAIServer
from psycopg import sql

from orchestration.checks import embeddings_checks
from orchestration.embedding_assets import embeddings_asset
from assets.install import install
from assets.spec import SpecError, TableSpec, load_spec_file
from orchestration.instance import prepare_instance
from orchestration.names import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG, embeddings_asset_key
from orchestration.resources import VectorsyncDatabase
from orchestration.quality import search_quality_asset
from orchestration.versions_dagster import promote_job

from conftest import unique

from assets.names import slot_name
from assets.wal_capture import drop_slot_and_publication

DIMENSIONS = 8
POISON = "poison"


@pytest.fixture(scope="module")
def instance(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dg.DagsterInstance]:
    home = prepare_instance(db_url, tmp_path_factory.mktemp("dagster_home"))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    # Any request carrying a text with POISON is refused with HTTP 400, as a provider refuses a
    # bad input: the engine splits the batch and records each poisoned row on its own.
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: POISON in text) as srv:
        yield srv


class Declared:
    """A source table (id, body) declared in a YAML file, installed, embedded through Dagster."""

    def __init__(self, conn: psycopg.Connection, db_url: str, instance: dg.DagsterInstance,
                 spec: TableSpec, origin: str) -> None:
        self.conn, self.db_url, self.instance, self.spec, self.origin = conn, db_url, instance, spec, origin
        self.source = sql.Identifier(spec.source.schema_, spec.source.table)
        self.store = sql.Identifier(spec.store_schema, spec.store_name)
        self.queue = sql.Identifier("vectorsync", spec.queue_name)
        self.resources = {"database": VectorsyncDatabase(url=db_url)}

    def materialize(self) -> dg.ExecuteInProcessResult:
        """One run over every partition, as a backfill from the UI does."""
        key = embeddings_asset_key(self.spec)
        return dg.materialize(
            [embeddings_asset(self.spec, self.origin)],
            instance=self.instance,
            resources=self.resources,
            run_config={"ops": {key.to_python_identifier(): {"config": {"full_sweep": True}}}},
            tags={PARTITION_RANGE_START_TAG: "000",
                  PARTITION_RANGE_END_TAG: f"{self.spec.buckets - 1:03d}"},
        )

    def checks(self) -> dict[str, dg.AssetCheckEvaluation]:
        checks = embeddings_checks(self.spec)
        result = dg.materialize([embeddings_asset(self.spec, self.origin), *checks], instance=self.instance,
                                resources=self.resources, selection=dg.AssetSelection.checks(*checks))
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    def check(self, name: str) -> dg.AssetCheckEvaluation:
        return self.checks()[name]

    def bucket_of(self, key: int) -> int:
        return self.conn.execute("SELECT vectorsync.bucket_of(jsonb_build_array(%s::int), %s)",
                                 (key, self.spec.buckets)).fetchone()[0]

    def ledger(self) -> dict[int, tuple[str, int, bool]]:
        """row id -> (error kind, attempts, dead)."""
        rows = self.conn.execute(
            "SELECT (row_key ->> 0)::int, error_kind, attempts, dead FROM vectorsync.failures "
            "WHERE table_name = %s", (self.spec.name,)).fetchall()
        return {k: (kind, attempts, dead) for k, kind, attempts, dead in rows}


Declare = Callable[..., Declared]


@pytest.fixture
def declare(conn: psycopg.Connection, db_url: str, instance: dg.DagsterInstance, server: OpenAIServer,
            tmp_path: Path) -> Declare:
    def _declare(texts: dict[int, str], **fields: Any) -> Declared:
        schema = unique("chk")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        source = sql.Identifier(schema, "docs")
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(source))
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(source), list(texts.items()))
        name = unique("chk")
        declaration = {
            "name": name, "source": f"{schema}.docs", "columns": ["body"], "chunking": None, "buckets": 2,
            "provider": {"kind": "openai", "model": "test-embed", "dimensions": DIMENSIONS,
                         "base_url": server.base_url, "api_key_env": "VECTORSYNC_TEST_UNSET_KEY",
                         "max_retries": 0, "timeout_seconds": 5},
            **fields,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(declaration))
        spec = load_spec_file(path)
        install(conn, [(spec, str(path))])
        return Declared(conn, db_url, instance, spec, str(path))

    return _declare


TEXTS = {i: f"document number {i}" for i in range(1, 9)}


# coverage ----------------------------------------------------------------------------------------


def test_coverage_fails_for_a_row_whose_chunks_vanished_and_passes_once_it_is_embedded(declare: Declare) -> None:
    t = declare(TEXTS)
    assert t.materialize().success
    covered = t.check("coverage")
    assert covered.passed and covered.metadata["uncovered_rows"].value == 0

    # Row 3's chunks move to a key no source row has: row 3 has no embedding, with no change
    # logged and nothing in the ledger, while the store still holds as many keys as the source
    # has rows (a check subtracting totals saw nothing wrong here).
    t.conn.execute(sql.SQL("UPDATE {} SET id = 1000 WHERE id = 3").format(t.store))
    assert t.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t.queue)).fetchone()[0] == 0
    assert t.ledger() == {}

    gap = t.check("coverage")
    assert not gap.passed
    assert gap.metadata["uncovered_rows"].value == 1
    assert gap.metadata["sample_uncovered_keys"].value == [[3]]
    assert gap.metadata["source_rows"].value == len(TEXTS)

    # Deleted outright: still one uncovered row, the same one.
    t.conn.execute(sql.SQL("DELETE FROM {} WHERE id = 1000").format(t.store))
    assert t.check("coverage").metadata["sample_uncovered_keys"].value == [[3]]

    # The reconcile sweep (a full run) embeds it again.
    assert t.materialize().success
    assert t.check("coverage").passed


def test_coverage_counts_a_chunk_of_an_old_model_as_uncovered(declare: Declare) -> None:
    t = declare(TEXTS)
    assert t.materialize().success
    t.conn.execute(sql.SQL("UPDATE {} SET model = 'an/old/model' WHERE id = 5").format(t.store))
    stale = t.check("coverage")
    assert not stale.passed and stale.metadata["sample_uncovered_keys"].value == [[5]]


def test_coverage_excuses_a_pending_key_a_pending_sweep_and_a_ledger_entry(declare: Declare) -> None:
    """Each reason a row may lack a current chunk, one at a time, for the same unembedded row.
    (Writes the change log in its format of one entry per statement and bucket: `row_keys jsonb[]`.)"""
    t = declare(TEXTS)
    assert t.materialize().success
    t.conn.execute(sql.SQL("DELETE FROM {} WHERE id = 4").format(t.store))
    assert not t.check("coverage").passed
    bucket = t.bucket_of(4)

    # Its key pending, in an entry with another key of its bucket.
    t.conn.execute(
        sql.SQL("INSERT INTO {} (bucket, row_keys) VALUES (%s, ARRAY['[4]', '[99]']::jsonb[])").format(t.queue),
        (bucket,),
    )
    assert t.check("coverage").passed
    t.conn.execute(sql.SQL("DELETE FROM {}").format(t.queue))

    # A sweep of its bucket pending; a sweep of the other bucket does not excuse it.
    t.conn.execute(sql.SQL("INSERT INTO {} (bucket, row_keys) VALUES (%s, NULL)").format(t.queue),
                   (1 - bucket,))
    assert not t.check("coverage").passed
    t.conn.execute(sql.SQL("INSERT INTO {} (bucket, row_keys) VALUES (%s, NULL)").format(t.queue), (bucket,))
    assert t.check("coverage").passed
    t.conn.execute(sql.SQL("DELETE FROM {}").format(t.queue))

    # In the failure ledger.
    t.conn.execute(
        """INSERT INTO vectorsync.failures (table_name, row_key, bucket, error_kind, last_error)
           VALUES (%s, '[4]', %s, 'bad_request', 'refused')""", (t.spec.name, bucket))
    assert t.check("coverage").passed


# dead letters ------------------------------------------------------------------------------------


def test_dead_letters_fails_with_identical_errors_grouped_and_passes_once_the_rows_are_fixed(
    declare: Declare,
) -> None:
    poisoned = [2, 5, 7]
    t = declare({**TEXTS, **{i: f"{POISON} document {i}" for i in poisoned}}, retry={"max_attempts": 1})
    assert t.materialize().success
    assert {k for k, (_, _, dead) in t.ledger().items() if dead} == set(poisoned)

    dead = t.check("dead_letters")
    assert not dead.passed
    assert dead.metadata["dead_rows"].value == 3
    # One group for the three rows: the "table X, row [key]: " prefix of each error is not part
    # of what is grouped.
    lines = [line for line in dead.metadata["top_errors"].value.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("- 3 x bad_request: ")
    assert "row [" not in lines[0] and t.spec.name not in lines[0]

    # Fixed at the source: their new text reaches them through the change log.
    t.conn.execute(sql.SQL("UPDATE {} SET body = 'fixed document ' || id WHERE id = ANY(%s)").format(t.source),
                   (poisoned,))
    assert t.materialize().success
    assert t.ledger() == {}
    assert t.check("dead_letters").passed


# vector validity ---------------------------------------------------------------------------------


def test_vector_validity_fails_for_a_zero_vector_and_passes_once_it_is_gone(declare: Declare) -> None:
    t = declare(TEXTS)
    assert t.materialize().success
    assert t.check("vector_validity").passed

    t.conn.execute(
        sql.SQL("""INSERT INTO {} (id, chunk_seq, chunk, text_hash, model, bucket, embedding)
                   SELECT id, 1, 'a second chunk', '\\x00'::bytea, model, bucket, array_fill(0, ARRAY[%s])::vector
                   FROM {} WHERE id = 1 AND chunk_seq = 0""").format(t.store, t.store),
        (DIMENSIONS,),
    )
    zero = t.check("vector_validity")
    assert not zero.passed
    assert zero.metadata["zero_vectors"].value == 1
    assert zero.metadata["wrong_dimensions"].value == 0

    t.conn.execute(sql.SQL("DELETE FROM {} WHERE id = 1 AND chunk_seq = 1").format(t.store))
    assert t.check("vector_validity").passed


# the five as one step -----------------------------------------------------------------------------


def test_one_check_can_run_alone_and_a_failing_query_fails_only_its_own_checks(declare: Declare) -> None:
    t = declare(TEXTS)
    assert t.materialize().success
    checks = embeddings_checks(t.spec)
    key = embeddings_asset_key(t.spec)
    only = dg.materialize([embeddings_asset(t.spec, t.origin), *checks], instance=t.instance, resources=t.resources,
                          selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, "dead_letters")))
    assert [e.check_name for e in only.get_asset_check_evaluations()] == ["dead_letters"]

    # With the store gone, the three checks that read it fail with the error; the two that read
    # the change log and the ledger still pass, and so does the candidate's (there is none).
    t.conn.execute(sql.SQL("DROP TABLE {} CASCADE").format(t.store))
    evaluations = t.checks()
    assert sorted(n for n, e in evaluations.items() if e.passed) == ["backlog_age", "candidate_coverage", "dead_letters"]
    for name in ("coverage", "vector_validity", "model_consistency"):
        assert not evaluations[name].passed
        assert "UndefinedTable" in evaluations[name].metadata["error"].value, name
        assert t.spec.name in evaluations[name].metadata["error"].value


# candidate coverage (model versions) -------------------------------------------------------------


def test_candidate_coverage_warns_while_a_new_model_fills_then_the_promote_job_switches(declare: Declare) -> None:
    t = declare(TEXTS)
    assert t.materialize().success
    assert t.check("candidate_coverage").passed
    new_spec = t.spec.model_copy(update={"provider": t.spec.provider.model_copy(update={"model": "test-embed-2"})})
    install(t.conn, [(new_spec, t.origin)])
    filling = t.check("candidate_coverage")
    assert not filling.passed and filling.severity == dg.AssetCheckSeverity.WARN
    assert (filling.metadata["rows_covered"].value, filling.metadata["source_rows"].value) == (0, 8)
    assert filling.metadata["fingerprint"].value == new_spec.fingerprint
    # A run over every partition fills the candidate too; the asset shows its progress, and the
    # other checks still audit the active version, which is untouched.
    new = Declared(t.conn, t.db_url, t.instance, new_spec, t.origin)
    result = new.materialize()
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["model_fingerprint"].value == t.spec.fingerprint
    assert (metadata["candidate_rows_covered"].value, metadata["candidate_source_rows"].value) == (8, 8)
    evaluations = new.checks()
    assert all(e.passed for e in evaluations.values()), {n: e.metadata for n, e in evaluations.items()}
    assert evaluations["model_consistency"].metadata["fingerprint"].value == t.spec.fingerprint
    promoted = promote_job(new_spec, t.origin).execute_in_process(instance=t.instance, resources=new.resources)
    assert promoted.success
    assert dict(t.conn.execute("SELECT version, state FROM vectorsync.versions WHERE table_name = %s",
                               (new_spec.name,)).fetchall()) == {1: "previous", 2: "active"}
    assert new.check("model_consistency").metadata["fingerprint"].value == new_spec.fingerprint
    # Nothing left to promote: the job fails with the reason.
    again = promote_job(new_spec, t.origin).execute_in_process(instance=t.instance, resources=new.resources,
                                                               raise_on_error=False)
    assert not again.success


def test_search_quality_asset_records_each_live_versions_figures(declare: Declare, tmp_path: Path) -> None:
    # Beside the declarations (the fixture writes them to tmp_path): queries that are rows' own
    # texts, which the test server embeds to the very vectors it stored, so every answer ranks first.
    (tmp_path / "golden.yaml").write_text(yaml.safe_dump([{"query": TEXTS[i], "expected": [i]} for i in (1, 2, 3)]))
    t = declare(TEXTS, versions={"golden": "golden.yaml", "golden_k": 3})
    assert t.materialize().success

    def figures() -> dict[str, Any]:
        result = dg.materialize([search_quality_asset(t.spec, t.origin)], instance=t.instance, resources=t.resources)
        assert result.success
        metadata = result.get_asset_materialization_events()[0].materialization.metadata
        return {k: v.value for k, v in metadata.items()}

    first = figures()
    assert (first["active_version"], first["active_recall@3"], first["active_mrr@10"]) == (1, 1.0, 1.0)
    assert not any(k.startswith("candidate_") for k in first)
    # A candidate filling: both versions are scored, each with its own model.
    new_spec = t.spec.model_copy(update={"provider": t.spec.provider.model_copy(update={"model": "test-embed-2"})})
    install(t.conn, [(new_spec, t.origin)])
    assert Declared(t.conn, t.db_url, t.instance, new_spec, t.origin).materialize().success
    both = figures()
    assert (both["candidate_version"], both["candidate_recall@3"], both["active_golden_queries"]) == (2, 1.0, 3)
    # A golden answer whose row is gone is left out and counted, not scored as a miss.
    t.conn.execute(sql.SQL("DELETE FROM {} WHERE id = 3").format(t.source))
    after = figures()
    assert after["golden_answers_missing"] == 1 and after["active_golden_queries"] == 2


# backlog age -------------------------------------------------------------------------------------


def test_backlog_age_fails_for_an_old_pending_change_and_passes_once_it_is_drained(declare: Declare) -> None:
    t = declare(TEXTS, max_backlog_seconds=60)
    assert t.materialize().success
    assert t.check("backlog_age").passed

    # A change nobody has run for in an hour, as when the sensor is stopped.
    t.conn.execute(
        sql.SQL("""INSERT INTO {} (bucket, row_keys, queued_at)
                   VALUES (%s, ARRAY['[6]'::jsonb], now() - interval '1 hour')""").format(t.queue),
        (t.bucket_of(6),),
    )
    late = t.check("backlog_age")
    assert not late.passed
    assert late.metadata["pending_changes"].value == 1
    assert late.metadata["oldest_change_seconds"].value >= 3600

    assert t.materialize().success
    assert t.check("backlog_age").passed


# the retry block ---------------------------------------------------------------------------------


def test_yaml_retry_max_attempts_1_makes_a_row_dead_after_its_first_failure(declare: Declare) -> None:
    texts = {**TEXTS, 3: f"{POISON} document 3"}
    once = declare(texts, retry={"max_attempts": 1})
    default = declare(texts)
    assert once.spec.fingerprint == default.spec.fingerprint  # retrying shapes no vector

    assert once.materialize().success and default.materialize().success

    assert once.ledger() == {3: ("bad_request", 1, True)}
    assert default.ledger() == {3: ("bad_request", 1, False)}  # 5 attempts left by default
    state = once.conn.execute("SELECT state, next_attempt_at FROM vectorsync.failure_report "
                              "WHERE table_name = %s", (once.spec.name,)).fetchone()
    assert state == ("dead", None)


@pytest.mark.parametrize(
    ("retry", "field", "message"),
    [
        ({"max_attempts": 0}, "retry.max_attempts", "greater than or equal to 1"),
        ({"base_seconds": 0}, "retry.base_seconds", "greater than 0"),
        ({"base_seconds": 60, "max_seconds": 10}, "retry.max_seconds", "at least base_seconds (60)"),
        ({"max_attemps": 3}, "retry.max_attemps", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_retry_field_is_refused_naming_the_file_and_field(
    tmp_path: Path, retry: dict[str, Any], field: str, message: str
) -> None:
    path = tmp_path / "notes.yaml"
    path.write_text(yaml.safe_dump({"name": "notes", "source": "public.notes", "columns": ["body"],
                                    "retry": retry}))
    with pytest.raises(SpecError) as refused:
        load_spec_file(path)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{path}: {field}: ") and message in str(refused.value)


def test_coverage_holds_for_a_timestamptz_key_and_a_percent_in_the_schema_name(
    conn: psycopg.Connection, db_url: str, instance: dg.DagsterInstance, server: OpenAIServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coverage check compares keys as the triggers and the engine print them, whatever the
    time zone of the session it runs in, and a % in a name is never read as a placeholder."""
    schema = f"{unique('chk')} 100%s"
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    source = sql.Identifier(schema, "events")
    conn.execute(sql.SQL("CREATE TABLE {} (at timestamptz PRIMARY KEY, body text)").format(source))
    conn.execute(sql.SQL("INSERT INTO {} VALUES ('2024-03-01 10:00+05:30', 'kolkata morning'), "
                         "('infinity', 'the end of time')").format(source))
    name = unique("chk")
    declaration = {"name": name, "source": {"schema": schema, "table": "events"}, "columns": ["body"],
                   "chunking": None, "buckets": 2,
                   "provider": {"kind": "openai", "model": "test-embed", "dimensions": DIMENSIONS,
                                "base_url": server.base_url, "api_key_env": "VECTORSYNC_TEST_UNSET_KEY"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(declaration))
    spec = load_spec_file(path)
    install(conn, [(spec, str(path))])
    t = Declared(conn, db_url, instance, spec, str(path))
    assert t.materialize().success
    # The checks' own connection starts in another time zone than the engine's key settings.
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")
    checks = t.checks()
    assert checks["coverage"].passed, checks["coverage"].metadata
    assert checks["coverage"].metadata["uncovered_rows"].value == 0
    assert checks["vector_validity"].passed and checks["vector_validity"].metadata["chunks"].value == 2


# capture: logical --------------------------------------------------------------------------------


def test_logical_capture_counts_keys_still_in_the_wal_and_watches_its_slot(
    declare: Declare, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = declare(TEXTS, capture="logical")
    try:
        assert t.materialize().success
        # A row written after the run, its key still only in the WAL: pending, so covered.
        t.conn.execute(sql.SQL("INSERT INTO {} VALUES (100, 'written later')").format(t.source))
        evaluations = t.checks()
        assert evaluations["coverage"].passed, evaluations["coverage"].metadata
        assert evaluations["backlog_age"].metadata["pending_changes"].value == 1
        slot = evaluations["capture_slot"]
        assert slot.passed and slot.metadata["state"].value == "ok"

        # A slot keeping more WAL than the limit warns (any WAL at all, with the limit at 0).
        monkeypatch.setattr("orchestration.checks.SLOT_RETAINED_WARN_BYTES", 0)
        kept = t.check("capture_slot")
        assert not kept.passed and kept.severity == dg.AssetCheckSeverity.WARN
        assert kept.metadata["retained_wal_bytes"].value > 0
    finally:
        drop_slot_and_publication(t.conn, t.spec.name)
