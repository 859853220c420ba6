"""Who a request is served for: one resolution for the server (scheduling, admission, rate
limits, metrics, response cache) and the router (tenant-aware policies).

1. the API key's id (``key0``, ``key1``, ... never the key) when the server checks keys: a
   caller cannot claim another key's share;
2. else the ``--tenant-header`` header, when one is named and the request carries it (a
   gateway in front says whom it forwards for);
3. else the body's ``user`` field (OpenAI's end-user id);
4. else one tenant for everyone, ``anonymous`` (the engine's ``ANONYMOUS_TENANT``).
"""

from __future__ import annotations

import hashlib

from starlette.types import Scope

from surge.http.errors import APIError
from surge.http.gate import header, key_id

__all__ = ["ANONYMOUS_TENANT", "MAX_TENANT_CHARS", "resolve_tenant", "tenant_before_body"]

ANONYMOUS_TENANT = "anonymous"  # equal to surge.engine.request.ANONYMOUS_TENANT (tested)
# The engine's own limit on a tenant name (surge.engine.core); a longer ``user`` is named by
# a digest instead, a longer header value is refused.
MAX_TENANT_CHARS = 256


def resolve_tenant(scope: Scope, user: str | None, tenant_header: str | None) -> str:
    """The tenant of a request (see the module docstring for the order); ``user`` is the
    body's field (None before the body is read, or when absent). A header value that cannot
    name a tenant is a 400 naming the header."""
    key = key_id(scope)
    if key is not None:
        return key
    if tenant_header:
        value = header(scope, tenant_header.lower().encode("latin-1"))
        if value is not None:
            value = value.strip()
            if not 0 < len(value) <= MAX_TENANT_CHARS:
                raise APIError(400, f"header {tenant_header}={value[:40]!r} is invalid: "
                               f"allowed is a tenant name of 1 to {MAX_TENANT_CHARS} "
                               "characters", param=tenant_header, code="invalid_tenant")
            return value
    if user:
        if len(user) > MAX_TENANT_CHARS:
            return "user:" + hashlib.sha256(user.encode("utf-8", "replace")).hexdigest()[:32]
        return user
    return ANONYMOUS_TENANT


def tenant_before_body(scope: Scope, tenant_header: str | None) -> str | None:
    """The tenant when the request's headers alone decide it; None when the body's ``user``
    might (no key checked, no tenant header sent)."""
    if key_id(scope) is not None:
        return key_id(scope)
    if tenant_header and header(scope, tenant_header.lower().encode("latin-1")) is not None:
        return resolve_tenant(scope, None, tenant_header)
    return None
