"""The EmbeddingTable Dagster Component: one declared table and everything Dagster needs for it.

    dg list components                                   # shows orchestration.components.EmbeddingTable
    dg scaffold defs orchestration.components.EmbeddingTable articles   # orchestration/defs/articles/defs.yaml
    dg check defs                                        # validates every declaration
    dg list defs                                         # each table's assets, checks, jobs, schedules

Its attributes are the fields of `assets.spec.TableSpec` (docs/declaring-a-table.md), validated by
the same model, so `dg check yaml` and the CLI report the same errors. Underneath is a plain
function, `embedding_table_definitions`, for programmatic use.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import BaseModel

from assets.spec import TableSpec

from .checks import embeddings_checks
from .continuous_job import continuous_job
from .embedding_assets import embeddings_asset, source_asset_spec
from .schedules import index_upkeep_job, index_upkeep_schedule, reconcile_schedule, retry_schedule
from .sensors import SensedTable, changes_job
from .quality import search_quality_asset
from .versions_dagster import promote_job

STARTING_DECLARATION = """\
# A table to embed. Every field and its default: docs/declaring-a-table.md.
# After editing: `dg check defs`, then `vectorsync install` creates the store and the triggers.
type: {type_name}
attributes:
  name: {name}
  source: public.{name}          # schema.table of the rows to embed
  columns: [body]                # the columns that make the text (or a `template:`)
  provider:                      # the local, offline model; or kind: openai (key from $OPENAI_API_KEY)
    kind: sentence-transformers
    model: all-MiniLM-L6-v2
    dimensions: 384
  buckets: 16                    # partitions: hash buckets of the primary key
  asset:                         # how the assets appear in Dagster (optional)
    group_name: embeddings
"""


def table_definitions(spec: TableSpec, origin: str, include_source: bool = True) -> tuple[dg.Definitions, SensedTable]:
    """Every Dagster definition of one table: its source asset (unless another table over the
    same source declares it), embeddings asset, checks, schedules, index job, promote job (model
    versions), search-quality asset (with golden queries), the job of its change runs and, in
    continuous mode, its long-lived job; and the table as the code location's one tables sensor
    (orchestration/sensors.py) takes it, with those jobs."""
    index_job = index_upkeep_job(spec, origin)
    sensed = SensedTable(spec, changes_job(spec), continuous_job(spec, origin) if spec.continuous else None)
    return dg.Definitions(
        assets=[*([source_asset_spec(spec)] if include_source else []), embeddings_asset(spec, origin),
                *([search_quality_asset(spec, origin)] if spec.versions.golden or spec.versions.golden_sql else [])],
        asset_checks=embeddings_checks(spec),
        jobs=[index_job, promote_job(spec, origin),
              *(j for j in (sensed.changes_job, sensed.continuous_job) if j is not None)],
        schedules=[reconcile_schedule(spec), retry_schedule(spec), index_upkeep_schedule(spec, origin, index_job)],
    ), sensed


def embedding_table_definitions(spec: TableSpec, origin: str, include_source: bool = True) -> dg.Definitions:
    """One table's definitions (see table_definitions), without a sensor: the code location
    (orchestration/definitions.py) adds one tables sensor for all of its tables."""
    return table_definitions(spec, origin, include_source)[0]


class EmbeddingTableScaffolder(dg.Scaffolder):
    """`dg scaffold defs orchestration.components.EmbeddingTable NAME` writes a starting
    declaration that loads as it is once the source table exists."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = request.target_path.name
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text(
            STARTING_DECLARATION.format(type_name=request.type_name, name=name)
        )


@dg.scaffold_with(EmbeddingTableScaffolder)
class EmbeddingTable(dg.Component):
    """A PostgreSQL table whose rows are kept embedded in a pgvector store: a source asset, an
    embeddings asset partitioned by key-hash bucket, six checks, schedules for the reconcile
    sweep, retries and index upkeep, and the jobs its change runs and its continuous run use. The
    code location's one tables sensor (orchestration/definitions.py) starts those runs."""

    def __init__(self, spec: TableSpec, origin: str = "<python>", include_source: bool = True) -> None:
        self.spec = spec
        self.origin = origin
        self.include_source = include_source

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        # The declaration's own model: the same validation as the CLI and `vectorsync install`.
        return TableSpec

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> EmbeddingTable:
        if not isinstance(attributes, TableSpec):
            raise dg.DagsterInvalidDefinitionError(f"{context.path}: an EmbeddingTable needs `attributes:`")
        return cls(attributes, origin=str(Path(context.path) / "defs.yaml"))

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return embedding_table_definitions(self.spec, self.origin, self.include_source)
