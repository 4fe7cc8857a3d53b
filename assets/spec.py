"""The declaration of one embedding table, loaded from YAML and validated before any DDL runs.

A declaration says which source table to embed, how a row becomes text, how text is chunked and
which model embeds it. Errors name the file and the field they are about.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .names import MAX_IDENTIFIER_BYTES, fits, table_object_names
from .template import TemplatePart, default_template_parts, parse_template, template_fields

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
# A text search configuration's name, optionally schema-qualified ("english", "public.my_config").
TEXT_SEARCH_CONFIG_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"

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
# pgvector's limits for an HNSW index on each vector type.
MAX_INDEXED_DIMENSIONS = {"vector": 2000, "halfvec": 4000}


class SpecError(ValueError):
    """A declaration that cannot be used, with the file and field it is about."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Chunking(_Strict):
    """Split text into overlapping pieces of at most `size` characters, at whitespace when possible."""

    size: int = Field(800, ge=50, le=100_000)
    overlap: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> Chunking:
        if self.overlap >= self.size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than size ({self.size})")
        return self


class ProviderSpec(_Strict):
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


class Schedules(_Strict):
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


class VectorIndex(_Strict):
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


class RetrySpec(_Strict):
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


class BackfillSpec(_Strict):
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


class AssetPresentation(_Strict):
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


class VersionsSpec(_Strict):
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


class Budget(_Strict):
    """A ceiling on what the table's runs spend with the provider in a UTC day. A run that would
    pass it stops before the request that would: what it embedded so far is stored, the rest
    stays in the change log, and the run fails naming the table and the day's spend."""

    daily_usd: float = Field(gt=0)


def _fits_postgres(value: str | None) -> str | None:
    # Names of existing objects (or a schema we create): PostgreSQL would cut a longer one, so
    # the object found or made would be another than the one declared.
    if value is not None and not fits(value):
        raise ValueError(f"is {len(value.encode())} bytes in UTF-8; PostgreSQL names hold at most "
                         f"{MAX_IDENTIFIER_BYTES}")
    return value


class SourceRef(_Strict):
    schema_: str = Field("public", alias="schema", min_length=1, max_length=63)
    table: str = Field(min_length=1, max_length=63)

    _fit = field_validator("schema_", "table")(_fits_postgres)

    @property
    def qualified(self) -> str:
        return f"{self.schema_}.{self.table}"


class TableSpec(_Strict):
    """One embedding table. See docs/declaring-a-table.md for every field and its default."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    # "schema.table" or {schema: ..., table: ...}; the str form is turned into a SourceRef on load.
    source: SourceRef | str
    primary_key: list[str] | None = None
    columns: list[str] | None = None
    template: str | None = None
    chunking: Chunking | None = Chunking()
    provider: ProviderSpec = ProviderSpec()
    buckets: int = Field(16, ge=1, le=1024)
    destination: str | None = Field(None, min_length=1, max_length=50)
    destination_schema: str | None = Field(None, min_length=1, max_length=63)
    vector_type: Literal["vector", "halfvec"] = "vector"
    distance: Literal["cosine", "l2", "inner_product"] = "cosine"
    # Rows per page when a run streams a bucket: bounds memory and the size of each write.
    page_size: int = Field(500, ge=1, le=50_000)
    # The text search configuration of the full-text side of hybrid search ('english' stems and
    # drops stop words; 'simple' keeps every word as written). It shapes an index, not the vectors,
    # so it is not part of the fingerprint: changing it rebuilds that index and re-embeds nothing.
    text_search_config: str = Field("english", pattern=TEXT_SEARCH_CONFIG_PATTERN)
    description: str | None = None
    schedules: Schedules = Schedules()
    index: VectorIndex = VectorIndex()
    # The freshness limit: the backlog_age check fails when the oldest pending change is older.
    max_backlog_seconds: int = Field(300, ge=1)
    # A daily spending ceiling (see Budget); None: no ceiling. Not part of the fingerprint.
    budget: Budget | None = None
    # One long-lived Dagster run per table, woken by LISTEN/NOTIFY, instead of a run per change.
    continuous: bool = False
    # How changes are captured: "triggers" (statement-level triggers log each change in the
    # writer's transaction; works on any server) or "logical" (the keys are read back from the
    # write-ahead log through a replication slot, so writers pay nearly nothing; needs
    # wal_level = logical and the key as the table's replica identity; assets/wal_capture.py).
    # It decides how changes are found, not what a vector is: not part of the fingerprint.
    capture: Literal["triggers", "logical"] = "triggers"
    # Whether the code location's tables sensor looks after this table (its change runs and its
    # continuous run); `false` leaves it to schedules, backfills and runs from the UI. Not in the fingerprint.
    sensor: bool = True
    # When failed rows are retried and when they are given up on (see RetrySpec).
    retry: RetrySpec = RetrySpec()
    # How the table's assets appear in Dagster (see AssetPresentation); not in the fingerprint.
    asset: AssetPresentation = AssetPresentation()
    # How a backfill is split into runs (see BackfillSpec); not in the fingerprint.
    backfill: BackfillSpec = BackfillSpec()
    # Model versions side by side, promotion and rollback (see VersionsSpec); not in the fingerprint.
    versions: VersionsSpec = VersionsSpec()
    # Which model version of the table this spec describes (assets/versions.py): 1 for the
    # declaration itself; a version's spec carries its number, which names its store and change log.
    _version: int = PrivateAttr(1)

    @field_validator("source", mode="before")
    @classmethod
    def _parse_source(cls, value: Any) -> Any:
        if isinstance(value, str):
            schema, dot, table = value.partition(".")
            return {"schema": schema, "table": table} if dot else {"table": value}
        return value

    _fit = field_validator("destination_schema")(_fits_postgres)

    @field_validator("primary_key", "columns")
    @classmethod
    def _non_empty_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must name at least one column")
            if len(set(value)) != len(value):
                raise ValueError("names a column twice")
        return value

    @model_validator(mode="after")
    def _template_and_columns_agree(self) -> TableSpec:
        if self.template is None and self.columns is None:
            raise ValueError("give `columns`, `template`, or both")
        if self.template is not None:
            fields = template_fields(self.template)
            if not fields:
                raise ValueError("template: names no column; use {column} placeholders")
            if self.columns is not None:
                unknown = [f for f in fields if f not in self.columns]
                if unknown:
                    raise ValueError(f"template: uses {unknown} which are not in `columns`")
        if self.backfill.mode == "batch" and self.provider.kind != "openai":
            raise ValueError("backfill.mode: batch needs provider.kind openai (a batch API)")
        limit = MAX_INDEXED_DIMENSIONS[self.vector_type]
        if self.provider.dimensions > limit:
            raise ValueError(
                f"provider.dimensions: {self.vector_type} indexes at most {limit} dimensions"
            )
        return self

    # Derived names -------------------------------------------------------------------------------

    @property
    def text_columns(self) -> list[str]:
        return list(self.columns) if self.columns is not None else template_fields(self.template or "")

    @property
    def text_template(self) -> str:
        """The template as text. For the default template this is only part of the fingerprint
        (kept as earlier versions spelled it, so stored vectors stay current); rendering goes by
        template_parts, which needs no parsing."""
        if self.template is not None:
            return self.template
        return "\n\n".join("{" + c + "}" for c in self.text_columns)

    @property
    def template_parts(self) -> tuple[TemplatePart, ...]:
        if self.template is not None:
            return parse_template(self.template)
        return default_template_parts(self.text_columns)

    @property
    def store_schema(self) -> str:
        return self.destination_schema or self.source.schema_

    @property
    def version(self) -> int:
        return self._version

    def as_version(self, number: int) -> TableSpec:
        """This spec as model version `number` of its table (its own store and change log)."""
        copy = self.model_copy()
        copy._version = number
        return copy

    @property
    def object_names(self) -> dict[str, str]:
        """The store's, view's, indexes', change log's and triggers' names (assets/names.py)."""
        return table_object_names(self.name, self.destination, self._version)

    @property
    def view_name(self) -> str:
        return self.object_names["view"]

    @property
    def store_name(self) -> str:
        return self.object_names["store"]

    @property
    def queue_name(self) -> str:
        return self.object_names["queue"]

    @property
    def fingerprint(self) -> str:
        """Identifies everything that shapes a stored vector: a stored chunk under another
        fingerprint is stale and is re-embedded by the next full run of its bucket."""
        shape = json.dumps(
            {
                "template": self.text_template,
                "chunking": self.chunking.model_dump() if self.chunking else None,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(shape.encode()).hexdigest()[:12]
        p = self.provider
        return f"{p.kind}/{p.model}/{p.dimensions}/{digest}"


def parse_spec(data: Any, source: str) -> TableSpec:
    """Validate one declaration; `source` names where it came from, for error messages."""
    if not isinstance(data, dict):
        raise SpecError(source, "", "a table declaration must be a mapping of fields")
    try:
        return TableSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or _field_from_message(first["msg"])
        message = first["msg"].removeprefix("Value error, ")
        if ": " in message and field == _field_from_message(message):
            message = message.split(": ", 1)[1]
        raise SpecError(source, field, message) from None


def _field_from_message(message: str) -> str:
    head = message.removeprefix("Value error, ").split(":", 1)[0]
    return head if head.replace(".", "").replace("_", "").isalnum() else ""


def load_spec_file(path: Path) -> TableSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(str(path), "", f"not valid YAML: {exc}") from None
    return parse_spec(data, str(path))
