"""The sections of a table declaration (source, chunking, provider, schedules, index, retry,
backfill, asset, versions, budget): each a strict model validated on load, with the constants and
checks only they use. assets/spec.py's TableSpec puts them together into one declaration.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .names import MAX_IDENTIFIER_BYTES, fits

# Models whose output size is fixed: a declaration that says otherwise is refused on load.
KNOWN_MODEL_DIMENSIONS: dict[tuple[str, str], tuple[int, ...]] = {
    ("sentence-transformers", "all-MiniLM-L6-v2"): (384,),
    ("openai", "text-embedding-ada-002"): (1536,),
}
# OpenAI's v3 models accept a `dimensions` parameter up to their native size.
SHORTENABLE_MODEL_DIMENSIONS: dict[tuple[str, str], int] = {
    ("openai", "text-embedding-3-small"): 1536,
    ("openai", "text-embedding-3-large"): 3072,
}


class StrictModel(BaseModel):
    """A declaration section: unknown fields are errors, values never change after parsing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Chunking(StrictModel):
    """Split text into overlapping pieces of at most `size` characters, at whitespace when possible."""

    size: int = Field(800, ge=50, le=100_000)
    overlap: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> Chunking:
        if self.overlap >= self.size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than size ({self.size})")
        return self


class ProviderSpec(StrictModel):
    kind: Literal["sentence-transformers", "openai"] = "sentence-transformers"
    model: str = "all-MiniLM-L6-v2"
    dimensions: int = Field(384, ge=1, le=16_000)
    # For any OpenAI-compatible server (Ollama, vLLM, LiteLLM, TEI). None means api.openai.com.
    base_url: str | None = None
    # The NAME of the environment variable that holds the key; the key itself never appears here.
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(4, ge=1, le=64)
    batch_size: int = Field(256, ge=1, le=2048)
    timeout_seconds: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)
    # Sends `dimensions=` to the API (only OpenAI's v3 models and some compatible servers accept it).
    send_dimensions: bool = False
    # US dollars per million tokens, turning tokens into cost_usd. None: the list price of a known
    # OpenAI model (assets/usage.py), else 0 (a local model, or a server of your own). Not part
    # of the fingerprint: a new price changes no vector.
    price_per_million_tokens: float | None = Field(None, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not value.replace("_", "").isalnum():
            raise ValueError("must be the name of an environment variable, not a key")
        return value

    @model_validator(mode="after")
    def _dimensions_match_model(self) -> ProviderSpec:
        fixed = KNOWN_MODEL_DIMENSIONS.get((self.kind, self.model))
        if fixed and self.dimensions not in fixed:
            raise ValueError(
                f"dimensions: {self.model} gives {fixed[0]} dimensions, not {self.dimensions}"
            )
        native = SHORTENABLE_MODEL_DIMENSIONS.get((self.kind, self.model))
        if native and self.dimensions > native:
            raise ValueError(f"dimensions: {self.model} gives at most {native} dimensions")
        return self


CRON_FIELD = re.compile(r"^[0-9*/,\-]+$")


class Schedules(StrictModel):
    """When Dagster's schedules look after the table (cron, UTC). Schedules tick at most once a
    minute; anything that needs to be faster is the change sensor's or continuous mode's job."""

    # A full hash comparison of source and store: repairs what the triggers could not see.
    reconcile: str = "17 * * * *"
    # Rows in the failure ledger whose next attempt is due go back into the change log.
    retry_failures: str = "*/5 * * * *"
    # Builds the vector index once the store is large enough, and rebuilds an invalid one.
    index_upkeep: str = "*/10 * * * *"

    @field_validator("reconcile", "retry_failures", "index_upkeep")
    @classmethod
    def _cron(cls, value: str) -> str:
        parts = value.split()
        if len(parts) != 5 or not all(CRON_FIELD.match(p) for p in parts):
            raise ValueError(f"{value!r} is not a five-field cron expression such as '*/5 * * * *'")
        return value


class VectorIndex(StrictModel):
    """The HNSW index on the store. Below `min_rows` chunks an exact scan is fast and a bulk
    backfill is cheaper without an index to update, so the index is built (CONCURRENTLY, by the
    index upkeep schedule) once the store passes that size."""

    min_rows: int = Field(10_000, ge=0)
    m: int = Field(16, ge=2, le=100)
    ef_construction: int = Field(64, ge=4, le=1000)
    # hnsw.ef_search for this table's searches: how many candidates the graph walk keeps. At 64k rows
    # pgvector's default, 40, lost 0.012 of recall@10 against an exact scan on the labelled queries
    # of `python -m bench search`, and so did 100; 200 lost nothing. It shapes queries only.
    ef_search: int = Field(200, ge=1, le=1000)


class RetrySpec(StrictModel):
    """When a row that failed is tried again: after base_seconds, doubling per attempt up to
    max_seconds (with jitter), and never again once max_attempts attempts have failed (the row is
    then dead: the dead_letters check fails until someone looks). It decides when vectors are
    made, not what they are, so it is not part of the fingerprint."""

    # At most 100: the backoff doubles per attempt, and 2**1024 overflows a float in Postgres.
    max_attempts: int = Field(6, ge=1, le=100)
    base_seconds: float = Field(30.0, gt=0)
    # Validated even when left at its default, so a base_seconds above it is refused too.
    max_seconds: float = Field(6 * 3600.0, gt=0, validate_default=True)

    @field_validator("max_seconds")
    @classmethod
    def _cap_not_below_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("base_seconds")  # absent when base_seconds itself was refused
        if base is not None and value < base:
            raise ValueError(f"must be at least base_seconds ({base:g}), not {value:g}")
        return value


DAGSTER_NAME_PATTERN = r"^[A-Za-z0-9_]+$"


class BackfillSpec(StrictModel):
    """How a backfill of many partitions is split into runs. Each run is an ordinary run (its own
    process, or its own pod under the Kubernetes run launcher) that Dagster's queue and the
    provider's pool run in parallel. 4 buckets a run splits the default 16 buckets into 4 runs:
    enough to spread a backfill over the default pool limit of 2 (and over more workers where the
    pool allows), while each run still keeps the provider busy across its buckets and pays its
    start-up (a new process, ~3-4 s) once for several buckets."""

    buckets_per_run: int = Field(4, ge=1, le=1024)
    # "batch": a sweep (a backfill, the reconcile schedule, `vectorsync sync --full`, the first
    # sweep after install) sends what is not stored yet through the provider's batch API at half
    # price, and stores it once the batch completes (within its 24 h window; assets/batch_fill.py).
    # "sync": ordinary requests. A run can ask for batch mode itself: the run tag
    # vectorsync/mode=batch (on a UI backfill), run config `batch`, `vectorsync sync --batch`.
    mode: Literal["sync", "batch"] = "sync"
    # Below this many texts to send, a sweep in the declared batch mode makes ordinary requests: a
    # batch would save cents and keep the rows waiting for hours. (A run that asks for batch mode
    # itself sends any number.)
    batch_min_chunks: int = Field(1000, ge=1)


class AssetPresentation(StrictModel):
    """How the table's assets appear in Dagster (the translator of dagster-dbt and dagster-sling):
    key prefixes, group, owners, tags and extra kinds. It names things, it does not shape vectors,
    so it is not part of the fingerprint."""

    # The embeddings asset is key_prefix + [name]; the source table's is source_key_prefix +
    # [schema, table] (spelled as valid Dagster names, see orchestration/names.py).
    key_prefix: list[Annotated[str, Field(pattern=DAGSTER_NAME_PATTERN)]] = ["embeddings"]
    source_key_prefix: list[Annotated[str, Field(pattern=DAGSTER_NAME_PATTERN)]] = ["postgres"]
    group_name: Annotated[str, Field(pattern=DAGSTER_NAME_PATTERN)] = "embeddings"
    source_group_name: Annotated[str, Field(pattern=DAGSTER_NAME_PATTERN)] = "sources"
    # Owners as Dagster takes them: an e-mail address or "team:name".
    owners: list[str] = []
    tags: dict[str, str] = {}
    # Shown beside the default kinds (postgres, pgvector and the provider's).
    kinds: list[str] = []


class VersionsSpec(StrictModel):
    """What happens when the declared model (fingerprint, dimensions or vector type) changes: a new
    version fills beside the active one, and is switched to as `promote` says: `manual` (the
    `vectorsync promote` command or the `<name>_promote` job), or `auto` (the first run that finds
    it complete switches to it, through the same gate). The version switched away from is kept,
    current, for `keep_previous_hours`, so `vectorsync rollback` can switch back; then it is dropped.
    `max_quality_drop` is the gate's allowed loss of quality (recall@k, MRR@10) from the active to
    the candidate on the golden queries (`golden` or `golden_sql`), when there are any. None of it shapes a vector, so it
    is not part of the fingerprint."""

    promote: Literal["manual", "auto"] = "manual"
    keep_previous_hours: float = Field(24.0, ge=0, le=24 * 365)
    max_quality_drop: float = Field(0.02, ge=0, le=1)
    # The golden queries the gate and the search_quality asset score (assets/golden.py): a YAML or
    # JSON Lines file of `query -> expected key(s)`, relative to the declaration's file, or a SQL
    # query yielding (query text, expected key) rows. Neither: no quality gate.
    golden: str | None = Field(None, min_length=1)
    golden_sql: str | None = Field(None, min_length=1)
    # recall@k's k (MRR is always @10).
    golden_k: int = Field(10, ge=1, le=100)

    @model_validator(mode="after")
    def _one_golden_source(self) -> VersionsSpec:
        if self.golden is not None and self.golden_sql is not None:
            raise ValueError("versions: give `golden` or `golden_sql`, not both")
        return self


class Budget(StrictModel):
    """A ceiling on what the table's runs spend with the provider in a UTC day. A run that would
    pass it stops before the request that would: what it embedded so far is stored, the rest
    stays in the change log, and the run fails naming the table and the day's spend."""

    daily_usd: float = Field(gt=0)


def fits_postgres(value: str | None) -> str | None:
    # Names of existing objects (or a schema we create): PostgreSQL would cut a longer one, so
    # the object found or made would be another than the one declared.
    if value is not None and not fits(value):
        raise ValueError(f"is {len(value.encode())} bytes in UTF-8; PostgreSQL names hold at most "
                         f"{MAX_IDENTIFIER_BYTES}")
    return value


class SourceRef(StrictModel):
    schema_: str = Field("public", alias="schema", min_length=1, max_length=63)
    table: str = Field(min_length=1, max_length=63)

    _fit = field_validator("schema_", "table")(fits_postgres)

    @property
    def qualified(self) -> str:
        return f"{self.schema_}.{self.table}"
