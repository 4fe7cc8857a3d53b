"""Embedding providers behind one small interface (see base.py)."""

from __future__ import annotations

from ..spec import ProviderSpec
from .base import EmbeddingProvider, ProviderError


def build_provider(spec: ProviderSpec) -> EmbeddingProvider:
    """The provider a declaration asks for. Imports lazily: torch is only loaded when used."""
    if spec.kind == "sentence-transformers":
        from .sentence_transformers import SentenceTransformerProvider

        return SentenceTransformerProvider(spec)
    from .openai_compatible import OpenAICompatibleProvider

    return OpenAICompatibleProvider(spec)


__all__ = ["EmbeddingProvider", "ProviderError", "build_provider"]
