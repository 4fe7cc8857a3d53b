"""Names on the Dagster side: asset keys, partition keys and run tags derived from declarations.

Dagster names (jobs, ops, sensors, schedules, checks) allow only `[A-Za-z0-9_]`, and Dagster also
derives op names from asset keys, so an asset key part that is not such a name breaks the whole
code location. PostgreSQL identifiers allow anything (spaces, quotes, dots, `$`, unicode, up to 63
bytes). A part that is already a valid name is kept as it is, so existing keys never move; any
other is spelled with `_` for each run of other characters plus a short hash of the original,
which keeps two identifiers that spell the same (`Order Items`, `order$items`...) apart and the
key stable across reloads. The real identifier stays in the asset's `dagster/table_name`.
"""

from __future__ import annotations

import hashlib
import re

import dagster as dg

from assets.spec import TableSpec

# Dagster's own tags for a run over a range of partitions (a backfill run, or a sensor's run of
# several buckets); they are part of Dagster's documented run tags, spelled here once.
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"

_VALID = re.compile(r"^[A-Za-z0-9_]+$")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9_]+")
# Dagster has no length limit, but a key part should stay readable in the UI's asset graph.
MAX_PART_CHARS = 48


def dagster_name_part(identifier: str) -> str:
    """`identifier` as a valid Dagster name part: itself when it is one already, otherwise a
    readable spelling with a short hash suffix that keeps it unique."""
    if _VALID.match(identifier) and len(identifier) <= MAX_PART_CHARS:
        return identifier
    readable = _INVALID_RUN.sub("_", identifier).strip("_")[: MAX_PART_CHARS - 9] or "x"
    digest = hashlib.sha256(identifier.encode()).hexdigest()[:8]
    return f"{readable}_{digest}"


def bucket_partition_key(bucket: int) -> str:
    return f"{bucket:03d}"


def source_asset_key(spec: TableSpec) -> dg.AssetKey:
    """The source table's key: any PostgreSQL identifier, spelled as valid Dagster names."""
    parts = [dagster_name_part(spec.source.schema_), dagster_name_part(spec.source.table)]
    return dg.AssetKey([*spec.asset.source_key_prefix, *parts])


def embeddings_asset_key(spec: TableSpec) -> dg.AssetKey:
    return dg.AssetKey([*spec.asset.key_prefix, spec.name])
