"""Keeping a number of replicas up, whatever runs them: the replica backend for launchers.

``ManagedReplicas`` implements ``ReplicaBackend`` over a ``ReplicaLauncher``, which only knows
how to start one replica and stop it (a local process: ``local.py``; a Ray actor would be
another launcher). Everything else is here, once for every launcher:

- Each replica joins the router's set at once (``starting``) but gets no work until its
  ``/health`` answers 200.
- A replica that dies (killed, crashed) leaves the set at once and a replacement starts at
  once; replicas that die before ever becoming healthy are restarted with growing delays, and
  if none has ever become healthy after a few tries the router is stopped (a bad flag or model
  would otherwise restart forever).
- Standbys: ready replicas held back, promoted at once when a serving one dies or the
  autoscaler wants more.
- Retiring a replica (scale-down, shutdown) drains it first: it gets no new work, its
  in-flight requests finish (up to the drain timeout), then the launcher stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from surge.config import require
from surge.router.backend import BackendHost
from surge.router.replicas import BreakerConfig, Replica

__all__ = ["LaunchError", "LaunchedReplica", "ManagedReplicas", "ReplicaLauncher",
           "SupervisorConfig"]

logger = logging.getLogger(__name__)

READY_POLL_SECONDS = 0.1
KILL_GRACE_SECONDS = 10.0


class LaunchedReplica(Protocol):
    """One replica a launcher started: an OpenAI-compatible server at ``url`` that answers
    ``GET /health``."""

    url: str
    pid: int | None  # shown on the status page; None where there is no process id

    async def wait(self) -> str:
        """Until it has exited; how it ended, in words ("exit code 3")."""
        ...

    async def stop(self, timeout: float) -> None:
        """Ask it to drain and exit; force it after ``timeout`` seconds. Returns once it has
        exited (at once if it already had)."""
        ...

    def kill(self) -> None:
        """Force it to exit now (shutdown took too long)."""
        ...

    def last_output(self) -> str:
        """Its last lines of output, for the report when replicas keep failing to start."""
        ...


class LaunchError(Exception):
    """The launcher could not start a replica, for a reason worth telling the user (no node
    has the resources it asks for); the supervisor retries with growing delays."""


class ReplicaLauncher(Protocol):
    async def launch(self, name: str) -> LaunchedReplica:
        """Start one replica; ``LaunchError`` when it cannot be started."""
        ...

    async def aclose(self) -> None:
        """Release what outlives the replicas (output relays), after they were stopped."""
        ...


@dataclass(frozen=True)
class SupervisorConfig:
    standby: int = 0  # ready replicas held back, to replace a dead one (or scale up) at once
    startup_timeout: float = 300.0
    drain_timeout: float = 30.0
    max_start_failures: int = 3
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    name_prefix: str = "replica"  # replicas are <prefix>-1, <prefix>-2, ...
    tier: str | None = None  # the tier its replicas serve in (tiers.py)

    def __post_init__(self) -> None:
        require(self.standby >= 0, "standby", self.standby, "an integer >= 0")
        require(self.max_start_failures >= 1, "max_start_failures", self.max_start_failures,
                "an integer >= 1")
        for name, seconds in [("startup_timeout", self.startup_timeout),
                              ("drain_timeout", self.drain_timeout)]:
            require(seconds >= 0, name, seconds, "seconds >= 0")


@dataclass(eq=False)
class _Child:
    """One replica, from the moment it is wanted (``launched`` is None until it has been
    started, which may wait for a crash-loop delay)."""

    name: str
    standby: bool
    started: float
    launched: LaunchedReplica | None = None
    replica: Replica | None = None
    ready: bool = False
    retiring: bool = False

    def promote(self) -> None:
        self.standby = False
        if self.replica is not None:
            self.replica.standby = False


class ManagedReplicas:
    """Keeps ``target`` replicas serving (plus the standbys); ``scale_to(n)`` is all the
    autoscaler needs."""

    def __init__(self, launcher: ReplicaLauncher, config: SupervisorConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.launcher = launcher
        self.config = config
        self.clock = clock
        self.target = 0
        self._host: BackendHost | None = None
        self._children: list[_Child] = []
        self._names = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._ever_healthy = False
        self._start_failures = 0  # in a row, of children that died before being healthy
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def running(self, host: BackendHost, initial: int) -> AsyncIterator[ManagedReplicas]:
        self._host = host
        self._session = aiohttp.ClientSession()
        try:
            self.scale_to(initial)
            yield self
        finally:
            await self.stop_all()
            await self._session.close()
            await self.launcher.aclose()

    @property
    def host(self) -> BackendHost:
        if self._host is None:
            raise RuntimeError("the replicas are managed only while running() is entered")
        return self._host

    @property
    def count(self) -> int:
        """Replicas counting toward the target: serving or starting, not standby, not
        retiring."""
        return len(self._serving())

    def scale_to(self, target: int) -> None:
        self.target = target
        self._rebalance()

    def status(self) -> list[dict[str, object]]:
        return [{"name": c.name, "pid": c.launched.pid if c.launched else None,
                 **(getattr(c.launched, "facts", {}) if c.launched else {}),
                 "standby": c.standby, "ready": c.ready, "retiring": c.retiring,
                 "uptime_s": round(self.clock() - c.started, 1)} for c in self._children]

    def _serving(self) -> list[_Child]:
        return [c for c in self._children if not c.retiring and not c.standby]

    def _rebalance(self) -> None:
        """Serving replicas to the target (promoting standbys first: ready ones, then the
        furthest along), then standbys to their number."""
        if self._stopping:
            return
        standbys = sorted((c for c in self._children if c.standby and not c.retiring),
                          key=lambda c: (not c.ready, c.started))
        deficit = self.target - self.count
        while deficit > 0 and standbys:
            child = standbys.pop(0)
            child.promote()
            logger.info("%s leaves standby and serves", child.name)
            deficit -= 1
        for _ in range(deficit):
            self._spawn(standby=False)
        for _ in range(self.config.standby - len(standbys)):
            self._spawn(standby=True)
        if deficit < 0:
            self._retire_surplus(-deficit)

    def _retire_surplus(self, surplus: int) -> None:
        # Starting replicas first (they hold nothing), then the least busy.
        serving = sorted(self._serving(), key=lambda c: (
            c.ready, c.replica.in_flight if c.replica else 0))
        for child in serving[:surplus]:
            self._background(self._retire(child), f"retire-{child.name}")

    # -- one child's life --------------------------------------------------------------------

    def _spawn(self, standby: bool) -> None:
        child = _Child(f"{self.config.name_prefix}-{next(self._names)}", standby, self.clock())
        self._children.append(child)
        delay = 0.0 if self._start_failures <= 1 else min(2.0 ** (self._start_failures - 2),
                                                          30.0)
        self._background(self._run_child(child, delay), child.name)

    async def _run_child(self, child: _Child, delay: float) -> None:
        launch_error: str | None = None
        try:
            launched = await self._launch(child, delay)
        except LaunchError as exc:
            launched, launch_error = None, str(exc)
        except BaseException:  # cancelled: shutdown took too long
            self._children.remove(child)
            raise
        if launched is None:
            self._children.remove(child)
            if launch_error is not None and not (child.retiring or self._stopping):
                self._on_launch_failure(child, launch_error)
            return
        await self._supervise(child, launched)

    async def _launch(self, child: _Child, delay: float) -> LaunchedReplica | None:
        """Start it after the crash-loop delay; None if it is no longer wanted by then."""
        if delay:
            logger.warning("starting %s in %.0f s (replicas keep failing to start)",
                           child.name, delay)
            await asyncio.sleep(delay)  # crash-loop backoff
        if self._stopping or child.retiring:
            return None
        child.launched = await self.launcher.launch(child.name)
        return child.launched

    async def _supervise(self, child: _Child, launched: LaunchedReplica) -> None:
        """From its start to its exit: ready, serving, gone (replaced if unexpected)."""
        exited: asyncio.Future[str] | None = None
        try:
            logger.info("started %s%s (pid %s)", child.name, " as a standby" if child.standby
                        else "", launched.pid)
            exited = asyncio.ensure_future(launched.wait())
            became_healthy = await self._bring_up(child, launched, exited)
            if not became_healthy and not exited.done() and not child.retiring:
                logger.error("%s was not healthy %.0f s after its start: stopping it",
                             child.name, self.config.startup_timeout)
                await launched.stop(KILL_GRACE_SECONDS)
            how = await exited
        finally:
            if exited is not None and not exited.done():
                exited.cancel()  # we were cancelled: shutdown took too long
            self._children.remove(child)
            if child.replica is not None:
                self.host.replicas.remove(child.replica)
                self.host.metrics.forget(child.replica)
        if not child.retiring and not self._stopping:
            self._on_unexpected_exit(child, how, became_healthy)

    async def _bring_up(self, child: _Child, launched: LaunchedReplica,
                        exited: asyncio.Future[str]) -> bool:
        """Join the set, wait for /health 200: False if it exited or never answered."""
        child.replica = Replica(launched.url, child.name, healthy=False, starting=True,
                                standby=child.standby, breaker_config=self.config.breaker,
                                tier=self.config.tier,
                                # Where it runs, when the launcher says (a Ray node).
                                info={"pid": launched.pid, **getattr(launched, "facts", {})})
        self.host.replicas.add(child.replica)
        wanted = asyncio.ensure_future(self._wait_ready(child.replica))
        done, _ = await asyncio.wait({wanted, exited}, timeout=self.config.startup_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if wanted not in done:
            wanted.cancel()
            return False
        child.replica.healthy = True
        child.replica.starting = False
        child.ready = True
        self._ever_healthy = True
        self._start_failures = 0
        self.host.replicas.problem = None
        logger.info("%s is ready at %s (%.1f s after start)", child.name, child.replica.url,
                    self.clock() - child.started)
        return True

    async def _wait_ready(self, replica: Replica) -> bool:
        assert self._session is not None
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self._session.get(f"{replica.url}/health",
                                             timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(READY_POLL_SECONDS)  # polling its health, as clients would

    def _on_launch_failure(self, child: _Child, reason: str) -> None:
        """The launcher could not start it (no Ray node has the resources): the router says
        why in its 503s while no replica serves, and tries again with growing delays."""
        logger.error("%s could not be started: %s", child.name, reason)
        self.host.replicas.problem = f"{child.name} could not be started: {reason}"
        self._start_failures += 1
        if not self._ever_healthy and self._start_failures >= self.config.max_start_failures:
            logger.error("%d replicas in a row could not be started", self._start_failures)
            self.host.request_exit(1)
            return
        self._rebalance()

    def _on_unexpected_exit(self, child: _Child, how: str, became_healthy: bool) -> None:
        assert child.launched is not None
        logger.error("%s (pid %s) exited unexpectedly with %s", child.name, child.launched.pid,
                     how)
        if not became_healthy:
            self._start_failures += 1
            if not self._ever_healthy and \
                    self._start_failures >= self.config.max_start_failures:
                logger.error("%d replicas in a row failed to start; the last one said:\n%s",
                             self._start_failures, child.launched.last_output())
                self.host.request_exit(1)
                return
        if not child.standby:
            self.host.metrics.scaling_events.labels("replace").inc()
        self._rebalance()

    # -- stopping ----------------------------------------------------------------------------

    async def _retire(self, child: _Child) -> None:
        """Drain then stop: no new work, in-flight requests finish, then the launcher stops
        it (a Surge replica drains itself too)."""
        child.retiring = True
        replica = child.replica
        if replica is not None:
            replica.draining = True
            deadline = self.clock() + self.config.drain_timeout
            while replica.in_flight and self.clock() < deadline:
                await asyncio.sleep(READY_POLL_SECONDS)  # polling the router's own count
        if child.launched is not None:
            logger.info("stopping %s (pid %s)", child.name, child.launched.pid)
            await child.launched.stop(self.config.drain_timeout + KILL_GRACE_SECONDS)

    async def stop_all(self) -> None:
        self._stopping = True
        for child in list(self._children):
            if not child.retiring:
                self._background(self._retire(child), f"retire-{child.name}")
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.drain_timeout + 2 * KILL_GRACE_SECONDS)
        for child in list(self._children):  # anything still running now is killed
            if child.launched is not None:
                child.launched.kill()
        for task in self._tasks:
            task.cancel()

    def _background(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.set_name(f"surge-replicas-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())
