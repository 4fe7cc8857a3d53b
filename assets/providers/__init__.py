"""Embedding providers behind one small interface (see base.py)."""

from __future__ import annotations

from functools import lru_cache

from ..spec_sections import ProviderSpec
from .base import EmbeddingProvider, ProviderError


def build_provider(spec: ProviderSpec) -> EmbeddingProvider:
    """The provider a declaration asks for. Imports lazily: torch is only loaded when used."""
    if spec.kind == "sentence-transformers":
        from .sentence_transformers import SentenceTransformerProvider

        return SentenceTransformerProvider(spec)
    from .openai_compatible import OpenAICompatibleProvider

    return OpenAICompatibleProvider(spec)


@lru_cache(maxsize=8)
def provider_for(spec: ProviderSpec) -> EmbeddingProvider:
    """One provider per process and model: loading a local model takes seconds."""
    return build_provider(spec)


__all__ = ["EmbeddingProvider", "ProviderError", "build_provider", "provider_for"]
