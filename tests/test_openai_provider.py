"""OpenAICompatibleProvider driven through the real `openai` client against a local fake server.

Nothing here is mocked below the HTTP layer: the client's own retry, backoff, Retry-After and
timeout handling run for real, so these tests also pin the client behaviour the provider's
error mapping relies on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from openai_server import Fault, OpenAIServer

from assets.providers.base import ProviderError
from assets.providers.openai_compatible import OpenAICompatibleProvider
from assets.spec_sections import ProviderSpec

KEY_ENV = "VECTORSYNC_TEST_OPENAI_KEY"
SECRET = "sk-test-5ecret-do-not-leak-9f3c"
DIMENSIONS = 8

MakeProvider = Callable[..., OpenAICompatibleProvider]


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(dimensions=DIMENSIONS) as srv:
        yield srv


@pytest.fixture
def make_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeProvider]:
    """Builds providers (closing them afterwards); keyword arguments override the spec."""
    # The client reads these itself when given no value; a developer's shell must not steer tests.
    for name in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    made: list[OpenAICompatibleProvider] = []

    def make(base_url: str | None, **overrides: object) -> OpenAICompatibleProvider:
        fields: dict[str, object] = dict(
            kind="openai",
            model="test-embed",
            dimensions=DIMENSIONS,
            base_url=base_url,
            api_key_env=KEY_ENV,
            max_retries=2,
            timeout_seconds=2,
        )
        fields.update(overrides)
        provider = OpenAICompatibleProvider(ProviderSpec(**fields))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def embed_error(provider: OpenAICompatibleProvider, texts: list[str]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        provider.embed(texts)
    return info.value


def unused_port() -> int:
    # Bind then close: the OS handed out a free port, and nothing listens on it afterwards.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Happy path --------------------------------------------------------------------------------------


def test_vectors_come_back_in_input_order_with_usage_tokens(server: OpenAIServer, make_provider: MakeProvider) -> None:
    provider = make_provider(server.base_url)
    texts = ["hello world", "a b c", "日本語のテキスト", "last one here ok"]

    result = provider.embed(texts)

    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (4, DIMENSIONS)
    for row, text in zip(result.vectors, texts):
        np.testing.assert_allclose(row, server.vector_for(text), rtol=1e-6)
    # The server counts words (2+3+1+4); the provider's own estimate (UTF-8 bytes) would be far
    # higher, so equality shows the usage block was read rather than recomputed.
    assert result.tokens == 10
    assert sum(provider.count_tokens(texts)) > 10
    [request] = server.requests
    assert request.path == "/v1/embeddings"
    assert request.inputs == texts
    assert request.body["model"] == "test-embed"
    assert request.body["encoding_format"] == "base64"  # as the official client asks by default
    assert "dimensions" not in request.body  # send_dimensions is off by default


def test_a_server_that_answers_floats_when_base64_was_asked_is_read_too(
    server: OpenAIServer, make_provider: MakeProvider
) -> None:
    provider = make_provider(server.base_url)
    texts = ["one", "two"]
    server.fail_next(Fault(floats_only=True))

    result = provider.embed(texts)

    assert isinstance(server.requests[0].body, dict)
    for row, text in zip(result.vectors, texts):
        np.testing.assert_allclose(row, server.vector_for(text), rtol=1e-6)


def test_vectors_are_matched_by_index_not_by_position(server: OpenAIServer, make_provider: MakeProvider) -> None:
    provider = make_provider(server.base_url)
    texts = ["first", "second", "third"]
    server.fail_next(Fault(reverse_order=True))

    result = provider.embed(texts)

    for row, text in zip(result.vectors, texts):
        np.testing.assert_allclose(row, server.vector_for(text), rtol=1e-6)


def test_dimensions_are_sent_only_when_asked(server: OpenAIServer, make_provider: MakeProvider) -> None:
    make_provider(server.base_url, send_dimensions=True).embed(["x"])

    assert server.requests[0].body["dimensions"] == DIMENSIONS


# Retries -----------------------------------------------------------------------------------------


def test_429_retry_after_is_honoured(server: OpenAIServer, make_provider: MakeProvider) -> None:
    provider = make_provider(server.base_url)
    server.fail_next(Fault(status=429, retry_after="1"))

    result = provider.embed(["a", "b"])

    assert result.vectors.shape == (2, DIMENSIONS)
    first, second = server.requests
    # Without Retry-After the client would wait 0.375-0.5 s; 1 s says it obeyed the header.
    assert second.received_at - first.received_at >= 0.9
    assert (first.headers["x-stainless-retry-count"], second.headers["x-stainless-retry-count"]) == ("0", "1")


def test_429_without_retry_after_backs_off_then_succeeds(server: OpenAIServer, make_provider: MakeProvider) -> None:
    provider = make_provider(server.base_url)
    server.fail_next(Fault(status=429))

    result = provider.embed(["a"])

    np.testing.assert_allclose(result.vectors[0], server.vector_for("a"), rtol=1e-6)
    first, second = server.requests
    assert second.inputs == ["a"]
    # The client's first backoff is 0.5 s less up to 25 % jitter: it waited, it did not hammer.
    assert second.received_at - first.received_at >= 0.3


def test_retry_after_beyond_the_clients_cap_is_not_retried(server: OpenAIServer, make_provider: MakeProvider) -> None:
    # The client refuses to wait more than 120 s and then gives up at once instead of backing
    # off: the engine sees rate_limited after a single request.
    provider = make_provider(server.base_url)
    server.fail_next(Fault(status=429, retry_after="600"))

    started = time.monotonic()
    error = embed_error(provider, ["a"])

    assert error.kind == "rate_limited"
    assert not error.row_level
    assert len(server.requests) == 1
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_then_succeed(
    status: int, server: OpenAIServer, make_provider: MakeProvider
) -> None:
    provider = make_provider(server.base_url)
    server.fail_next(Fault(status=status))

    result = provider.embed(["a", "b"])

    assert result.vectors.shape == (2, DIMENSIONS)
    assert len(server.requests) == 2
    assert server.requests[1].inputs == ["a", "b"]


def test_persistent_500_becomes_server_error_after_all_retries(
    server: OpenAIServer, make_provider: MakeProvider
) -> None:
    provider = make_provider(server.base_url, max_retries=2)
    server.fail_next([Fault(status=500)] * 5)

    error = embed_error(provider, ["a"])

    assert error.kind == "server_error"
    assert "500" in str(error)
    assert not error.row_level and not error.fails_run
    assert len(server.requests) == 3  # the first try and max_retries=2 retries, no more


# Failures mapped to error kinds ------------------------------------------------------------------


def test_timeout(make_provider: MakeProvider) -> None:
    with OpenAIServer(dimensions=DIMENSIONS) as server:
        provider = make_provider(server.base_url, max_retries=0, timeout_seconds=0.3)
        server.fail_next(Fault(delay=30))

        started = time.monotonic()
        error = embed_error(provider, ["a"])

        assert error.kind == "timeout"
        assert not error.row_level
        assert time.monotonic() - started < 2.0
        stopping = time.monotonic()
    # The handler was still inside its 30 s delay: stop() must interrupt it, not wait it out.
    assert time.monotonic() - stopping < 2.0
    assert not [t for t in threading.enumerate() if t.name == "openai-test-server"]


def test_connection_refused(make_provider: MakeProvider) -> None:
    provider = make_provider(f"http://127.0.0.1:{unused_port()}/v1", max_retries=0)

    error = embed_error(provider, ["a"])

    assert error.kind == "connection"
    assert not error.row_level and not error.fails_run


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(malformed=True), id="malformed-json"),
        pytest.param(Fault(vector_count_delta=-1), id="too-few-vectors"),
        pytest.param(Fault(vector_count_delta=1), id="too-many-vectors"),
        pytest.param(Fault(dimensions=DIMENSIONS - 1), id="wrong-dimension"),
        pytest.param(Fault(nan=True), id="nan"),
    ],
)
def test_unusable_responses_are_bad_response(
    fault: Fault, server: OpenAIServer, make_provider: MakeProvider
) -> None:
    provider = make_provider(server.base_url, max_retries=0)
    server.fail_next(fault)

    error = embed_error(provider, ["a", "b", "c"])

    assert error.kind == "bad_response"
    assert error.row_level  # may be caused by one input, so the engine splits the batch
    assert len(server.requests) == 1


def test_http_400_is_a_row_level_bad_request_and_not_retried(
    make_provider: MakeProvider,
) -> None:
    with OpenAIServer(dimensions=DIMENSIONS, poison=lambda text: "POISON" in text) as server:
        provider = make_provider(server.base_url, max_retries=2)

        error = embed_error(provider, ["fine", "has POISON in it", "also fine"])

        assert error.kind == "bad_request"
        assert error.row_level
        assert not error.fails_run
        assert len(server.requests) == 1  # 400 is final: the client does not retry it
        # Only batches holding the bad input fail, which is what lets the engine's halving find it.
        assert provider.embed(["fine", "also fine"]).vectors.shape == (2, DIMENSIONS)


def test_http_401_is_an_auth_error_that_fails_the_run(server: OpenAIServer, make_provider: MakeProvider) -> None:
    provider = make_provider(server.base_url)
    server.fail_next(Fault(status=401))

    error = embed_error(provider, ["a"])

    assert error.kind == "auth"
    assert error.fails_run
    assert len(server.requests) == 1


# The API key -------------------------------------------------------------------------------------


def test_key_comes_from_the_named_env_var_as_a_bearer_header(
    server: OpenAIServer, make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-wrong-variable")

    make_provider(server.base_url).embed(["a"])

    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_local_server_without_a_key_gets_a_placeholder(server: OpenAIServer, make_provider: MakeProvider) -> None:
    make_provider(server.base_url).embed(["a"])  # KEY_ENV is unset

    assert server.requests[0].headers["authorization"] == "Bearer unused"


def test_missing_key_for_the_openai_api_is_a_config_error(make_provider: MakeProvider) -> None:
    with pytest.raises(ProviderError) as info:
        make_provider(None)  # base_url None means api.openai.com, which needs a key

    assert info.value.kind == "config"
    assert info.value.fails_run
    assert KEY_ENV in str(info.value)  # says which variable to set


KEY_LEAK_CASES: list[tuple[str, list[Fault]]] = [
    ("server-error", [Fault(status=500)]),
    ("rate-limited", [Fault(status=429, retry_after="600")]),
    ("bad-request", [Fault(status=400)]),
    ("unprocessable", [Fault(status=422)]),
    ("auth", [Fault(status=401)]),
    ("timeout", [Fault(delay=30)]),
    ("malformed-json", [Fault(malformed=True)]),
    ("wrong-count", [Fault(vector_count_delta=-1)]),
    ("wrong-dimension", [Fault(dimensions=3)]),
    ("nan", [Fault(nan=True)]),
]


@pytest.mark.parametrize("faults", [c[1] for c in KEY_LEAK_CASES], ids=[c[0] for c in KEY_LEAK_CASES])
def test_the_key_never_appears_in_an_error(
    faults: list[Fault], server: OpenAIServer, make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    provider = make_provider(server.base_url, max_retries=0, timeout_seconds=0.3)
    server.fail_next(faults)

    error = embed_error(provider, ["a"])

    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # the key was in play
    assert SECRET not in str(error) and SECRET not in repr(error)
    # No client exception is chained (errors are raised `from None`), so a logged traceback does
    # not print one, nor its request object, which carries the Authorization header.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_masking_an_echoed_key_keeps_retry_after(
    server: OpenAIServer, make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that echoes the key in its 429 body: the error is rebuilt without the key, and must
    # still carry Retry-After, or the ledger would retry sooner than the provider asked.
    monkeypatch.setenv(KEY_ENV, SECRET)
    provider = make_provider(server.base_url, max_retries=0)
    server.fail_next(Fault(status=429, retry_after="7", message=f"slow down, key {SECRET}"))

    error = embed_error(provider, ["a"])

    assert SECRET not in str(error) and SECRET not in repr(error)
    assert "***" in str(error)  # the key was really there, and was masked
    assert error.kind == "rate_limited"
    assert error.retry_after == pytest.approx(7.0)
    assert error.__cause__ is None and error.__suppress_context__


def test_the_key_never_appears_in_a_connection_error(
    make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    provider = make_provider(f"http://127.0.0.1:{unused_port()}/v1", max_retries=0)

    error = embed_error(provider, ["a"])

    assert error.kind == "connection"
    assert SECRET not in str(error) and SECRET not in repr(error)


# Token counting ----------------------------------------------------------------------------------


def test_count_tokens_never_undercounts(server: OpenAIServer, make_provider: MakeProvider) -> None:
    provider = make_provider(server.base_url)
    texts = ["", "plain ascii", "héllo wörld", "日本語", "emoji 🙂🚀", "Ωμέγα", "a" * 100]

    counts = provider.count_tokens(texts)

    assert len(counts) == len(texts)
    # A byte-level BPE token covers at least one UTF-8 byte, so the byte length bounds the real
    # count from above; a character count would undercount every non-ASCII text.
    assert counts == [len(t.encode("utf-8")) for t in texts]
    assert all(c >= len(t) for c, t in zip(counts, texts))
    assert counts[3] == 9 > len(texts[3])  # three CJK characters are nine bytes
    assert not server.requests  # counting is local, it never calls the provider
