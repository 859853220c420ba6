"""Replicas as Ray actors: ``surge serve --backend ray``.

Each replica is one Ray actor (``ReplicaActor``) that Ray places on whichever node has the
resources the replica asks for (``--replica-cpus``, ``--replica-gpus``,
``--replica-resources``). The actor starts the replica's server as a child process on its
node's address, with the same ``LocalProcessLauncher`` that runs local replicas, and reports
its URL. ``RayLauncher`` is a ``ReplicaLauncher``, so ``ManagedReplicas`` does everything else
as it does for local processes: no work before ``/health`` answers, a replacement for a
replica that dies, standbys, drain before stop. The autoscaler's ``scale_to`` becomes actors
asked of Ray; an actor Ray cannot place yet is pending, which is what a Ray cluster
autoscaler adds nodes for.

A replica is gone when its actor dies (Ray tells the actor's owner, us) or, sooner, when its
server refuses connections for ``liveness_seconds`` after it had accepted them: a lost node
takes Ray its health-check period (about 15 s by default) to notice, and the router should not
wait that long to start a replacement. The actor is then killed.

Actors are named ``<deployment>/<replica>`` in the ``surge`` namespace, so another router
(``surge route --backend ray``) can find them (``RayDiscovery``).

Ray is optional (``pip install "surge[ray]"``); it is imported only by the functions here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from surge.router.backend import BackendHost
from surge.router.local import LocalProcess, LocalProcessLauncher, LocalReplicaConfig
from surge.router.replicas import BreakerConfig, Replica
from surge.router.supervisor import LaunchError, ManagedReplicas, SupervisorConfig

__all__ = ["NAMESPACE", "PYTHON", "RAY_MISSING", "RayDiscovery", "RayLauncher",
           "RayReplicaConfig", "RayUnavailable", "connect_ray", "ray_replicas"]

logger = logging.getLogger(__name__)

NAMESPACE = "surge"
# In a replica command: the actor's own Python interpreter (the path may differ per node).
PYTHON = "{python}"
RAY_MISSING = ('--backend ray needs Ray, which is not installed: pip install "surge[ray]" '
               "(on every node of the cluster too)")
LIVENESS_POLL_SECONDS = 0.25
CONNECT_CHECK_SECONDS = 3.0
_STOP_GRACE_SECONDS = 5.0


class RayUnavailable(ValueError):
    """Ray is not installed, or the cluster cannot be reached: the message says what to do
    (a ValueError: the command line reports it and exits 2)."""


@dataclass(frozen=True)
class RayReplicaConfig:
    command: tuple[str, ...]  # the replica's server; PYTHON stands for the node's interpreter
    args: list[str]  # its arguments, without --host/--port (the actor adds its node's)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources
    env: dict[str, str] = field(default_factory=dict)  # for the replica's process
    placement_timeout: float = 120.0  # how long an actor may wait for a node
    liveness_seconds: float = 3.0  # refused connections for this long: the replica is gone
    deployment: str = "surge"  # actor names: <deployment>/<replica>
    relay_output: bool = True
    supervision: SupervisorConfig = field(default_factory=SupervisorConfig)

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"--replica-cpus {self.num_cpus} / --replica-gpus {self.num_gpus} "
                             "is invalid: allowed is a number >= 0")
        for name, amount in self.resources.items():
            if amount <= 0:
                raise ValueError(f"--replica-resources {name}={amount} is invalid: allowed is "
                                 "an amount > 0")
        if self.placement_timeout <= 0 or self.liveness_seconds <= 0:
            raise ValueError("--ray-placement-timeout and the liveness period are invalid: "
                             "allowed is seconds > 0")

    def needs(self) -> dict[str, float]:
        """What one replica asks of a node, in Ray's resource names."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: amount for name, amount in wanted.items() if amount > 0}


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(RAY_MISSING) from exc
    return ray


def connect_ray(address: str | None, *, log_to_driver: bool = True) -> Any:
    """Join the Ray cluster at ``address`` ("host:port" of its head, "auto" for the one
    ``ray start`` runs here, ``ray://`` for Ray Client), or start a local one (None). An
    unreachable address fails at once, naming it."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": log_to_driver}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise RayUnavailable(f"could not join the Ray cluster at {address or 'a new local one'}"
                             f": {_first_line(exc)}") from exc
    logger.info("joined Ray %s (nodes: %s)", ray.__version__, _describe_nodes(ray))
    return ray


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray-address {address!r} is invalid: allowed is host:port of "
                             "a Ray head node (its GCS port, 6379 by default), 'auto', or "
                             "ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_CHECK_SECONDS):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"--ray-address {address}: no Ray head node answers there ({exc.strerror or exc}); "
            f"start one with `ray start --head --port {port}`, or leave out --ray-address to "
            "start a local Ray") from exc


def ray_replicas(config: RayReplicaConfig) -> ManagedReplicas:
    """The replica backend of Ray actors (connect_ray first)."""
    return ManagedReplicas(RayLauncher(config), config.supervision)


# -- in the actor, on its node ---------------------------------------------------------------


class ReplicaActor:
    """One replica's server, as a child process of this actor on the actor's node."""

    def __init__(self, name: str, config: RayReplicaConfig) -> None:
        ray = import_ray()
        self.name = name
        self.host = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        command = tuple(sys.executable if part == PYTHON else part for part in config.command)
        self.launcher = LocalProcessLauncher(LocalReplicaConfig(
            config.args, command, host=self.host, env=config.env,
            relay_output=config.relay_output))
        self.process: LocalProcess | None = None

    async def start(self) -> dict[str, Any]:
        self.process = await self.launcher.launch(self.name)
        return self.info()

    def info(self) -> dict[str, Any]:
        assert self.process is not None
        return {"url": self.process.url, "pid": self.process.pid, "node_id": self.node_id,
                "node_ip": self.host}

    async def wait(self) -> str:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self, timeout: float) -> None:
        if self.process is not None:
            await self.process.stop(timeout)
        await self.launcher.aclose()

    def last_output(self) -> str:
        return self.process.last_output() if self.process is not None else ""


# -- in the router ---------------------------------------------------------------------------


class RayLauncher:
    """Starts each replica as a ``ReplicaActor`` with the configured resources."""

    def __init__(self, config: RayReplicaConfig) -> None:
        self.config = config
        self._actor_class: Any = None

    @property
    def ray(self) -> Any:
        return import_ray()

    def _actor(self) -> Any:
        if self._actor_class is None:
            self._actor_class = self.ray.remote(ReplicaActor)
        return self._actor_class

    async def launch(self, name: str) -> RayReplica:
        ray, config = self.ray, self.config
        unplaceable = _unplaceable(ray, config.needs())
        if unplaceable:
            logger.warning("%s: %s; waiting up to %.0f s for a Ray autoscaler to add one",
                           name, unplaceable, config.placement_timeout)
        try:
            actor = self._actor().options(
                name=f"{config.deployment}/{name}", namespace=NAMESPACE,
                num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                resources=dict(config.resources), max_restarts=0,
                # Ray starts its workers at niceness 15 (background work); the replica's
                # server is its child and would inherit it, losing the CPU to the router
                # and everything else on a busy node (0.66x the local replicas' requests/s
                # measured here).
                runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
            ).remote(name, config)
        except ValueError as exc:  # the name is taken
            raise LaunchError(f"its Ray actor could not be created ({_first_line(exc)}): "
                              "another deployment may use the name "
                              f"{config.deployment!r}; give --ray-deployment another") from exc
        # Not asyncio.wait_for: it waits for the cancelled await to end, and an ObjectRef of
        # an actor Ray has not placed ignores cancellation.
        started = asyncio.ensure_future(_await_ref(actor.start.remote()))
        done, _ = await asyncio.wait({started}, timeout=config.placement_timeout)
        if not done:
            started.cancel()
            _kill(ray, actor)
            raise LaunchError(unplaceable or _busy(ray, config.needs(),
                                                   config.placement_timeout))
        try:
            info = started.result()
        except Exception as exc:  # RayActorError, RayTaskError: it died or failed to start
            _kill(ray, actor)
            raise LaunchError(f"its Ray actor failed: {_first_line(exc)}") from exc
        logger.info("%s runs on Ray node %s (%s) at %s", name, info["node_id"][:12],
                    info["node_ip"], info["url"])
        return RayReplica(ray, actor, info, config.liveness_seconds)

    async def aclose(self) -> None:
        """Nothing outlives the replicas here (each actor was killed when it stopped)."""


class RayReplica:
    """One replica in its actor (a ``LaunchedReplica``)."""

    def __init__(self, ray: Any, actor: Any, info: dict[str, Any],
                 liveness_seconds: float) -> None:
        self.ray = ray
        self.actor = actor
        self.url: str = info["url"]
        self.pid: int | None = info["pid"]
        self.facts = {"node_id": info["node_id"], "node_ip": info["node_ip"]}
        self.liveness_seconds = liveness_seconds
        self._stopping = False
        self._tail = ""
        host, _, port = self.url.rpartition("//")[2].rpartition(":")
        self._address = (host.strip("[]"), int(port))

    async def wait(self) -> str:
        ended = asyncio.ensure_future(self._actor_ended())
        silent = asyncio.ensure_future(self._server_gone())
        try:
            done, _ = await asyncio.wait({ended, silent}, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for task in (ended, silent):
                task.cancel()
            self.kill()  # its actor, if it still lives

    async def _actor_ended(self) -> str:
        try:
            how = await _await_ref(self.actor.wait.remote())
        except Exception as exc:  # RayActorError: the actor (or its node) died
            return f"its Ray actor died ({_first_line(exc)})"
        with contextlib.suppress(Exception):
            self._tail = await asyncio.wait_for(_await_ref(self.actor.last_output.remote()),
                                                _STOP_GRACE_SECONDS)
        return how

    async def _server_gone(self) -> str:
        """Returns once the server, after accepting connections, has refused them for
        ``liveness_seconds`` (never while it is being stopped on purpose)."""
        accepted_once = False
        failing_since: float | None = None
        while True:
            await asyncio.sleep(LIVENESS_POLL_SECONDS)  # a cheap TCP connect, 4 times a second
            ok = await _accepts(self._address)
            now = time.monotonic()
            if ok or self._stopping:
                accepted_once = accepted_once or ok
                failing_since = None
                continue
            if not accepted_once:
                continue  # still starting
            failing_since = failing_since or now
            if now - failing_since >= self.liveness_seconds:
                return (f"its server at {self.url} refused connections for "
                        f"{self.liveness_seconds:g} s (its node was lost?)")

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_await_ref(self.actor.stop.remote(timeout)),
                                   timeout + _STOP_GRACE_SECONDS)
        self.kill()

    def kill(self) -> None:
        _kill(self.ray, self.actor)

    def last_output(self) -> str:
        return self._tail


# -- surge route --backend ray: a router in front of another one's replicas -------------------


class RayDiscovery:
    """A replica backend that starts nothing: it follows the actors of a deployment that
    another process (``surge serve --backend ray``) runs, adding each once its server answers
    and removing it when its actor is gone. ``scale_to`` is not its to do."""

    def __init__(self, deployment: str, breaker: BreakerConfig | None = None,
                 interval: float = 1.0) -> None:
        self.deployment = deployment
        self.breaker = breaker or BreakerConfig()
        self.interval = interval
        self._known: dict[str, Replica] = {}

    @property
    def count(self) -> int:
        return len(self._known)

    def scale_to(self, target: int) -> None:
        logger.warning("surge route --backend ray does not scale %s: its owner does",
                       self.deployment)

    def status(self) -> list[dict[str, object]]:
        return [{"name": name, "deployment": self.deployment, **replica.info}
                for name, replica in self._known.items()]

    @contextlib.asynccontextmanager
    async def running(self, host: BackendHost, initial: int) -> AsyncIterator[RayDiscovery]:
        task = asyncio.ensure_future(self._follow(host))
        task.set_name("surge-ray-discovery")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, host: BackendHost) -> None:
        ray = import_ray()
        prefix = f"{self.deployment}/"
        while True:
            try:
                names = {entry["name"] for entry in await asyncio.to_thread(
                    ray.util.list_named_actors, True) if entry["namespace"] == NAMESPACE
                    and entry["name"].startswith(prefix)}
                await self._sync(ray, host, names)
                host.replicas.problem = None if self._known else (
                    f"no replica of Ray deployment {self.deployment!r} runs (yet)")
            except Exception as exc:  # a Ray hiccup: keep what we know, try again
                logger.warning("could not list the Ray deployment %s: %s", self.deployment,
                               _first_line(exc))
            await asyncio.sleep(self.interval)  # Ray has no watch API for named actors

    async def _sync(self, ray: Any, host: BackendHost, names: set[str]) -> None:
        for name in set(self._known) - names:
            replica = self._known.pop(name)
            host.replicas.remove(replica)
            host.metrics.forget(replica)
            logger.info("replica %s left", name)
        for name in names - set(self._known):
            with contextlib.suppress(Exception):  # not started yet, or just died
                actor = ray.get_actor(name, namespace=NAMESPACE)
                info = await asyncio.wait_for(_await_ref(actor.info.remote()), 2.0)
                replica = Replica(info["url"], name.removeprefix(f"{self.deployment}/"),
                                  breaker_config=self.breaker,
                                  info={"pid": info["pid"], "node_id": info["node_id"],
                                        "node_ip": info["node_ip"]})
                self._known[name] = replica
                host.replicas.add(replica)
                logger.info("replica %s joined at %s", name, info["url"])


# -- helpers ---------------------------------------------------------------------------------


async def _await_ref(ref: Any) -> Any:
    return await ref


async def _accepts(address: tuple[str, int]) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _kill(ray: Any, actor: Any) -> None:
    with contextlib.suppress(Exception):  # already dead
        ray.kill(actor, no_restart=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _alive_nodes(ray: Any) -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _describe_nodes(ray: Any) -> str:
    return "; ".join(f"{node['NodeManagerAddress']} {_fmt(node['Resources'])}"
                     for node in _alive_nodes(ray)) or "none"


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items()
             if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _unplaceable(ray: Any, needs: dict[str, float]) -> str | None:
    """Why no node of the cluster, even idle, could take one replica; None if one could."""
    with contextlib.suppress(Exception):
        nodes = _alive_nodes(ray)
        if any(all(node["Resources"].get(k, 0.0) >= v for k, v in needs.items())
               for node in nodes):
            return None
        return (f"no Ray node has the resources one replica needs, {_fmt(needs)} (nodes: "
                f"{_describe_nodes(ray)})")
    return None


def _busy(ray: Any, needs: dict[str, float], waited: float) -> str:
    try:
        free = _fmt(ray.available_resources())
    except Exception:  # the cluster went away
        free = "unknown"
    return (f"Ray did not place it within {waited:g} s: no node has {_fmt(needs)} free now "
            f"(free in the cluster: {free})")

