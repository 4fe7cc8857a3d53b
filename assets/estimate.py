"""What filling a table (or a new version of it) will cost, before anything is sent. Free of Dagster.

Every source row is read in key order, page by page, rendered, chunked, split to the model's input
limit and hashed by the same functions a run uses (text.row_pieces, text.fit_rows_to_token_limit),
so the chunks counted are the chunks a run would store. A chunk costs nothing when its text
already has a vector under the same provider model and dimensions in one of the `reusable` stores
(the store's `model` column holds the fingerprint `<kind>/<model>/<dims>/<shape>`: the shape part,
template and chunking, does not change the vector of a given text), or when an earlier chunk of
this fill has the same text (a run never sends one text twice). The rest is counted with the
provider's own token counter (OpenAI's models offline, with tiktoken; no key and no request), and
priced with assets/usage.py's per-model prices.

Memory: one page of rows, plus 12 bytes per distinct chunk still to send (an 8-byte prefix of its
hash and its token count, in numpy arrays, compacted as they grow), so millions of rows fit in a
few tens of MiB. Two different texts whose SHA-256 share the first 8 bytes would be counted once:
at 10 million chunks the chance is about 3 in a million.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from .catalog import ResolvedTable, use_key_text_settings
from .source_rows import Row, SourceReader
from .spec import ProviderSpec, TableSpec
from .template import RenderError
from .text import TokenCounting, fit_rows_to_token_limit, row_pieces
from .usage import cost_usd, price_per_million

# Rows read per query: large enough that a million rows is a few hundred round trips.
DEFAULT_PAGE_SIZE = 2000
# Distinct chunk hashes kept before duplicates are dropped from the arrays (a compaction).
_COMPACT_EVERY = 1_000_000


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
) -> FillEstimate:
    """The cost of embedding every row of `table` now, reusing vectors found in the `reusable`
    store relations (e.g. the active version's store, for a candidate version; the table's own
    store, for what a full sync would send; none, for a full re-embed from scratch). They are
    composed for statements with parameters, as the engine's are (ResolvedTable.with_parameters()),
    so that a % in a name is not read as a placeholder.

    `provider` counts tokens; by default the declaration's own counter (the local model's
    tokenizer, or tiktoken for OpenAI's models, without a key). Puts the session on the key text
    settings, as the engine does, so that dates and times render as a run renders them."""
    started = time.perf_counter()
    spec = table.spec
    counter = provider if provider is not None else token_counter_for(spec.provider)
    use_key_text_settings(conn)
    reader = SourceReader(conn, table.with_parameters())
    lookups = [_reuse_query(relation) for relation in reusable]
    prefix = reuse_prefix(spec)
    template = spec.template_parts
    tally = _Tally()
    buckets = list(range(spec.buckets))
    after: str | None = None
    while True:
        rows = reader.in_key_order(buckets, after, page_size)
        if not rows:
            break
        after = rows[-1].key_json
        tally.rows += len(rows)
        candidates: list[Row] = []
        for row in rows:
            try:
                row.pieces = row_pieces(template, row.values, spec.chunking)
            except RenderError:
                tally.rows_unrenderable += 1
                continue
            if row.pieces:
                candidates.append(row)
            else:
                tally.rows_empty += 1
        tokens = fit_rows_to_token_limit(candidates, counter)
        texts = {h: p for row in candidates for h, p in zip(row.hashes, row.pieces)}
        tally.chunks += sum(len(row.hashes) for row in candidates)
        stored = _stored(conn, lookups, prefix, list(texts))
        missing = [h for h in texts if h not in stored and h not in tokens]
        tokens.update(zip(missing, counter.count_tokens([texts[h] for h in missing])))
        tally.add([h for h in texts if h not in stored], tokens)
    to_send, token_total = tally.distinct()
    price = price_per_million(spec.provider)
    return FillEstimate(
        rows=tally.rows, chunks=tally.chunks, chunks_reused=tally.chunks - to_send, chunks_to_send=to_send,
        tokens=token_total, usd=cost_usd(token_total, price), price_per_million=price,
        rows_empty=tally.rows_empty, rows_unrenderable=tally.rows_unrenderable,
        seconds=time.perf_counter() - started,
    )


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


class _Tally:
    """Counts, and the distinct chunks still to send as (8-byte hash prefix, tokens) arrays."""

    def __init__(self) -> None:
        self.rows = self.chunks = self.rows_empty = self.rows_unrenderable = 0
        self._keys: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._pending = 0

    def add(self, hashes: list[bytes], tokens: dict[bytes, int]) -> None:
        if not hashes:
            return
        self._keys.append(np.frombuffer(b"".join(h[:8] for h in hashes), dtype=np.uint64))
        self._tokens.append(np.fromiter((tokens[h] for h in hashes), dtype=np.uint32, count=len(hashes)))
        self._pending += len(hashes)
        if self._pending >= _COMPACT_EVERY:
            self.distinct()

    def distinct(self) -> tuple[int, int]:
        """Drop repeated texts (the first occurrence is the one sent); returns (chunks, tokens)."""
        if not self._keys:
            return 0, 0
        keys, first = np.unique(np.concatenate(self._keys), return_index=True)
        tokens = np.concatenate(self._tokens)[first]
        self._keys, self._tokens, self._pending = [keys], [tokens], 0
        return int(keys.size), int(tokens.sum(dtype=np.int64))


def _reuse_query(relation: sql.Composable) -> sql.Composed:
    # One probe of the store's text_hash index per hash, as Store.vectors looks up its cache.
    return sql.SQL(
        "SELECT h.x FROM unnest(%b::bytea[]) AS h(x) WHERE EXISTS "
        "(SELECT 1 FROM {} e WHERE e.text_hash = h.x AND starts_with(e.model, %s))"
    ).format(relation)


def _stored(conn: psycopg.Connection, lookups: list[sql.Composed], prefix: str, hashes: list[bytes]) -> set[bytes]:
    """The hashes among `hashes` with a vector under `prefix` in any reusable store."""
    found: set[bytes] = set()
    for query in lookups:
        wanted = [h for h in hashes if h not in found]
        if not wanted:
            break
        found.update(bytes(h) for (h,) in conn.execute(query, (wanted, prefix)))
    return found
