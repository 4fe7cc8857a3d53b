"""From a row to the pieces that get embedded: render and chunk, fit the model's limit, hash."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .spec import Chunking
from .template import TemplatePart, render

if TYPE_CHECKING:
    from .source_rows import Row

# Break points, best first: a paragraph, a line, a sentence, a word.
_SEPARATORS = ("\n\n", "\n", ". ", " ")
# Why a row without content is skipped rather than embedded (the ledger's reason).
NO_CONTENT = "no content: every text column is NULL or empty"


def chunk(text: str, chunking: Chunking | None) -> list[str]:
    """Overlapping pieces of at most `chunking.size` characters, cut at the best break point in the
    second half of each window. Every character of `text` lands in at least one piece."""
    if chunking is None or len(text) <= chunking.size:
        return [text]
    size, overlap = chunking.size, chunking.overlap
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            end = _break_before(text, start + size // 2, end)
        pieces.append(text[start:end])
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
    return pieces


def _break_before(text: str, lo: int, hi: int) -> int:
    for separator in _SEPARATORS:
        at = text.rfind(separator, lo, hi)
        if at != -1:
            return at + len(separator)
    return hi


def fit_to_token_limit(
    pieces: Sequence[str], count_tokens: Callable[[Sequence[str]], list[int]], max_tokens: int
) -> list[str]:
    """Split any piece the model would truncate, so that no input is ever cut silently."""
    result: list[str] = []
    pending = list(pieces)
    counts = count_tokens(pending)
    while pending:
        piece, tokens = pending.pop(0), counts.pop(0)
        if tokens <= max_tokens or len(piece) < 2:
            result.append(piece)
            continue
        # Cut in proportion to the overshoot, at a break point, and check both halves again.
        target = max(1, int(len(piece) * max_tokens / tokens * 0.9))
        cut = _break_before(piece, max(1, target // 2), target)
        halves = [piece[:cut], piece[cut:]]
        pending[:0] = halves
        counts[:0] = count_tokens(halves)
    return result


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def row_pieces(template: Sequence[TemplatePart], values: dict[str, Any], chunking: Chunking | None) -> list[str]:
    """A row's pieces before the model's limit is applied: its text rendered and chunked, or []
    when it has no content (every text column NULL or blank). Raises RenderError. Shared with
    assets/estimate.py, so an estimate chunks exactly as a run does."""
    text = render(template, values)
    if not text.strip() or all(v is None or not str(v).strip() for v in values.values()):
        return []
    return chunk(text, chunking)


def fit_rows_to_token_limit(rows: list[Row], provider: TokenCounting) -> dict[bytes, int]:
    """Split any piece the model would truncate (never cut silently), and hash every piece.
    Tokens are counted in one call per page rather than one per row; returns them by hash (a
    row that had to be split is left out, its new pieces are counted when they are needed)."""
    pieces = [p for r in rows for p in r.pieces]
    if not pieces:
        return {}
    counts = iter(provider.count_tokens(pieces))
    limit = provider.max_tokens_per_input
    tokens: dict[bytes, int] = {}
    for row in rows:
        row_counts = [next(counts) for _ in row.pieces]
        if max(row_counts) > limit:
            row.pieces = fit_to_token_limit(row.pieces, provider.count_tokens, limit)
            row.hashes = [text_hash(p) for p in row.pieces]
            continue  # its new pieces: counted by the caller when they are needed
        row.hashes = [text_hash(p) for p in row.pieces]
        tokens.update(zip(row.hashes, row_counts))
    return tokens


class TokenCounting(Protocol):
    """What splitting and counting need of a provider (an estimate needs no more: no API key)."""

    max_tokens_per_input: int

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...
