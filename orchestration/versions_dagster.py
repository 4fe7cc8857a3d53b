"""Model versions in Dagster: a partition run syncs every live version of its buckets (the active
one by the asset itself, the others here), shows a candidate's progress, promotes a complete one
when the declaration says `promote: auto`; the `<name>_promote` job; dropping expired versions."""


import dagster as dg
import psycopg

from assets import versions
from assets.catalog import ResolvedTable, resolve
from assets.engine import EmbeddingEngine, retry_policy
from assets.promotion import PromotionRefused, Switch, drop_expired, maybe_auto_promote, progress, promote
from assets.golden import GoldenError
from assets.providers import provider_for
from assets.quality_gate import gate_for, live_quality
from assets.spec import TableSpec
from assets.run_ledger import RunLedger

from .resources import VectorsyncDatabase


def sync_other_versions(
    context: dg.AssetExecutionContext, conn: psycopg.Connection, ledger_conn: psycopg.Connection,
    others: list[versions.VersionTable], buckets: list[int], full: bool, retry_due: bool, trigger: str,
) -> None:
    """The run's buckets in every live version but the active one (a candidate filling, a previous
    one kept for a rollback), each with its own model and run-ledger rows (`<run id>/v<N>`)."""
    for vt in others:
        spec, number = vt.table.spec, vt.version.version
        ledger = RunLedger(ledger_conn, f"{context.run.run_id}/v{number}", spec, trigger, buckets)
        metered = ledger.metered(provider_for(spec.provider))
        engine = EmbeddingEngine(conn, vt.table, metered, retry=retry_policy(spec), reuse_from=vt.reuse_from)
        engine.on_page = ledger.add
        outcome = "failed"
        try:
            if retry_due:
                engine.requeue_due_failures()
            ledger.settle(engine.sync_buckets(buckets, full=full, should_stop=lambda: metered.exhausted))
            outcome = "succeeded"
        finally:
            engine.close()
            ledger.finish(outcome)
        total = ledger.totals()
        context.log.info(f"{spec.name} version {number} ({vt.version.state}): {total.rows_written} rows written, "
                         f"{total.chunks_embedded} chunks embedded, {total.chunks_reused} reused")


def version_metadata(conn: psycopg.Connection, live: list[versions.VersionTable]) -> dict:
    """The asset's metadata about versions: the active one, and a candidate's progress."""
    active = live[0].version
    metadata: dict = {"model_version": active.version, "model_fingerprint": active.fingerprint}
    for vt in live[1:]:
        if vt.version.state == "candidate":
            covered, total = progress(conn, vt.table)
            metadata.update({
                "candidate_version": vt.version.version, "candidate_fingerprint": vt.version.fingerprint,
                "candidate_rows_covered": covered, "candidate_source_rows": total,
                "candidate_progress": dg.MetadataValue.float(round(covered / total, 4) if total else 1.0),
            })
    return metadata


def auto_promote(context: dg.AssetExecutionContext | dg.OpExecutionContext, conn: psycopg.Connection,
                 declared: ResolvedTable) -> Switch | None:
    """`versions.promote: auto`: a run that finds the candidate complete promotes it."""
    try:
        switched = maybe_auto_promote(conn, declared, gate_for(declared))
    except (PromotionRefused, GoldenError) as exc:
        context.log.warning(str(exc))
        return None
    if switched is not None:
        context.log.info(f"{declared.spec.name}: version {switched.active} promoted (versions.promote: auto), "
                         f"version {switched.previous} kept for a rollback")
    return switched


def promote_job(spec: TableSpec, origin: str) -> dg.JobDefinition:
    """`<name>_promote`: what `vectorsync promote NAME` does, from the UI."""

    @dg.op(
        name=f"promote_{spec.name}_candidate",
        description=f"Makes {spec.name}'s candidate model version the active one, in one transaction, "
        "if it covers every row (its HNSW index is built first); the version it replaces is kept "
        f"for {spec.versions.keep_previous_hours:g} h for `vectorsync rollback {spec.name}`.",
        tags={"vectorsync/table": spec.name},
    )
    def promote_candidate(context: dg.OpExecutionContext, database: VectorsyncDatabase) -> dg.Output:
        with database.connect() as conn:
            try:
                declared = resolve(conn, spec, origin)
                switched = promote(conn, declared, gate_for(declared))
            except (PromotionRefused, GoldenError) as exc:
                raise dg.Failure(description=str(exc)) from None
        context.log.info(f"{spec.name}: version {switched.active} is active, version {switched.previous} was"
                         + (f"; quality gate: {switched.gate.reason}" if switched.gate else ""))
        return dg.Output(None, metadata={"active_version": switched.active, "previous_version": switched.previous,
                                         "bytes_freed": sum(switched.dropped.values()),
                                         **(switched.gate.metadata if switched.gate else {})})

    return one_op_job(spec, f"{spec.name}_promote",
                      f"Promotes {spec.name}'s candidate model version once it is complete.", promote_candidate)


def one_op_job(spec: TableSpec, name: str, description: str, op: dg.OpDefinition) -> dg.JobDefinition:
    """A table's job of one op, run in the run's own process."""

    @dg.job(name=name, description=description, executor_def=dg.in_process_executor,
            tags={"vectorsync/table": spec.name})
    def _job() -> None:
        op()

    return _job


def drop_expired_versions(context: dg.OpExecutionContext, conn: psycopg.Connection, declared: ResolvedTable) -> int:
    """Drop previous versions past their keep period; returns the bytes freed (and logs them)."""
    dropped = drop_expired(conn, declared)
    for number, freed in dropped.items():
        context.log.info(f"{declared.spec.name}: version {number} dropped after its keep period, {freed} bytes freed")
    return sum(dropped.values())


def has_expired_versions(conn: psycopg.Connection, name: str) -> bool:
    return versions.installed(conn) and conn.execute(
        """SELECT 1 FROM vectorsync.versions WHERE table_name = %s AND state = 'previous'
           AND drop_after <= now()""", (name,)).fetchone() is not None
