"""A table's search quality as a Dagster asset: recall@k and MRR@10 of every live model version on
its golden queries (assets/quality_gate.py), recorded as metadata so the UI plots them over time,
next to the promotion gate that judges a candidate by the same figures. Defined only for tables
that declare golden queries (`versions.golden` or `versions.golden_sql`)."""


import dagster as dg

from assets.catalog import resolve
from assets.quality_gate import live_quality
from assets.spec import TableSpec

from .names import embeddings_asset_key
from .resources import VectorsyncDatabase


def search_quality_key(spec: TableSpec) -> dg.AssetKey:
    return dg.AssetKey([*spec.asset.key_prefix, f"{spec.name}_search_quality"])


def search_quality_asset(spec: TableSpec, origin: str) -> dg.AssetsDefinition:
    source = spec.versions.golden or "the query in versions.golden_sql"

    @dg.asset(
        key=search_quality_key(spec),
        deps=[embeddings_asset_key(spec)],
        group_name=spec.asset.group_name,
        kinds={"postgres", "pgvector", *spec.asset.kinds},
        owners=spec.asset.owners,
        tags={**spec.asset.tags, "vectorsync/table": spec.name},
        description=f"How well {spec.name} answers its golden queries ({source}): recall@"
        f"{spec.versions.golden_k} and MRR@10 of the active model version and, while one fills, of the "
        "candidate, each searched with its own query model. Materialize it to record the figures "
        "(plotted over time); `vectorsync promote` and the promote job refuse a candidate worse than "
        f"the active by more than {spec.versions.max_quality_drop:g}.",
    )
    def _search_quality(context: dg.AssetExecutionContext, database: VectorsyncDatabase) -> dg.MaterializeResult:
        with database.connect() as conn:
            quality = live_quality(conn, resolve(conn, spec, origin))
        if quality is None:  # the declaration lost its golden queries since this code loaded
            raise dg.Failure(description=f"table {spec.name}: no golden queries declared")
        for line in quality.missing:
            context.log.warning(line)
        for state, (number, metrics) in quality.by_state.items():
            context.log.info(f"{spec.name} version {number} ({state}): recall@{metrics.k} "
                             f"{metrics.recall_at_k:.4f}, MRR@10 {metrics.mrr_at_10:.4f} on {metrics.queries} queries")
        return dg.MaterializeResult(metadata=quality.metadata())

    return _search_quality
