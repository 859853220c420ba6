"""What an answer is kept under: the tenant, the model and its version, the normalized
request. And what a request's ``Cache-Control`` asks of the cache."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from surge.server.response_cache import CacheQuery
from surge.server.tenants import Tenants, resolve_tenant

__all__ = ["FORMAT_VERSION", "CacheControl", "cache_key", "model_fingerprint", "tenant_of"]

# Part of every key and every stored entry: a new layout never reads an old one.
FORMAT_VERSION = 1
_SMALL_FILE = 1 << 20  # files up to this size are fingerprinted by content, larger by size


@dataclass(frozen=True)
class CacheControl:
    """``no-cache``: do not answer from the cache (a fresh answer is still kept);
    ``no-store``: do not keep this answer. Other directives are ignored."""

    no_cache: bool = False
    no_store: bool = False

    @classmethod
    def of(cls, header: str | None) -> CacheControl:
        if not header:
            return cls()
        directives = {part.split("=", 1)[0].strip().lower() for part in header.split(",")}
        return cls(no_cache="no-cache" in directives, no_store="no-store" in directives)


def tenant_of(request: Request, user: str | None, tenants: Tenants | None = None) -> str:
    """Whose answers these are: the request's tenant as the server resolves it for scheduling
    and admission (``Tenants.resolve``: the API key's id, else the tenant header, else
    ``user``), and the body's ``user`` too, so that neither another tenant nor another
    end-user of the same tenant reads them."""
    tenant = tenants.resolve(request.scope, user) if tenants is not None else (
        resolve_tenant(request.scope, user, None))
    return json.dumps([tenant, user])


def cache_key(tenant: str, query: CacheQuery) -> str:
    material = {"format": FORMAT_VERSION, "tenant": tenant, "endpoint": query.endpoint,
                "model": query.model, "variant": query.model_variant,
                "version": model_fingerprint(query.model_dir), "request": query.material}
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def model_fingerprint(model_dir: str | None) -> str:
    """A digest of the model's files: names and sizes, and the content of the small ones
    (config, tokenizer, chat template). Equal for copies of one checkpoint on several
    machines, different after any of those files changes."""
    if model_dir is None:
        return "none"
    root = Path(model_dir)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        size = os.path.getsize(path)
        digest.update(f"{path.relative_to(root) if path != root else path.name}:{size};"
                      .encode())
        if size <= _SMALL_FILE:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]
