"""What filling a table (or a new version of it) will cost, before anything is sent. Free of Dagster.

Every source row is read in key order, page by page, rendered, chunked, split to the model's input
limit and hashed by the function a run uses (pipeline.prepare_rows), so the chunks counted are the
chunks a run would store. A chunk costs nothing when its text
already has a vector under the same provider model and dimensions in one of the `reusable` stores
(the store's `model` column holds the fingerprint `<kind>/<model>/<dims>/<shape>`: the shape part,
template and chunking, does not change the vector of a given text), or when an earlier chunk of
this fill has the same text (a run never sends one text twice). The rest is counted with the
provider's own token counter (OpenAI's models offline, with tiktoken; no key and no request), and
priced with assets/usage.py's per-model prices.

Memory: one page of rows. The hashes and token counts of the chunks to send go to a temporary
table of the session (about 60 bytes a chunk, on the server's temporary space), which counts a
text met on several pages once; the process's memory does not grow with the table (`python -m
bench estimate`: 100,000 rows against 10,000).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import psycopg
from psycopg import sql

from .catalog import ResolvedTable, use_key_text_settings
from .pipeline import prepare_rows
from .source_rows import Row, SourceReader
from .spec import TableSpec
from .spec_sections import ProviderSpec
from .usage import batch_price_per_million, cost_usd, price_per_million

# Rows read per query: large enough that a million rows is a few hundred round trips.
DEFAULT_PAGE_SIZE = 2000
# Which stored vectors count as reusable (see estimate_fill).
ReuseBy = Literal["model", "fingerprint"]


@dataclass(frozen=True)
class FillEstimate:
    """What a full fill of `table` would embed. `chunks` are all the chunks its rows make;
    `chunks_reused` of them need no request (a stored vector, or a text met earlier in the fill),
    `chunks_to_send` do, costing `tokens` and `usd` at `price_per_million` dollars per million
    tokens. Rows without content (`rows_empty`) and rows the template cannot render
    (`rows_unrenderable`, they would go to the failure ledger) make no chunks."""

    rows: int
    chunks: int
    chunks_reused: int
    chunks_to_send: int
    tokens: int
    usd: float
    price_per_million: float
    rows_empty: int = 0
    rows_unrenderable: int = 0
    seconds: float = 0.0
    usd_batch: float = 0.0  # the same tokens through the provider's batch API (a backfill's --batch)

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def reuse_prefix(spec: TableSpec) -> str:
    """The part of a stored chunk's fingerprint that decides whether its vector can be reused:
    provider kind, model and dimensions, as `<kind>/<model>/<dims>/` (the fingerprint's last part,
    the template and chunking, shapes the text, not the vector of a given text)."""
    return spec.fingerprint.rsplit("/", 1)[0] + "/"


def estimate_fill(
    conn: psycopg.Connection,
    table: ResolvedTable,
    reusable: Sequence[sql.Composable] = (),
    provider: TokenCounting | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    reuse_by: ReuseBy = "model",
) -> FillEstimate:
    """The cost of embedding every row of `table` now, reusing vectors found in the `reusable`
    store relations (e.g. the active version's store, for a candidate version; the table's own
    store, for what a full sync would send; none, for a full re-embed from scratch). They are
    composed for statements with parameters, as the engine's are (ResolvedTable.with_parameters()),
    so that a % in a name is not read as a placeholder.

    `reuse_by` "model" reuses a vector stored under the same provider model and dimensions, as a
    version fills beside the active one; "fingerprint" only one stored under this declaration's
    whole fingerprint, as today's engine looks up its cache (store.Store.vectors), so that a
    template or chunking changed in place re-sends every chunk.

    `provider` counts tokens; by default the declaration's own counter (the local model's
    tokenizer, or tiktoken for OpenAI's models, without a key). Puts the session on the key text
    settings, as the engine does, so that dates and times render as a run renders them."""
    started = time.perf_counter()
    spec = table.spec
    counter = provider if provider is not None else token_counter_for(spec.provider)
    use_key_text_settings(conn)
    reader = SourceReader(conn, table.with_parameters())
    lookups = [_reuse_query(relation, reuse_by) for relation in reusable]
    prefix = reuse_prefix(spec) if reuse_by == "model" else spec.fingerprint
    buckets = list(range(spec.buckets))
    n = Counter[str]()
    to_send = _Distinct(conn)
    try:
        after: str | None = None
        while rows := reader.in_key_order(buckets, after, page_size):
            after = rows[-1].key_json
            n["rows"] += len(rows)
            empty: list[tuple[Row, str]] = []
            unrenderable: list[tuple[Row, str]] = []
            candidates, tokens = prepare_rows(rows, spec, counter, empty, unrenderable)  # type: ignore[arg-type]
            n["empty"] += len(empty)
            n["unrenderable"] += len(unrenderable)
            n["chunks"] += sum(len(row.hashes) for row in candidates)
            texts = {h: p for row in candidates for h, p in zip(row.hashes, row.pieces)}
            stored = _stored(conn, lookups, prefix, list(texts))
            # Pieces of a row that had to be split to fit the model are counted here.
            missing = [h for h in texts if h not in stored and h not in tokens]
            if missing:  # a tokenizer may refuse an empty batch
                tokens.update(zip(missing, counter.count_tokens([texts[h] for h in missing])))
            to_send.add([h for h in texts if h not in stored], tokens)
        chunks_to_send, token_total = to_send.totals()
    finally:
        to_send.drop()
    price = price_per_million(spec.provider)
    return FillEstimate(
        rows=n["rows"], chunks=n["chunks"], chunks_reused=n["chunks"] - chunks_to_send,
        chunks_to_send=chunks_to_send, tokens=token_total, usd=cost_usd(token_total, price),
        price_per_million=price, rows_empty=n["empty"], rows_unrenderable=n["unrenderable"],
        seconds=time.perf_counter() - started, usd_batch=cost_usd(token_total, batch_price_per_million(spec.provider)),
    )


class TokenCounting(Protocol):
    """What chunking to the model's limit and counting need of a provider: an estimate needs no
    more (no key, no request). pipeline.prepare_rows uses only these two."""

    max_tokens_per_input: int

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


@dataclass
class _TokenCounter:
    """A provider's token counter and input limit alone: all an estimate needs, and for OpenAI's
    models it needs no key (the provider itself refuses to start without one)."""

    count: Callable[[Sequence[str]], list[int]]
    max_tokens_per_input: int

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.count(texts)


def token_counter_for(spec: ProviderSpec) -> TokenCounting:
    """The declaration's token counter: exactly what a run counts with."""
    if spec.kind == "openai":
        from .providers.openai_compatible import MAX_TOKENS_PER_INPUT, token_counter

        return _TokenCounter(token_counter(spec.model), MAX_TOKENS_PER_INPUT)
    from .providers import provider_for

    return provider_for(spec)


class _Distinct:
    """The chunks still to send, (text hash, tokens), in a temporary table of the session: a
    text met on several pages is counted once at the end, and the process keeps none of it."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.table = sql.Identifier(f"vectorsync_estimate_{uuid.uuid4().hex[:16]}")
        conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} (text_hash bytea NOT NULL, tokens int NOT NULL)")
                     .format(self.table))

    def add(self, hashes: list[bytes], tokens: dict[bytes, int]) -> None:
        if not hashes:
            return
        with self.conn.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(self.table)) as copy:
            copy.set_types(["bytea", "int4"])
            for h in hashes:
                copy.write_row((h, tokens[h]))

    def totals(self) -> tuple[int, int]:
        """(distinct chunks, their tokens): the first occurrence of a text is the one sent."""
        chunks, tokens = self.conn.execute(sql.SQL(
            "SELECT count(*), coalesce(sum(tokens), 0) FROM (SELECT DISTINCT ON (text_hash) tokens FROM {}) d"
        ).format(self.table)).fetchone()
        return int(chunks), int(tokens)

    def drop(self) -> None:
        self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self.table))


def _reuse_query(relation: sql.Composable, reuse_by: ReuseBy) -> sql.Composed:
    # One probe of the store's text_hash index per hash, as Store.vectors looks up its cache.
    return sql.SQL(
        "SELECT h.x FROM unnest(%b::bytea[]) AS h(x) WHERE EXISTS "
        "(SELECT 1 FROM {} e WHERE e.text_hash = h.x AND {})"
    ).format(relation, sql.SQL("starts_with(e.model, %s)" if reuse_by == "model" else "e.model = %s"))


def _stored(conn: psycopg.Connection, lookups: list[sql.Composed], prefix: str, hashes: list[bytes]) -> set[bytes]:
    """The hashes among `hashes` with a vector under `prefix` (or that fingerprint) in any reusable store."""
    found: set[bytes] = set()
    for query in lookups:
        wanted = [h for h in hashes if h not in found]
        if not wanted:
            break
        found.update(bytes(h) for (h,) in conn.execute(query, (wanted, prefix)))
    return found
