"""The Dagster code location: every declared table becomes a source asset, an embeddings asset,
its checks, its change sensor and its schedules (and, in continuous mode, a long-lived job)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from orchestration.checks import embeddings_checks
from orchestration.embedding_assets import continuous_job, embeddings_asset, source_asset_spec
from assets.spec import load_spec_dir

from .database import tables_dir
from .resources import database_resource
from .schedules import index_upkeep_job, index_upkeep_schedule, reconcile_schedule, retry_schedule
from .sensors import changes_sensor, continuous_keeper, record_run_failures


def build_definitions(directory: Path) -> dg.Definitions:
    specs = load_spec_dir(directory)
    assets: list = []
    checks: list = []
    jobs: list = []
    sensors: list = [record_run_failures]
    schedules: list = []
    index_job = index_upkeep_job(specs)
    seen_sources = set()
    for spec, origin in specs:
        if spec.source.qualified not in seen_sources:  # two models may share one source table
            seen_sources.add(spec.source.qualified)
            assets.append(source_asset_spec(spec))
        assets.append(embeddings_asset(spec, origin))
        checks.extend(embeddings_checks(spec))
        sensors.append(changes_sensor(spec))
        schedules += [reconcile_schedule(spec), retry_schedule(spec), index_upkeep_schedule(spec, origin, index_job)]
        if spec.continuous:
            job = continuous_job(spec, origin)
            jobs.append(job)
            sensors.append(continuous_keeper(spec, job))
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[index_job, *jobs],
        sensors=sensors,
        schedules=schedules,
        resources={"database": database_resource()},
        # Runs execute in their own process already; a second process per step would double the
        # start cost of every change-triggered run.
        executor=dg.in_process_executor,
    )


defs = build_definitions(tables_dir())
