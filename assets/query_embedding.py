"""One query at a time, quickly and with a short tail: how the search service embeds queries.

Two things matter for a single short query on a small, shared machine, both measured on the
project's 2-core box with other work running (200 queries, all-MiniLM-L6-v2):

* torch's intra-op threads. Two threads for a one-sentence forward pass waited on whichever core
  was busy elsewhere: p50 22.7 ms, p95 440 ms; one thread: p50 10.8 ms, p95 24.6 ms.
* SentenceTransformer.encode's batching machinery (sorting by length, padding, progress bar, list
  handling) around the forward pass: calling the tokenizer, the transformer, mean pooling and
  normalisation directly took p50 8.0 ms, p95 11.5 ms on one thread.

The direct path is used only when it gives the same vectors as the provider on probe texts (so a
model whose pipeline has more than transformer + mean pooling + normalise keeps encode()); any
other provider (an HTTP API) is called as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .providers.base import EmbeddingProvider

PROBES = ("how do I open a file", "image library - Python 3 bindings", "E24017")


class QueryEmbedder:
    def __init__(self, provider: EmbeddingProvider) -> None:
        self.provider = provider
        self._lock = threading.Lock()  # a fast tokenizer keeps shared state: one call at a time
        self._direct: Callable[[str], np.ndarray] | None = None
        model = getattr(provider, "model", None)
        if model is not None and type(model).__name__ == "SentenceTransformer":
            import torch

            # The service process embeds queries only, one short sequence each: see the module's doc.
            torch.set_num_threads(1)
            direct = _direct_encoder(model)
            expected = [provider.embed([p]).vectors[0] for p in PROBES]
            if direct is not None and all(np.allclose(direct(p), e, atol=1e-5) for p, e in zip(PROBES, expected)):
                self._direct = direct

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def embed(self, query: str) -> np.ndarray:
        if self._direct is None:
            return self.provider.embed([query]).vectors[0].astype(np.float32)
        with self._lock:
            return self._direct(query)


def _direct_encoder(model: Any) -> Callable[[str], np.ndarray] | None:
    modules = list(model)
    if len(modules) not in (2, 3) or not hasattr(modules[0], "auto_model"):
        return None
    import torch

    transformer = modules[0].auto_model
    tokenizer = model.tokenizer
    max_length = int(model.max_seq_length)

    def encode(text: str) -> np.ndarray:
        with torch.inference_mode():
            batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_length)
            tokens = transformer(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=1)[0].numpy().astype(np.float32)

    return encode
