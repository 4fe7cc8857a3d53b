"""Change sensors: one per table, asking for runs of exactly the buckets with pending changes."""


import json
import time

import dagster as dg
from psycopg import sql

from assets.factory import bucket_partition_key, embeddings_asset_key
from assets.spec import TableSpec

from .resources import VectorsyncDatabase

# A bucket whose changes are still pending this long after its last request gets a new run:
# the earlier run failed or was killed before it cleared them.
REREQUEST_AFTER_SECONDS = 120.0


def changes_sensor(spec: TableSpec, interval_seconds: int = 2) -> dg.SensorDefinition:
    key = embeddings_asset_key(spec)
    queue = sql.Identifier("vectorsync", spec.queue_name)

    @dg.sensor(
        name=f"{spec.name}_changes",
        asset_selection=[key],
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Reads the change log of {spec.source.qualified} and asks for a run of each "
        "bucket with changes that no earlier run was asked to cover.",
    )
    def _sensor(context: dg.SensorEvaluationContext, database: VectorsyncDatabase) -> dg.SensorResult:
        # cursor: bucket -> [highest change id already requested, when requested]
        cursor: dict[str, list[float]] = json.loads(context.cursor or "{}")
        with database.connect() as conn:
            if conn.execute("SELECT to_regclass(%s)", (f"vectorsync.{spec.queue_name}",)).fetchone()[0] is None:
                return dg.SensorResult(skip_reason=f"{spec.name} is not installed; run `vectorsync install`")
            pending = conn.execute(
                sql.SQL("SELECT bucket, max(id) FROM {} GROUP BY bucket ORDER BY bucket").format(queue)
            ).fetchall()
        now = time.time()
        requests = []
        for bucket, max_id in pending:
            requested_id, requested_at = cursor.get(str(bucket), (0, 0.0))
            if max_id <= requested_id and now - requested_at < REREQUEST_AFTER_SECONDS:
                continue
            cursor[str(bucket)] = [max_id, now]
            requests.append(
                dg.RunRequest(
                    run_key=f"{spec.name}:{bucket}:{max_id}:{int(now)}",
                    partition_key=bucket_partition_key(bucket),
                    asset_selection=[key],
                    run_config=dg.RunConfig(ops={key.to_python_identifier(): {"config": {"full_sweep": False}}}),
                    tags={"vectorsync/table": spec.name, "vectorsync/trigger": "changes"},
                )
            )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor))

    return _sensor
