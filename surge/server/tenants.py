"""Tenants: who a request is served for, and each tenant's weight and limits.

One function decides the tenant of a request (``surge.http.tenant.resolve_tenant``: the API
key's id, else the ``--tenant-header`` header, else the body's ``user``, else ``anonymous``),
for the engine's fair scheduler, the admission queue, rate limits, metrics, the response
cache, and the router's tenant-aware policies alike.

``--tenants FILE`` (TOML or JSON) gives weights and limits; tenants it does not name get its
``[default]`` table::

    [default]                  # every tenant not named below
    max_queued_requests = 32   # its own slice of the waiting queue (429 past it)

    [tenants.key0]
    weight = 2                 # twice the engine's service of a weight-1 tenant (fair policy)
    max_queued_requests = 64
    max_in_flight = 16         # admitted and not yet finished
    requests_per_minute = 600
    tokens_per_minute = 200000 # prompt + max_tokens, charged up front

SIGHUP reloads the file: what changed is logged; a file that does not load keeps the old
configuration and the log says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from starlette.types import Scope

from surge.http.auth import RateLimited, RateLimiter
from surge.http.tenant import (
    ANONYMOUS_TENANT,
    MAX_TENANT_CHARS,
    resolve_tenant,
    tenant_before_body,
)

__all__ = ["ANONYMOUS_TENANT", "MAX_TENANT_CHARS", "TenantLimits", "Tenants", "TenantsConfig",
           "TenantsFileError", "reloading_on_sighup", "resolve_tenant", "tenant_before_body"]

logger = logging.getLogger(__name__)

_LIMIT_FIELDS = ("max_queued_requests", "max_in_flight", "requests_per_minute",
                 "tokens_per_minute")


# -- configuration ---------------------------------------------------------------------------


class TenantsFileError(ValueError):
    """The tenants file does not load; the message names the file, the entry and what is
    allowed."""


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's weight and limits; None is no limit of the tenant's own (the server's
    fair share of the queue still applies)."""

    weight: float = 1.0
    max_queued_requests: int | None = None
    max_in_flight: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class TenantsConfig:
    default: TenantLimits = TenantLimits()
    tenants: dict[str, TenantLimits] = field(default_factory=dict)

    def limits(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)

    def weights(self) -> dict[str, float]:
        """The fair scheduler's weights: every named tenant (others weigh the default's)."""
        return {name: limits.weight for name, limits in self.tenants.items()}

    @classmethod
    def load(cls, path: str | Path) -> TenantsConfig:
        """Parse and validate ``path`` (``.toml``, or ``.json``; another suffix is tried as
        JSON, then TOML)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TenantsFileError(f"tenants file {path}: cannot be read ({exc})") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str | Path = "<tenants>") -> TenantsConfig:
        data = _decode(text, Path(path))
        return _config_of(data, str(path))

    def changes(self, new: TenantsConfig) -> list[str]:
        """What differs from ``self`` to ``new``, one line per tenant, for the reload log."""
        lines = []
        if new.default != self.default:
            lines.append(f"default: {_describe(self.default)} -> {_describe(new.default)}")
        for name in sorted(self.tenants.keys() | new.tenants.keys()):
            old, now = self.tenants.get(name), new.tenants.get(name)
            if old == now:
                continue
            if old is None:
                lines.append(f"tenant {name!r} added: {_describe(now)}")
            elif now is None:
                lines.append(f"tenant {name!r} removed (now the default)")
            else:
                lines.append(f"tenant {name!r}: {_describe(old)} -> {_describe(now)}")
        return lines


def _decode(text: str, path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _toml(text, path)
    if suffix == ".json":
        return _json(text, path)
    try:
        return _json(text, path)
    except TenantsFileError:
        return _toml(text, path)


def _toml(text: str, path: Path) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantsFileError(f"tenants file {path}: not valid TOML ({exc})") from exc


def _json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TenantsFileError(f"tenants file {path}: not valid JSON ({exc})") from exc


def _config_of(data: Any, where: str) -> TenantsConfig:
    if not isinstance(data, Mapping):
        raise TenantsFileError(f"tenants file {where}: the top level must be a table with "
                               "'default' and/or 'tenants'")
    unknown = set(data) - {"default", "tenants"}
    if unknown:
        raise TenantsFileError(f"tenants file {where}: unknown top-level key(s) "
                               f"{sorted(unknown)}: allowed are 'default' and 'tenants'")
    default_table = data.get("default", {})
    if isinstance(default_table, Mapping) and "weight" in default_table:
        # The engine weighs every tenant it was not told about 1; a default weight would
        # only rescale every counter.
        raise TenantsFileError(f"tenants file {where}: default.weight is not supported: "
                               "tenants not named weigh 1; set weight per tenant")
    default = _limits_of(default_table, "default", where, TenantLimits())
    tenants_table = data.get("tenants", {})
    if not isinstance(tenants_table, Mapping):
        raise TenantsFileError(f"tenants file {where}: 'tenants' must be a table of tenant "
                               "name to its settings")
    tenants = {}
    for name, table in tenants_table.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TENANT_CHARS:
            raise TenantsFileError(f"tenants file {where}: tenant name {name!r} is invalid: "
                                   f"allowed is 1 to {MAX_TENANT_CHARS} characters")
        tenants[name] = _limits_of(table, f"tenants.{name}", where, default)
    return TenantsConfig(default, tenants)


def _limits_of(table: Any, name: str, where: str, base: TenantLimits) -> TenantLimits:
    """A tenant's table; what it does not set comes from ``base`` (the default table)."""
    if not isinstance(table, Mapping):
        raise TenantsFileError(f"tenants file {where}: {name} must be a table of settings")
    allowed = [f.name for f in fields(TenantLimits)]
    unknown = set(table) - set(allowed)
    if unknown:
        raise TenantsFileError(f"tenants file {where}: {name}: unknown setting(s) "
                               f"{sorted(unknown)}: allowed are {', '.join(allowed)}")
    values = {f.name: getattr(base, f.name) for f in fields(TenantLimits)}
    for key, value in table.items():
        if key == "weight":
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0)
            _require(ok, f"{name}.weight", value, "a finite number > 0", where)
            values[key] = float(value)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            _require(ok, f"{name}.{key}", value, "a whole number >= 1", where)
            values[key] = value
    return TenantLimits(**values)


def _require(ok: bool, name: str, value: object, allowed: str, where: str) -> None:
    if not ok:
        raise TenantsFileError(f"tenants file {where}: {name}={value!r} is invalid: "
                               f"allowed is {allowed}")


def _describe(limits: TenantLimits | None) -> str:
    if limits is None:
        return "-"
    parts = [f"weight={limits.weight:g}"]
    parts += [f"{name}={getattr(limits, name)}" for name in _LIMIT_FIELDS
              if getattr(limits, name) is not None]
    return " ".join(parts)


# -- the server's tenants --------------------------------------------------------------------


class Tenants:
    """The server's tenant resolution and configuration: the header it trusts, the file it
    reloads, and each tenant's own rate limiter."""

    def __init__(self, tenant_header: str | None = None, path: str | Path | None = None,
                 config: TenantsConfig | None = None) -> None:
        if tenant_header is not None and not _is_token(tenant_header):
            raise ValueError(f"tenant_header={tenant_header!r} is invalid: allowed is an "
                             "HTTP header name (letters, digits, '-')")
        self.tenant_header = tenant_header
        self.path = Path(path) if path is not None else None
        if config is None:
            config = TenantsConfig.load(self.path) if self.path is not None else TenantsConfig()
        self.config = config
        self._limiters: dict[str, RateLimiter] = {}

    def resolve(self, scope: Scope, user: str | None) -> str:
        return resolve_tenant(scope, user, self.tenant_header)

    def before_body(self, scope: Scope) -> str | None:
        return tenant_before_body(scope, self.tenant_header)

    def limits(self, tenant: str) -> TenantLimits:
        return self.config.limits(tenant)

    def charge(self, tenant: str, num_tokens: int) -> None:
        """The tenant's own requests and tokens per minute; raises RateLimited."""
        limits = self.limits(tenant)
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return
        limiter = self._limiters.get(tenant)
        wanted = (limits.requests_per_minute, limits.tokens_per_minute)
        if limiter is None or (limiter.requests_per_minute,
                               limiter.tokens_per_minute) != wanted:
            limiter = self._limiters[tenant] = RateLimiter(*wanted)
            if len(self._limiters) > 10_000:  # a safety net: forget the oldest tenant
                self._limiters.pop(next(iter(self._limiters)))
        try:
            limiter.check(tenant, num_tokens)
        except RateLimited as exc:
            # The limiter names an API key; say whose limit it was.
            raise RateLimited(exc.limit, exc.retry_after, exc.message.replace(
                f"API key {tenant}", f"tenant {tenant!r}")) from None

    def reload(self) -> list[str] | None:
        """Load the file again: the changes (maybe none), or None when it did not load (the
        old configuration stays; the reason is logged)."""
        if self.path is None:
            logger.info("SIGHUP: no --tenants file to reload")
            return None
        try:
            new = TenantsConfig.load(self.path)
        except TenantsFileError as exc:
            logger.error("tenants reload failed, keeping the previous configuration: %s", exc)
            return None
        changes = self.config.changes(new)
        self.config = new
        if changes:
            for line in changes:
                logger.info("tenants reloaded from %s: %s", self.path, line)
        else:
            logger.info("tenants reloaded from %s: no change", self.path)
        return changes


@contextlib.asynccontextmanager
async def reloading_on_sighup(tenants: Tenants,
                              apply: Callable[[TenantsConfig], Awaitable[None]]
                              ) -> AsyncIterator[None]:
    """A service: while entered, SIGHUP reloads the tenants file and, when it changed, hands
    the new configuration to ``apply`` (the engine's weights)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def apply_logged(config: TenantsConfig) -> None:
        try:
            await apply(config)
        except Exception:
            logger.exception("tenants reload: the new weights did not reach the engine")

    def on_hangup() -> None:
        if tenants.reload():
            task = loop.create_task(apply_logged(tenants.config))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        # Not the main thread (an app under a test client), or no SIGHUP (Windows).
        logger.warning("SIGHUP will not reload %s here: %s", tenants.path, exc)
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


def _is_token(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name) and name.isascii()
