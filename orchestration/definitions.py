"""The Dagster code location: every declared table (an EmbeddingTable component, see
orchestration/components.py) with its assets, checks, schedules and jobs, plus what all tables
share: the database resource, the one tables sensor that starts every table's change runs and
continuous runs, and the sensor that records failed runs. Both sensors exist once here, however
many declarations there are.

A declaration that cannot be loaded is shown in the UI as an asset of its own, in the group
`vectorsync_declaration_errors`, with the error as its description, and the other tables load as
usual: one bad table never takes the code location down. Under `dg check defs` (Dagster sets
DAGSTER_IS_DEFS_VALIDATION_CLI) the same error fails the check instead, and each declaration is
also checked against the database: the table and columns exist, the store's vectors fit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dagster as dg

from assets.declarations import load_declarations_isolated
from assets.spec import TableSpec

from .components import table_definitions
from .database import tables_dir
from .names import dagster_name_part, source_asset_key
from .resources import database_resource
from .sensors import SensedTable, record_run_failures, tables_sensor

log = logging.getLogger(__name__)
ERROR_GROUP = "vectorsync_declaration_errors"


def validating() -> bool:
    """Whether Dagster is validating definitions (`dg check defs`, `dagster definitions validate`)."""
    return os.environ.get("DAGSTER_IS_DEFS_VALIDATION_CLI") == "1"


def check_against_database(specs: list[tuple[TableSpec, str]]) -> None:
    """Under `dg check defs`: each table and its columns exist, and an existing store's vectors
    are the declared size and type. An unreachable database is reported, not failed: a
    declaration can be checked before its database exists."""
    import psycopg

    from assets.catalog import resolve
    from assets.install import check_existing_store

    from .database import connect

    try:
        conn = connect()
    except psycopg.OperationalError as exc:
        log.warning(f"declarations not checked against the database, which cannot be reached: {exc}")
        return
    with conn:
        for spec, origin in specs:
            check_existing_store(conn, resolve(conn, spec, origin))


def _error_asset(error: Exception, origin: str, directory: Path) -> dg.AssetSpec:
    # Named after the declaration's folder (or legacy file), as the user named it.
    path = Path(origin)
    try:
        path = path.relative_to(directory)
    except ValueError:
        pass
    name = str(path.parent) if path.name == "defs.yaml" else path.stem
    return dg.AssetSpec(
        key=dg.AssetKey([ERROR_GROUP, dagster_name_part(name)]),
        group_name=ERROR_GROUP,
        description=f"This declaration cannot be loaded, so its table is not kept embedded: {error}",
        metadata={"declared_in": origin, "error": str(error)},
    )


def build_definitions(directory: Path) -> dg.Definitions:
    specs, errors = load_declarations_isolated(directory)
    failures: list[tuple[Exception, str]] = [(e, e.source) for e in errors]
    parts: list[dg.Definitions] = []
    sensed: list[SensedTable] = []
    seen_sources: set[dg.AssetKey] = set()
    for spec, origin in specs:
        key = source_asset_key(spec)
        try:
            # Two tables (two models, say) may embed one source table: it is declared once.
            part, table = table_definitions(spec, origin, include_source=key not in seen_sources)
            parts.append(part)
            sensed.append(table)
            seen_sources.add(key)
        except Exception as exc:  # noqa: BLE001 - any failure of one table stays that table's
            failures.append((exc, origin))
    if validating():
        if failures:
            raise failures[0][0]
        check_against_database(specs)
    for error, origin in failures:
        log.error(f"{origin}: table not loaded: {error}")
    shared = dg.Definitions(
        assets=[_error_asset(error, origin, directory) for error, origin in failures],
        sensors=[record_run_failures, *([tables_sensor(sensed)] if sensed else [])],
        resources={"database": database_resource()},
        # Runs execute in their own process already; a second process per step would double the
        # start cost of every change-triggered run.
        executor=dg.in_process_executor,
    )
    return dg.Definitions.merge(shared, *parts)


defs = build_definitions(tables_dir())
