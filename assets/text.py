"""From a row's rendered text to the pieces that get embedded: chunk, fit the model's limit, hash."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from .spec_sections import Chunking

# Break points, best first: a paragraph, a line, a sentence, a word.
_SEPARATORS = ("\n\n", "\n", ". ", " ")


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
