"""`vectorsync demo`: embed Python's documentation through Dagster, search it, serve the UI."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from assets.catalog import resolve
from assets.factory import embeddings_asset_key, partitions_for, provider_for
from assets.install import install
from assets.search import search
from assets.spec import load_spec_dir

from .corpus import load_python_docs
from .database import PROJECT_DIR, connect, database_url
from .definitions import tables_dir
from .instance import prepare_instance
from .resources import database_resource

DEMO_TABLE = "python_docs"


def run_demo(queries: Sequence[str], serve: bool = True, port: int = 3000, limit: int | None = None) -> int:
    started = time.perf_counter()
    url = database_url()
    print(f"database: {url}")
    specs = load_spec_dir(tables_dir())
    spec, origin = next((s, o) for s, o in specs if s.name == DEMO_TABLE)
    with connect(url) as conn:
        changed = load_python_docs(conn, limit=limit)
        rows = conn.execute("SELECT count(*) FROM public.python_docs").fetchone()[0]
        print(f"corpus: {rows} documents of Python's own documentation ({changed} new or changed)")
        install(conn, specs)
    home = prepare_instance(url)
    os.environ["DAGSTER_HOME"] = str(home)
    print(f"dagster instance: {home} (storage on PostgreSQL)")

    from .definitions import defs

    key = embeddings_asset_key(spec)
    partition_keys = partitions_for(spec).get_partition_keys()
    embed_started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [defs.get_assets_def(key)],
            instance=instance,
            resources={"database": database_resource()},
            tags={
                ASSET_PARTITION_RANGE_START_TAG: partition_keys[0],
                ASSET_PARTITION_RANGE_END_TAG: partition_keys[-1],
                "vectorsync/trigger": "demo",
            },
        )
    embed_seconds = time.perf_counter() - embed_started
    metadata = {
        k: v.value for k, v in result.asset_materializations_for_node(key.to_python_identifier())[0].metadata.items()
    }
    written = int(metadata["rows_written"])
    print(
        f"embedded through Dagster run {result.run_id[:8]}: {written} rows written, "
        f"{int(metadata['rows_unchanged'])} unchanged, {int(metadata['chunks_embedded'])} chunks embedded, "
        f"{int(metadata['chunks_reused'])} reused, {int(metadata['tokens'])} tokens, in {embed_seconds:.1f}s "
        f"({written / embed_seconds:.1f} rows/s)"
    )
    with connect(url) as conn:
        table = resolve(conn, spec, origin)
        provider = provider_for(spec.provider)
        for query in queries:
            print(f"\nsearch: {query!r}")
            for hit in search(conn, table, provider, query, k=3):
                print(f"  {hit.score:.3f}  {hit.row['doc_id']:<32} {hit.row['title'][:60]}")
    print(f"\ndemo ready in {time.perf_counter() - started:.1f}s")
    if not serve:
        return 0
    print(f"\nDagster UI: open http://127.0.0.1:{port}  (lineage: Assets > Global asset lineage; "
          f"partitions and checks: embeddings/{DEMO_TABLE}). Ctrl-C stops it.")
    sys.stdout.flush()
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    os.chdir(PROJECT_DIR)
    os.execv(dagster, [dagster, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)])
