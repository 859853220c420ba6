"""`surge serve`'s response-cache flags and its plugin. Light on imports (``--help`` stays
fast): the cache itself loads only when the flags turn it on."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from surge.cache.feature import CacheFeature
    from surge.server.app import ServerSettings

__all__ = ["CachePlugin"]


class CachePlugin:
    """A ``surge.server.features.FeaturePlugin``."""

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "response cache", "answer a repeated reproducible request (temperature 0, a fixed "
            "seed, embeddings) of the same tenant without the engine; header X-Surge-Cache: "
            "hit|miss|bypass; 'Cache-Control: no-cache' skips the lookup, 'no-store' the "
            "keeping")
        group.add_argument("--response-cache", action="store_true",
                           help="turn the exact response cache on (off by default)")
        group.add_argument("--response-cache-bytes", type=int, default=256 << 20,
                           metavar="BYTES", help="the local cache's size bound, least "
                           "recently used entries leave first (default 268435456)")
        group.add_argument("--response-cache-ttl", type=float, default=3600.0,
                           metavar="SECONDS", help="how long an answer is kept (default 3600)")
        group.add_argument("--response-cache-keep-length", action="store_true",
                           help="also keep answers cut by max_tokens (finish_reason length; "
                                "not kept by default)")
        group.add_argument("--response-cache-wait", type=float, default=60.0,
                           metavar="SECONDS", help="an identical request arriving while the "
                           "first is being answered waits this long for that answer instead "
                           "of asking the engine again (0: never waits; default 60)")
        group.add_argument("--cache-url", default=None, metavar="redis://HOST:PORT/DB",
                           help="share the cache with every replica through this Redis (a "
                                "local LRU stays in front; Redis slow or down means bypass, "
                                "never a failed request); implies --response-cache")
        group.add_argument("--cache-key-prefix", default="surge:rc:", metavar="PREFIX",
                           help="prefix of the cache's Redis keys (default surge:rc:)")
        group.add_argument("--semantic-cache", action="store_true",
                           help="also answer a chat request whose last user message means the "
                                "same as an answered one (same tenant, model, sampling fields, "
                                "system prompt and earlier turns); implies --response-cache")
        group.add_argument("--semantic-threshold", type=float, default=0.9, metavar="COSINE",
                           help="least cosine similarity of the two messages' embeddings "
                                "(default 0.9)")
        group.add_argument("--semantic-compare", choices=("last", "conversation"),
                           default="last", help="compare the last user message by meaning and "
                           "every earlier message exactly (default), or the whole "
                           "conversation by meaning and only the system prompt exactly")
        group.add_argument("--semantic-model", default="all-minilm-l6-v2", metavar="NAME",
                           help="the served embedding model that embeds messages (default "
                                "all-minilm-l6-v2: add --extra-model all-minilm-l6-v2)")
        group.add_argument("--cache-timeout", type=float, default=0.1, metavar="SECONDS",
                           help="longest wait for Redis per call before bypassing "
                                "(default 0.1)")

    def from_args(self, args: argparse.Namespace, settings: ServerSettings,
                  model_dir: str) -> CacheFeature | None:
        if not (args.response_cache or args.cache_url or args.semantic_cache):
            return None
        from surge.cache.exact import CacheSettings
        from surge.cache.feature import CacheFeature
        from surge.cache.semantic import SemanticSettings
        from surge.cache.shared import RedisTier

        cache_settings = CacheSettings(max_bytes=args.response_cache_bytes,
                                       ttl=args.response_cache_ttl,
                                       key_prefix=args.cache_key_prefix,
                                       keep_length_cut=args.response_cache_keep_length,
                                       single_flight_wait=args.response_cache_wait)
        shared = (RedisTier(args.cache_url, timeout=args.cache_timeout)
                  if args.cache_url else None)
        semantic = (SemanticSettings(model=args.semantic_model,
                                     threshold=args.semantic_threshold,
                                     compare=args.semantic_compare)
                    if args.semantic_cache else None)
        return CacheFeature(cache_settings, shared, semantic)
