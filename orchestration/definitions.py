"""The Dagster code location: every declared table becomes a source asset, an embeddings asset,
its checks and its change sensor."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets.factory import embeddings_asset, embeddings_checks, source_asset_spec
from assets.spec import load_spec_dir

from .database import PROJECT_DIR
from .resources import database_resource
from .sensors import changes_sensor


def tables_dir() -> Path:
    """Where the YAML declarations live: $VECTORSYNC_TABLES, or assets/tables in this project."""
    return Path(os.environ.get("VECTORSYNC_TABLES", PROJECT_DIR / "assets" / "tables"))


def build_definitions(directory: Path) -> dg.Definitions:
    assets: list = []
    checks: list = []
    sensors: list = []
    seen_sources = set()
    for spec, origin in load_spec_dir(directory):
        if spec.source.qualified not in seen_sources:  # two models may share one source table
            seen_sources.add(spec.source.qualified)
            assets.append(source_asset_spec(spec))
        assets.append(embeddings_asset(spec, origin))
        checks.extend(embeddings_checks(spec))
        sensors.append(changes_sensor(spec))
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        sensors=sensors,
        resources={"database": database_resource()},
    )


defs = build_definitions(tables_dir())
