"""The cache's flags: validated with a message naming the flag, and passed on to every
replica of `surge serve --replicas N` (so they all share the one Redis)."""

from __future__ import annotations

import argparse

import pytest

from surge.cache.config import CachePlugin
from surge.entrypoints.replicated import replica_serve_args
from surge.entrypoints.serve import add_serve_args
from surge.server.app import ServerSettings


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(["--model", "m", *argv])


def test_replicas_get_the_cache_flags() -> None:
    args = _parse("--replicas", "2", "--cache-url", "redis://127.0.0.1:6379/0",
                  "--response-cache-ttl", "60", "--semantic-cache")
    argv = replica_serve_args(args, "/models/m", ["m"], num_threads=1)
    assert argv[argv.index("--cache-url") + 1] == "redis://127.0.0.1:6379/0"
    assert argv[argv.index("--response-cache-ttl") + 1] == "60.0"
    assert "--semantic-cache" in argv


def test_the_cache_is_off_unless_asked() -> None:
    assert CachePlugin().from_args(_parse(), ServerSettings(), "m") is None
    feature = CachePlugin().from_args(_parse("--response-cache"), ServerSettings(), "m")
    assert feature is not None and feature.shared is None and feature.semantic is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--response-cache", "--response-cache-bytes", "0"], "--response-cache-bytes=0 is invalid"),
    (["--response-cache", "--response-cache-ttl", "-1"], "--response-cache-ttl=-1.0 is invalid"),
    (["--cache-url", "localhost:6379"], "--cache-url='localhost:6379' is invalid"),
    (["--cache-url", "redis://x", "--cache-timeout", "0"], "--cache-timeout=0.0 is invalid"),
    (["--semantic-cache", "--semantic-threshold", "0"], "--semantic-threshold=0.0 is invalid"),
])
def test_bad_flags_name_what_is_allowed(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CachePlugin().from_args(_parse(*flags), ServerSettings(), "m")
