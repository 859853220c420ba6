"""Local replicas: `surge serve` child processes on free loopback ports, kept at a target count.

Each replica is its own ``surge serve`` (with its own engine process) started with the same
model and engine flags on ``127.0.0.1`` and a port that was free a moment before (a replica
that loses that race fails to bind, exits, and is started again on another). It joins the
router's replica set at once but gets no work until its ``/health`` answers 200. Its output
is relayed to ours, each line prefixed with its name.

A replica that dies (killed, crashed) leaves the set at once and a replacement starts at once;
replicas that die before ever becoming healthy are restarted with growing delays, and if none
has ever become healthy after a few tries the router gives up (a bad flag or model would
otherwise restart forever). Retiring a replica (scale-down, shutdown) drains it first: it gets
no new work, its in-flight requests finish (up to the drain timeout), then it gets SIGTERM
(and drains itself), then SIGKILL if it does not exit.

Children live in their own session, so a terminal's Ctrl-C reaches only the router, which
stops them in order; on Linux they also get SIGTERM if the router dies without that chance.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from starlette.types import ASGIApp

from surge.procs import describe_exit
from surge.router.app import RouterApp, RouterSettings, build_router
from surge.router.autoscale import AutoscaleConfig, AutoscaleLoop, Autoscaler
from surge.router.metrics import RouterMetrics
from surge.router.policies import Policy
from surge.router.replicas import BreakerConfig, Replica, ReplicaSet

__all__ = ["LocalReplicaConfig", "LocalReplicas", "build_local_router", "threads_per_replica"]

logger = logging.getLogger(__name__)

READY_POLL_SECONDS = 0.1
KILL_GRACE_SECONDS = 10.0
_OUTPUT_TAIL_LINES = 30


def build_local_router(policy: Policy, settings: RouterSettings, config: LocalReplicaConfig,
                       initial: int, autoscale: AutoscaleConfig | None = None,
                       fallback: ASGIApp | None = None) -> RouterApp:
    """The router with its replicas as local processes (and the autoscaler when its bounds
    allow it): they start with the app and stop, drained, with it."""
    replicas = ReplicaSet()
    app = build_router(replicas, policy, settings, fallback)
    local = LocalReplicas(replicas, config, app.metrics,
                          on_fatal=lambda code: app.request_exit(code))
    app.services.append(lambda: local.running(initial))
    app.status_sections["processes"] = local.status
    if autoscale is not None and autoscale.enabled:
        loop = AutoscaleLoop(Autoscaler(autoscale), replicas, local, app.metrics)
        app.services.append(loop.running)
        app.status_sections["autoscaler"] = loop.status
    return app


def threads_per_replica(num_replicas: int) -> int:
    """Torch threads per replica so that replicas together do not oversubscribe the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, cores // max(num_replicas, 1))


@dataclass(frozen=True)
class LocalReplicaConfig:
    serve_args: list[str]  # `surge serve` flags for every replica, without --host/--port
    # The server to run; it must take --host and --port and answer GET /health.
    command: tuple[str, ...] = (sys.executable, "-m", "surge.cli", "serve")
    standby: int = 0  # ready replicas held back, to replace a dead one (or scale up) at once
    startup_timeout: float = 300.0
    drain_timeout: float = 30.0
    max_start_failures: int = 3
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    relay_output: bool = True


@dataclass(eq=False)
class _Child:
    """One replica process, from the moment it is wanted (``process`` is None until it has
    been started, which may wait for a crash-loop delay)."""

    name: str
    standby: bool
    started: float
    process: asyncio.subprocess.Process | None = None
    replica: Replica | None = None
    ready: bool = False
    retiring: bool = False
    port: int = 0
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_OUTPUT_TAIL_LINES))

    def promote(self) -> None:
        self.standby = False
        if self.replica is not None:
            self.replica.standby = False


class LocalReplicas:
    """Owns the child processes and keeps ``target`` of them serving (plus the standbys);
    ``scale_to(n)`` is all the autoscaler needs."""

    def __init__(self, replicas: ReplicaSet, config: LocalReplicaConfig,
                 metrics: RouterMetrics, on_fatal: Callable[[int], None] = lambda code: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = replicas
        self.config = config
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.clock = clock
        self.target = 0
        self._children: list[_Child] = []
        self._names = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._ever_healthy = False
        self._start_failures = 0  # in a row, of children that died before being healthy
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def running(self, initial: int) -> AsyncIterator[LocalReplicas]:
        self._session = aiohttp.ClientSession()
        try:
            self.scale_to(initial)
            yield self
        finally:
            await self.stop_all()
            await self._session.close()

    @property
    def count(self) -> int:
        """Replicas counting toward the target: serving or starting, not standby, not
        retiring."""
        return len(self._serving())

    def scale_to(self, target: int) -> None:
        self.target = target
        self._rebalance()

    def status(self) -> list[dict[str, object]]:
        return [{"name": c.name, "pid": c.process.pid if c.process else None,
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
        child = _Child(f"replica-{next(self._names)}", standby, self.clock())
        self._children.append(child)
        delay = 0.0 if self._start_failures <= 1 else min(2.0 ** (self._start_failures - 2),
                                                          30.0)
        self._background(self._run_child(child, delay), child.name)

    async def _run_child(self, child: _Child, delay: float) -> None:
        try:
            if delay:
                logger.warning("starting %s in %.0f s (replicas keep failing to start)",
                               child.name, delay)
                await asyncio.sleep(delay)  # crash-loop backoff
            if self._stopping or child.retiring:
                return
            child.process = await self._launch(child)
            became_healthy = await self._bring_up(child)
            if not became_healthy and child.process.returncode is None and not child.retiring:
                logger.error("%s was not healthy %.0f s after its start: stopping it",
                             child.name, self.config.startup_timeout)
                await _terminate(child.process, KILL_GRACE_SECONDS)
            code = await child.process.wait()
        finally:
            self._children.remove(child)
            if child.replica is not None:
                self.replicas.remove(child.replica)
                self.metrics.forget(child.replica)
        if not child.retiring and not self._stopping:
            self._on_unexpected_exit(child, code, became_healthy)

    async def _launch(self, child: _Child) -> asyncio.subprocess.Process:
        child.port = _free_port()
        command = [*self.config.command, *self.config.serve_args,
                   "--host", "127.0.0.1", "--port", str(child.port)]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_exit_with_parent(os.getpid()))
        logger.info("started %s%s (pid %d)", child.name, " as a standby" if child.standby
                    else "", process.pid)
        self._background(self._relay(child, process), f"relay-{child.name}")
        return process

    async def _bring_up(self, child: _Child) -> bool:
        """Join the set, wait for /health 200: False if it never answered."""
        assert child.process is not None
        exited = asyncio.ensure_future(child.process.wait())
        try:
            child.replica = Replica(f"http://127.0.0.1:{child.port}", child.name, healthy=False,
                                    standby=child.standby, breaker_config=self.config.breaker,
                                    info={"starting": True, "pid": child.process.pid})
            self.replicas.add(child.replica)
            ready = await self._first_of(
                asyncio.ensure_future(self._wait_ready(child.replica)), exited)
            if not ready:
                return False
        finally:
            if not exited.done():
                exited.cancel()
        child.replica.healthy = True
        child.replica.info["starting"] = False
        child.ready = True
        self._ever_healthy = True
        self._start_failures = 0
        logger.info("%s is ready at %s (%.1f s after start)", child.name, child.replica.url,
                    self.clock() - child.started)
        return True

    async def _first_of(self, wanted: asyncio.Future, exited: asyncio.Future) -> object:
        """``wanted``'s result, or None when the process exited or startup timed out."""
        done, _ = await asyncio.wait({wanted, exited}, timeout=self.config.startup_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if wanted in done:
            return wanted.result()
        wanted.cancel()
        return None

    async def _wait_ready(self, replica: Replica) -> bool:
        assert self._session is not None
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self._session.get(f"{replica.url}/health",
                                             timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(READY_POLL_SECONDS)  # polling its health, as clients would

    def _on_unexpected_exit(self, child: _Child, code: int | None,
                            became_healthy: bool) -> None:
        assert child.process is not None
        logger.error("%s (pid %d) exited unexpectedly with %s", child.name, child.process.pid,
                     describe_exit(code))
        if not became_healthy:
            self._start_failures += 1
            if not self._ever_healthy and \
                    self._start_failures >= self.config.max_start_failures:
                logger.error("%d replicas in a row failed to start; the last one said:\n%s",
                             self._start_failures, "".join(child.tail))
                self.on_fatal(1)
                return
        if not child.standby:
            self.metrics.scaling_events.labels("replace").inc()
        self._rebalance()

    async def _relay(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        """Copy the child's output to ours (and keep its last lines for error reports)."""
        assert process.stdout is not None
        prefix = f"[{child.name}] ".encode()
        async for line in process.stdout:
            child.tail.append(line.decode(errors="replace"))
            if self.config.relay_output:
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.buffer.flush()

    # -- stopping ----------------------------------------------------------------------------

    async def _retire(self, child: _Child) -> None:
        """Drain then stop: no new work, in-flight requests finish, then SIGTERM."""
        child.retiring = True
        replica = child.replica
        if replica is not None:
            replica.draining = True
            deadline = self.clock() + self.config.drain_timeout
            while replica.in_flight and self.clock() < deadline:
                await asyncio.sleep(READY_POLL_SECONDS)  # polling the router's own count
        if child.process is not None:
            logger.info("stopping %s (pid %d)", child.name, child.process.pid)
            await _terminate(child.process, self.config.drain_timeout + KILL_GRACE_SECONDS)

    async def stop_all(self) -> None:
        self._stopping = True
        for child in list(self._children):
            if not child.retiring:
                self._background(self._retire(child), f"retire-{child.name}")
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.drain_timeout + 2 * KILL_GRACE_SECONDS)
        for child in list(self._children):  # anything still running now is killed
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        for task in self._tasks:
            task.cancel()

    def _background(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.set_name(f"surge-local-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


async def _terminate(process: asyncio.subprocess.Process, timeout: float) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        logger.error("pid %d did not exit %.0f s after SIGTERM: killing it", process.pid,
                     timeout)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exit_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """In the child before exec (Linux): SIGTERM me when the router dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None

    def prepare() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the router died before prctl took effect
            os._exit(1)

    return prepare


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())
