"""The Dagster side of one declared table: its source asset, its embeddings asset and its checks."""


from functools import lru_cache

import dagster as dg
from psycopg import sql
from pydantic import Field

from .catalog import resolve
from .engine import EmbeddingEngine, SyncStats
from .providers import EmbeddingProvider, build_provider
from orchestration.resources import VectorsyncDatabase
from .spec import ProviderSpec, TableSpec
from .status import table_status

GROUP = "embeddings"
SOURCE_GROUP = "sources"


def bucket_partition_key(bucket: int) -> str:
    return f"{bucket:03d}"


def partitions_for(spec: TableSpec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([bucket_partition_key(b) for b in range(spec.buckets)])


def source_asset_key(spec: TableSpec) -> dg.AssetKey:
    return dg.AssetKey(["postgres", spec.source.schema_, spec.source.table])


def embeddings_asset_key(spec: TableSpec) -> dg.AssetKey:
    return dg.AssetKey(["embeddings", spec.name])


@lru_cache(maxsize=8)
def provider_for(spec: ProviderSpec) -> EmbeddingProvider:
    """One provider per process and model: loading a local model takes seconds."""
    return build_provider(spec)


class EmbeddingRunConfig(dg.Config):
    full_sweep: bool = Field(
        default=True,
        description="Compare every row of the bucket with the store (backfills, manual runs). The "
        "change sensor turns this off: its runs only drain the change log.",
    )


def source_asset_spec(spec: TableSpec) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=source_asset_key(spec),
        group_name=SOURCE_GROUP,
        kinds={"postgres"},
        description=f"The PostgreSQL table {spec.source.qualified}, owned by your application. "
        "vectorsync only reads it; triggers record which rows change.",
        metadata={"dagster/table_name": spec.source.qualified},
    )


def embeddings_asset(spec: TableSpec, origin: str) -> dg.AssetsDefinition:
    provider = spec.provider
    description = (
        spec.description
        or f"Vector embeddings of {spec.source.qualified} ({', '.join(spec.text_columns)}), made by "
        f"{provider.kind} model {provider.model} ({provider.dimensions} dimensions) and stored one row "
        f"per chunk in {spec.store_schema}.{spec.store_name}; query them through the view "
        f"{spec.store_schema}.{spec.view_name}. Partitions are {spec.buckets} hash buckets of the "
        "primary key: materializing a partition makes every row of that bucket current, and "
        "a backfill of all partitions re-embeds the table, reusing every vector whose text is unchanged."
    )

    @dg.asset(
        key=embeddings_asset_key(spec),
        deps=[source_asset_key(spec)],
        partitions_def=partitions_for(spec),
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=GROUP,
        kinds={"postgres", "pgvector", provider.kind},
        description=description,
        pool=f"vectorsync_{provider.kind}".replace("-", "_"),
        metadata={
            "dagster/table_name": f"{spec.store_schema}.{spec.store_name}",
            "declared_in": origin,
            "model": provider.model,
            "model_fingerprint": spec.fingerprint,
        },
        tags={"vectorsync/table": spec.name},
    )
    def _embeddings(
        context: dg.AssetExecutionContext, config: EmbeddingRunConfig, database: VectorsyncDatabase
    ) -> dg.MaterializeResult:
        buckets = [int(k) for k in context.partition_keys]
        total = SyncStats()
        with database.connect() as conn:
            table = resolve(conn, spec, origin)
            engine = EmbeddingEngine(conn, table, provider_for(spec.provider))
            try:
                for done, bucket in enumerate(buckets, start=1):
                    stats = engine.sync_bucket(bucket, full=config.full_sweep)
                    total.merge(stats)
                    left = total.seconds / done * (len(buckets) - done)
                    context.log.info(
                        f"{spec.name} bucket {bucket} ({done}/{len(buckets)}): {stats.rows_written} rows "
                        f"written, {stats.rows_unchanged} unchanged, {stats.rows_deleted} deleted, "
                        f"{stats.rows_failed} failed in {stats.seconds:.1f}s; so far "
                        f"{total.rows_written / max(total.seconds, 1e-9):.1f} rows/s, about {left:.0f}s left"
                    )
            finally:
                engine.close()
            store_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.store)).fetchone()[0]
            columns = dg.TableSchema(
                columns=[dg.TableColumn(c.name, c.type_sql) for c in table.key]
                + [
                    dg.TableColumn("chunk_seq", "int"),
                    dg.TableColumn("chunk", "text"),
                    dg.TableColumn("text_hash", "bytea"),
                    dg.TableColumn("model", "text"),
                    dg.TableColumn("embedding", f"{spec.vector_type}({provider.dimensions})"),
                ]
            )
            source = source_asset_key(spec)
            lineage = dg.TableColumnLineage(
                deps_by_column={
                    "chunk": [dg.TableColumnDep(source, c.name) for c in table.text_columns],
                    "embedding": [dg.TableColumnDep(source, c.name) for c in table.text_columns],
                    **{c.name: [dg.TableColumnDep(source, c.name)] for c in table.key},
                }
            )
        return dg.MaterializeResult(
            metadata={
                **total.as_dict(),
                "buckets": len(buckets),
                "rows_per_second": round(total.rows_written / total.seconds, 1) if total.seconds else 0.0,
                "dagster/row_count": store_rows,
                "dagster/table_name": f"{spec.store_schema}.{spec.store_name}",
                "dagster/column_schema": columns,
                "dagster/column_lineage": lineage,
            }
        )

    return _embeddings


def embeddings_checks(spec: TableSpec) -> list[dg.AssetChecksDefinition]:
    """What an auditor asks of a table: is every row covered, is the backlog fresh, did rows die."""
    key = embeddings_asset_key(spec)

    @dg.asset_check(asset=key, name="coverage", description="Every source row with content has a "
                    "current embedding, or a pending change, or a recorded failure.")
    def coverage(database: VectorsyncDatabase) -> dg.AssetCheckResult:
        with database.connect() as conn:
            s = table_status(conn, spec.name)
        uncovered = s.source_rows - s.rows_current - s.pending_changes - s.skipped_rows - s.failed_rows - s.dead_rows
        return dg.AssetCheckResult(
            passed=uncovered <= 0,
            metadata={"source_rows": s.source_rows, "rows_current": s.rows_current,
                      "pending_changes": s.pending_changes, "uncovered_rows": max(uncovered, 0)},
        )

    @dg.asset_check(asset=key, name="dead_letters", description="No row has exhausted its retries.")
    def dead_letters(database: VectorsyncDatabase) -> dg.AssetCheckResult:
        with database.connect() as conn:
            top = conn.execute(
                """SELECT error_kind, left(last_error, 200), count(*) FROM vectorsync.failures
                   WHERE table_name = %s AND dead GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5""",
                (spec.name,),
            ).fetchall()
        dead = sum(n for _, _, n in top)
        return dg.AssetCheckResult(
            passed=dead == 0,
            metadata={"dead_rows": dead, "top_errors": dg.MetadataValue.md(
                "\n".join(f"- {n} x {kind}: {err}" for kind, err, n in top) or "none")},
        )

    return [coverage, dead_letters]
