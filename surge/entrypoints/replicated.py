"""`surge serve --replicas N`: N local `surge serve` processes behind the router.

This is where the router meets the server: the router knows neither `surge serve` nor the web
apps, so this module gives it what it needs. The local replica backend gets the command of
each replica (`surge serve` with every flag the user gave except the router's and
--host/--port, the model resolved and the thread count set); the web apps, unless turned off,
run once, as the router's fallback app (their chat goes through the router, one session per
replica), and the replicas run without them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from surge.router.cli import (
    add_replica_args,
    autoscale_config,
    breaker_config,
    ray_resources,
    route_policy,
    router_settings,
    scale_to_zero,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from surge.router.backend import ReplicaBackend
    from surge.server.app import ServerSettings

__all__ = ["replica_serve_args", "replica_threads", "run_replicated"]

logger = logging.getLogger("surge.route")

# Each replica: this Python, running `surge serve`.
SERVE_COMMAND = (sys.executable, "-m", "surge.cli", "serve")


def run_replicated(args: argparse.Namespace, model_dir: str, settings: ServerSettings) -> int:
    """`surge serve` with several replicas: ``model_dir`` is resolved (the demo model is written
    once, here) and ``settings`` validated by the caller."""
    from surge.router.app import build_router, run_router
    from surge.router.backend import ReplicaPlan
    from surge.router.replicas import ReplicaSet

    autoscale = autoscale_config(args)
    threads = replica_threads(args, autoscale.max_replicas)
    serve_args = replica_serve_args(args, model_dir, settings.model_names, threads)
    if args.standby_replicas < 0:
        raise ValueError(f"--standby-replicas {args.standby_replicas} is invalid: allowed is "
                         "an integer >= 0")
    _pass_api_keys_by_environment(settings.api_keys)
    backend = _tiered_backend(args, serve_args, autoscale.enabled) if args.fast_replicas \
        else _replica_backend(args, serve_args)
    ui = _web_apps(args, settings)
    app = build_router(ReplicaSet(), route_policy(args),
                       router_settings(args, args.max_body_bytes), ui,
                       ReplicaPlan(backend, args.replicas + args.fast_replicas, autoscale,
                                   scale_to_zero(args)))
    if args.fast_replicas:
        from surge.router.tiers import TiersConfig

        app.use_tiers(TiersConfig(critical_below=args.critical_priority_below))
    if settings.otlp_endpoint:  # the router's span is the parent of each replica's
        from surge.http.tracing import Tracing

        app.proxy.tracing = Tracing(settings.otlp_endpoint, "surge-router")
    logger.info("starting %d replica(s) of %s (%s, %d torch thread(s) each)%s", args.replicas,
                model_dir, args.replica_backend, threads, f", autoscaling "
                f"{autoscale.min_replicas}..{autoscale.max_replicas}" if autoscale.enabled
                else "")
    if getattr(args, "tenants_file", None):  # each replica reloads its tenants file
        app.services.add(_forwarding_sighup)
    return run_router(app, args.host, args.port, drain_timeout=args.drain_timeout,
                      log_level=args.log_level, access_log=args.access_log,
                      on_started=_tell_apps_the_address(ui))


@contextlib.asynccontextmanager
async def _forwarding_sighup() -> AsyncIterator[None]:
    """SIGHUP to the router reaches its replica processes (they reload --tenants); the router
    itself does not die of it."""
    loop = asyncio.get_running_loop()

    def forward() -> None:
        children = _child_pids()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        logger.info("SIGHUP: forwarded to %d replica process(es)", len(children))

    loop.add_signal_handler(signal.SIGHUP, forward)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


def _child_pids() -> list[int]:
    """This process's children (the local replicas), from /proc (Linux, as replicas are)."""
    me, children = str(os.getpid()), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The fields after the command's closing parenthesis: state, then the parent pid.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[1] == me:
            children.append(int(entry.name))
    return children


def _tiered_backend(args: argparse.Namespace, serve_args: list[str],
                    autoscaled: bool) -> ReplicaBackend:
    """--replicas N full-precision replicas and --fast-replicas M quantized ones, each
    group in its tier."""
    from surge.router.tiers import TieredReplicas

    if args.fast_replicas < 0 or autoscaled:
        raise ValueError(f"--fast-replicas {args.fast_replicas} is invalid here: allowed is "
                         "an integer >= 0, without --min-replicas/--max-replicas (tiered "
                         "groups keep their sizes)")
    fast_args = [*_without_flag(serve_args, "--quantization"), "--quantization",
                 args.fast_quantization]
    return TieredReplicas({
        "full": (_replica_backend(args, serve_args, "full"), args.replicas),
        "fast": (_replica_backend(args, fast_args, "fast"), args.fast_replicas)})


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        else:
            out.append(item)
    return out


def _replica_backend(args: argparse.Namespace, serve_args: list[str],
                     tier: str | None = None) -> ReplicaBackend:
    """Local processes, or Ray actors (joining the cluster now, so a bad address fails
    before the router listens); ``tier`` names the group (tiers.py)."""
    from surge.router.supervisor import ManagedReplicas, SupervisorConfig

    supervision = SupervisorConfig(standby=args.standby_replicas,
                                   drain_timeout=args.drain_timeout, breaker=breaker_config(args),
                                   name_prefix=tier or "replica", tier=tier)
    if args.replica_backend == "ray":
        from surge.entrypoints.serve import API_KEY_ENV
        from surge.router.ray_backend import (
            PYTHON,
            RayReplicaConfig,
            connect_ray,
            ray_replicas,
        )

        config = RayReplicaConfig(
            (PYTHON, *SERVE_COMMAND[1:]), serve_args, num_cpus=args.replica_cpus,
            num_gpus=args.replica_gpus, resources=ray_resources(args.replica_resources),
            env={API_KEY_ENV: os.environ[API_KEY_ENV]} if API_KEY_ENV in os.environ else {},
            placement_timeout=args.ray_placement_timeout, deployment=args.ray_deployment,
            supervision=supervision)
        connect_ray(args.ray_address)
        return ray_replicas(config)
    from surge.router.local import LocalProcessLauncher, LocalReplicaConfig

    return ManagedReplicas(LocalProcessLauncher(LocalReplicaConfig(
        serve_args, command=SERVE_COMMAND)), supervision)


def _pass_api_keys_by_environment(api_keys: list[str]) -> None:
    """Replicas inherit the keys in $SURGE_API_KEY (one per line), never on their command
    line, where ``ps`` shows them to every user of the machine."""
    from surge.entrypoints.serve import API_KEY_ENV

    if api_keys:
        os.environ[API_KEY_ENV] = "\n".join(api_keys)


def _web_apps(args: argparse.Namespace, settings: ServerSettings) -> ASGIApp | None:
    if not getattr(args, "apps", False):
        return None
    from fastapi import FastAPI

    from surge.apps import apps_settings_from_args, mount_apps

    ui = FastAPI(title="Surge apps")
    mount_apps(ui, apps_settings_from_args(args, settings.api_keys))
    return ui


def _tell_apps_the_address(ui: ASGIApp | None) -> Callable[[str, int], None] | None:
    """The apps send their model requests to the address the server listens on: here, the
    router's."""
    if ui is None:
        return None

    def tell(host: str, port: int) -> None:
        ui.state.listen_address = (host, port)  # type: ignore[attr-defined]

    return tell


def replica_serve_args(args: argparse.Namespace, model_dir: str, model_names: list[str],
                       num_threads: int) -> list[str]:
    """The `surge serve` flags of each replica: every flag the user gave except the router's,
    --host/--port and --api-key (passed by environment), with the model resolved and the
    thread count set."""
    from surge.entrypoints.serve import add_serve_args

    parser = argparse.ArgumentParser(add_help=False)
    add_serve_args(parser)
    skip = _router_dests() | _apps_dests() | {"host", "port", "model", "served_model_name",
                                              "num_threads", "api_keys"}
    argv = ["--model", model_dir, "--served-model-name", *model_names,
            "--num-threads", str(num_threads), "--no-apps"]  # the web apps run on the router
    for action in parser._actions:
        if action.dest in skip or not action.option_strings:
            continue
        argv += _flag(action, getattr(args, action.dest, action.default))
    return argv


def _flag(action: argparse.Action, value: object) -> list[str]:
    if value == action.default or value is None:
        return []
    option = action.option_strings[0]
    if action.nargs == 0:  # store_true / store_false / store_const
        return [option]
    if isinstance(action, argparse._AppendAction):
        return [item for v in value for item in (option, str(v))]  # type: ignore[attr-defined]
    if isinstance(value, list):
        return [option, *map(str, value)]
    return [option, str(value)]


def _apps_dests() -> set[str]:
    from surge.apps.config import add_apps_args

    return _dests(add_apps_args)


def _router_dests() -> set[str]:
    return _dests(add_replica_args)


def _dests(add_args: Callable[[argparse.ArgumentParser], None]) -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_args(parser)
    return {action.dest for action in parser._actions}


def replica_threads(args: argparse.Namespace, max_replicas: int) -> int:
    """The user's --num-threads, else a share of the cores, so replicas do not fight (on
    Ray: the CPUs reserved for each replica)."""
    from surge.router.local import threads_per_replica

    if args.num_threads:
        return int(args.num_threads)
    if args.replica_backend == "ray":
        return max(1, int(args.replica_cpus))
    return threads_per_replica(max_replicas)
