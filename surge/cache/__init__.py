"""The response cache (issue 17): reproducible answers of /v1/chat/completions,
/v1/completions and /v1/embeddings kept per tenant, in a local LRU bounded by bytes and a TTL,
in front of an optional Redis shared by every replica.

A feature of `surge serve` (``config.CachePlugin``): it plugs into the server through
``surge.server.response_cache.ResponseCache``; the server imports nothing from here.
"""
