"""API keys (401 otherwise) and per-key token-bucket rate limits (429 with Retry-After)."""

from __future__ import annotations

import pytest

from surge.http.auth import ApiKeyAuth, AuthError, RateLimited, RateLimiter

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- ApiKeyAuth -------------------------------------------------------------------------------


def test_no_keys_configured_allows_everyone() -> None:
    auth = ApiKeyAuth([])
    assert not auth.enabled
    assert auth.authenticate(None) is None
    assert auth.authenticate("Bearer anything") is None


def test_each_key_gets_a_stable_id_that_is_not_the_key() -> None:
    auth = ApiKeyAuth(["sk-first-secret", "sk-second-secret"])
    first = auth.authenticate("Bearer sk-first-secret")
    second = auth.authenticate("Bearer sk-second-secret")
    assert first != second
    assert auth.authenticate("Bearer sk-second-secret") == second
    for key_id in (first, second):
        assert key_id is not None
        assert "secret" not in key_id


def test_scheme_is_case_insensitive_and_whitespace_tolerant() -> None:
    auth = ApiKeyAuth(["sk-abc"])
    assert auth.authenticate("bearer sk-abc") == auth.authenticate("  Bearer   sk-abc ")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "Missing API key"),
        ("", "Missing API key"),
        ("Bearer sk-wrong", "Incorrect API key"),
        ("Bearer sk-ab", "Incorrect API key"),  # a prefix of the key
        ("Bearer sk-abcd", "Incorrect API key"),  # the key plus more
        ("Basic c2stYWJj", "Malformed Authorization header"),
        ("sk-abc", "Malformed Authorization header"),
        ("Bearer ", "Malformed Authorization header"),
        ("Bearer sk-ab\udcff", "Incorrect API key"),  # undecodable bytes must not crash
    ],
)
def test_bad_credentials_raise_auth_error_with_a_clear_message(
    header: str | None, expected: str
) -> None:
    auth = ApiKeyAuth(["sk-abc"])
    with pytest.raises(AuthError) as caught:
        auth.authenticate(header)
    assert expected in caught.value.message
    assert "sk-abc" not in caught.value.message


def test_empty_key_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="empty"):
        ApiKeyAuth(["sk-ok", " "])


# --- RateLimiter ------------------------------------------------------------------------------


def test_no_limits_never_refuses() -> None:
    limiter = RateLimiter(None, None)
    for _ in range(1000):
        limiter.check("key0", 10**6)


def test_requests_per_minute_then_429_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=None, time_fn=clock)
    for _ in range(3):
        limiter.check("key0", 10)
    with pytest.raises(RateLimited) as caught:
        limiter.check("key0", 10)
    assert caught.value.limit == "requests"
    # One request refills every 20 s at 3 per minute.
    assert caught.value.retry_after == 20
    assert "3 requests per minute" in caught.value.message


def test_bucket_refills_continuously() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=None, time_fn=clock)
    for _ in range(60):
        limiter.check("key0", 1)
    with pytest.raises(RateLimited):
        limiter.check("key0", 1)
    clock.advance(1.0)  # 60 per minute: one more request per second
    limiter.check("key0", 1)
    with pytest.raises(RateLimited) as caught:
        limiter.check("key0", 1)
    assert caught.value.retry_after == 1


def test_tokens_per_minute_charges_prompt_plus_max_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=1200, time_fn=clock)
    limiter.check("key0", 1000)
    with pytest.raises(RateLimited) as caught:
        limiter.check("key0", 300)
    assert caught.value.limit == "tokens"
    # 100 more tokens are needed; 1200 per minute refill 100 in 5 s.
    assert caught.value.retry_after == 5
    clock.advance(5.0)
    limiter.check("key0", 300)


def test_refused_request_is_not_charged() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=100, time_fn=clock)
    limiter.check("key0", 90)
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.check("key0", 50)  # refused for tokens: its request is not spent
    limiter.check("key0", 10)


def test_keys_have_separate_buckets() -> None:
    limiter = RateLimiter(requests_per_minute=1, tokens_per_minute=None, time_fn=FakeClock())
    limiter.check("key0", 1)
    limiter.check("key1", 1)
    limiter.check(None, 1)  # no auth: one shared bucket
    with pytest.raises(RateLimited) as caught:
        limiter.check("key0", 1)
    assert "key0" in caught.value.message


def test_request_bigger_than_a_minute_of_tokens_says_how_to_fix_it() -> None:
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=1000, time_fn=FakeClock())
    with pytest.raises(RateLimited) as caught:
        limiter.check("key0", 1001)
    assert caught.value.limit == "tokens"
    assert "lower max_tokens" in caught.value.message


@pytest.mark.parametrize(("requests", "tokens"), [(0, None), (None, -5), (1.5, None)])
def test_limits_must_be_positive_integers_or_none(requests: object, tokens: object) -> None:
    with pytest.raises(ValueError, match=">= 1 or None"):
        RateLimiter(requests, tokens)  # type: ignore[arg-type]


def test_the_owner_of_stored_things_is_stable_per_key_and_not_the_key() -> None:
    from surge.http.auth import ApiKeyAuth

    first, reordered = ApiKeyAuth(["alpha", "beta"]), ApiKeyAuth(["beta", "alpha"])
    owner = first.owner(first.authenticate("Bearer alpha"))
    assert owner == reordered.owner(reordered.authenticate("Bearer alpha"))  # not by position
    assert owner != first.owner(first.authenticate("Bearer beta"))
    assert "alpha" not in owner and len(owner) == 32
    assert ApiKeyAuth([]).owner(None) == ""
