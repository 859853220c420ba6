"""Local replicas: child processes on free loopback ports, behind the router.

``LocalProcessLauncher`` starts each replica as a child process (the command the composer
gives, e.g. ``surge serve`` with the user's model and engine flags) on ``127.0.0.1`` and a port
that was free a moment before (a replica that loses that race fails to bind, exits, and is
started again on another). Its output is relayed to ours, each line prefixed with its name.
Stopping one sends SIGTERM (a Surge replica drains itself), then SIGKILL if it does not exit.
``ManagedReplicas`` (``supervisor.py``) keeps the right number of them up.

Children live in their own session, so a terminal's Ctrl-C reaches only the router, which
stops them in order; on Linux they also get SIGTERM if the router dies without that chance.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp

from surge.procs import describe_exit
from surge.router.app import RouterApp, RouterSettings, build_router
from surge.router.autoscale import AutoscaleConfig
from surge.router.backend import ReplicaPlan
from surge.router.policies import Policy
from surge.router.replicas import BreakerConfig, ReplicaSet
from surge.router.supervisor import ManagedReplicas, SupervisorConfig

__all__ = ["LocalProcess", "LocalProcessLauncher", "LocalReplicaConfig", "build_local_router",
           "local_replicas", "threads_per_replica"]

logger = logging.getLogger(__name__)

_OUTPUT_TAIL_LINES = 30
# At shutdown, once the replicas were stopped, how long their output relays may take to read
# to the end (a grandchild that inherited the pipe may hold it open).
_RELAY_CLOSE_SECONDS = 5.0


@dataclass(frozen=True)
class LocalReplicaConfig:
    args: list[str]  # the command's arguments for every replica, without --host/--port
    # The server to run; it must take --host and --port and answer GET /health.
    command: tuple[str, ...]
    standby: int = 0  # ready replicas held back, to replace a dead one (or scale up) at once
    startup_timeout: float = 300.0
    drain_timeout: float = 30.0
    max_start_failures: int = 3
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    relay_output: bool = True
    # Where each replica listens: loopback here; a Ray node's own address in a Ray actor.
    host: str = "127.0.0.1"
    env: dict[str, str] | None = None  # added to the inherited environment

    def supervision(self) -> SupervisorConfig:
        return SupervisorConfig(standby=self.standby, startup_timeout=self.startup_timeout,
                                drain_timeout=self.drain_timeout,
                                max_start_failures=self.max_start_failures,
                                breaker=self.breaker)


def local_replicas(config: LocalReplicaConfig) -> ManagedReplicas:
    """The replica backend of local processes."""
    return ManagedReplicas(LocalProcessLauncher(config), config.supervision())


def build_local_router(policy: Policy, settings: RouterSettings, config: LocalReplicaConfig,
                       initial: int, autoscale: AutoscaleConfig | None = None,
                       fallback: ASGIApp | None = None) -> RouterApp:
    """The router with its replicas as local processes (and the autoscaler when its bounds
    allow it): they start with the app and stop, drained, with it."""
    plan = ReplicaPlan(local_replicas(config), initial, autoscale)
    return build_router(ReplicaSet(), policy, settings, fallback, plan)


def threads_per_replica(num_replicas: int) -> int:
    """Torch threads per replica so that replicas together do not oversubscribe the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, cores // max(num_replicas, 1))


class LocalProcessLauncher:
    """Starts each replica as ``command + args + --host <host> --port <free port>``."""

    def __init__(self, config: LocalReplicaConfig) -> None:
        self.config = config
        self._relays: set[asyncio.Task[None]] = set()

    async def launch(self, name: str) -> LocalProcess:
        host = self.config.host
        port = _free_port(host)
        command = [*self.config.command, *self.config.args, "--host", host, "--port", str(port)]
        env = {**os.environ, **self.config.env} if self.config.env else None
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=env,
            preexec_fn=_exit_with_parent(os.getpid()))
        child = LocalProcess(name, process, f"http://{_url_host(host)}:{port}")
        relay = asyncio.ensure_future(child.relay(self.config.relay_output))
        relay.set_name(f"surge-local-relay-{name}")
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        return child

    async def aclose(self) -> None:
        """The replicas were stopped: their relays end with their pipes (bounded)."""
        if self._relays:
            await asyncio.wait(list(self._relays), timeout=_RELAY_CLOSE_SECONDS)
        for relay in list(self._relays):
            relay.cancel()


class LocalProcess:
    """One replica process (a ``LaunchedReplica``)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, url: str) -> None:
        self.name = name
        self.process = process
        self.url = url
        self.pid: int | None = process.pid
        self._tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)

    async def wait(self) -> str:
        return describe_exit(await self.process.wait())

    async def stop(self, timeout: float) -> None:
        await _terminate(self.process, timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def last_output(self) -> str:
        return "".join(self._tail)

    async def relay(self, to_stderr: bool) -> None:
        """Copy the child's output to ours (and keep its last lines for error reports)."""
        assert self.process.stdout is not None
        prefix = f"[{self.name}] ".encode()
        async for line in self.process.stdout:
            self._tail.append(line.decode(errors="replace"))
            if to_stderr:
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.buffer.flush()


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


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
