"""The declaration of one embedding table, loaded from YAML and validated before any DDL runs.

A declaration says which source table to embed, how a row becomes text, how text is chunked and
which model embeds it. Errors name the file and the field they are about.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .names import table_object_names
from .spec_sections import (
    AssetPresentation,
    BackfillSpec,
    Budget,
    Chunking,
    ProviderSpec,
    RetrySpec,
    Schedules,
    SourceRef,
    VectorIndex,
    StrictModel,
    VersionsSpec,
    fits_postgres,
)
from .template import TemplatePart, default_template_parts, parse_template, template_fields

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
# A text search configuration's name, optionally schema-qualified ("english", "public.my_config").
TEXT_SEARCH_CONFIG_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"

# pgvector's limits for an HNSW index on each vector type.
MAX_INDEXED_DIMENSIONS = {"vector": 2000, "halfvec": 4000}


class SpecError(ValueError):
    """A declaration that cannot be used, with the file and field it is about."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")


class TableSpec(StrictModel):
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

    _fit = field_validator("destination_schema")(fits_postgres)

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
