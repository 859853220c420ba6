"""Command-line entry points of the router.

- ``surge route --backend URL [--backend URL ...] --policy P`` fronts servers that already run
  (Surge or any OpenAI-compatible one).
- ``surge serve --replicas N`` (or ``--max-replicas M`` for autoscaling) starts local
  ``surge serve`` replicas, each with the same model and engine flags on its own loopback
  port, and the router on the public ``--host/--port``.

The router's flags are one argument group, shared by both commands; ``surge serve`` adds it
with ``add_replica_args`` and, when ``wants_router``, hands over to
``surge.entrypoints.replicated`` (which knows how to start a replica; the router does not).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from surge.router.policies import POLICIES, Policy, make_policy

if TYPE_CHECKING:
    from surge.router.app import RouterApp, RouterSettings
    from surge.router.autoscale import AutoscaleConfig
    from surge.router.coldstart import ScaleToZeroConfig
    from surge.router.replicas import BreakerConfig

__all__ = ["add_replica_args", "add_route_parser", "autoscale_config", "breaker_config",
           "ray_resources", "route_policy", "router_settings", "run_route", "scale_to_zero",
           "wants_router"]

DEFAULT_POLICY = "least_outstanding"


def _add_router_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                       help=f"load-balancing policy (default {DEFAULT_POLICY}: the less busy "
                            "of two random replicas)")
    group.add_argument("--route-by-tenant", action="store_true",
                       help="consistent_hash keys on the tenant (--tenant-header, else the "
                            "body's user); least_outstanding spreads each tenant over the "
                            "replicas")
    group.add_argument("--max-attempts", type=int, default=3,
                       help="attempts per request, on different replicas, while nothing was "
                            "sent to the client yet (default 3; 1 disables retries)")
    group.add_argument("--retry-budget", type=float, default=0.2,
                       help="retries allowed as a fraction of requests over 10 s, plus 2/s "
                            "(default 0.2)")
    group.add_argument("--on-429", choices=("retry", "return"), default="retry",
                       help="a replica's 429: try another replica (default) or return it")
    group.add_argument("--eject-after", type=int, default=3,
                       help="consecutive 5xx/connection failures that eject a replica "
                            "(default 3)")
    group.add_argument("--eject-seconds", type=float, default=5.0,
                       help="first ejection time; doubles on each ejection in a row, up to "
                            "60 s (default 5)")
    group.add_argument("--max-inflight-per-replica", type=int, default=None,
                       help="requests a replica may have at once; past it on all: 429 "
                            "(default: no cap)")
    group.add_argument("--health-path", default="/health",
                       help="active health check path, or 'none' (default /health)")
    group.add_argument("--health-interval", type=float, default=1.0,
                       help="seconds between active health checks (default 1)")
    group.add_argument("--health-fail-threshold", type=int, default=2,
                       help="failed checks in a row that mark a replica unhealthy (default 2)")
    group.add_argument("--health-success-threshold", type=int, default=2,
                       help="good checks in a row that mark it healthy again (default 2)")
    group.add_argument("--upstream-read-timeout", type=float, default=600.0,
                       help="longest silence from a replica before the attempt fails "
                            "(default 600 s; 0: no limit)")


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """The `surge serve` flags for replicas and the router in front of them."""
    group = parser.add_argument_group(
        "replicas and router", "with --replicas N > 1 (or --max-replicas > 1), N local "
        "replicas on loopback ports behind a router on --host/--port")
    group.add_argument("--replicas", type=int, default=1,
                       help="replicas to start (default 1: no router)")
    group.add_argument("--standby-replicas", type=int, default=0,
                       help="replicas started and kept ready but idle, so a dead replica is "
                            "replaced (or a scale-up served) at once; each costs a replica's "
                            "memory (default 0)")
    group.add_argument("--min-replicas", type=int, default=None,
                       help="autoscaling floor (default: --replicas)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling ceiling; above --min-replicas turns autoscaling on "
                            "(default: --replicas)")
    group.add_argument("--target-inflight-per-replica", type=float, default=8.0,
                       help="autoscaling target: requests in flight per replica (default 8)")
    group.add_argument("--scale-up-delay", type=float, default=5.0,
                       help="seconds the load must ask for more replicas first (default 5)")
    group.add_argument("--scale-down-delay", type=float, default=30.0,
                       help="seconds the load must ask for fewer replicas first (default 30)")
    _add_scale_to_zero_options(group)
    group.add_argument("--fast-replicas", type=int, default=0,
                       help="replicas of a fast tier (the model quantized with "
                            "--fast-quantization) beside the --replicas full-precision ones: "
                            "requests marked critical (X-Surge-Priority: critical) go to full, "
                            "the rest to fast, spilling over when a tier is saturated "
                            "(default 0: no tiers)")
    group.add_argument("--fast-quantization", default="int8", choices=("int8", "int4"),
                       help="the fast tier's weights (default int8)")
    group.add_argument("--critical-priority-below", type=int, default=None,
                       help="with --fast-replicas: a request whose body priority is below "
                            "this is critical too")
    _add_router_options(group)
    _add_ray_options(parser.add_argument_group(
        "replicas on a Ray cluster", 'with --backend ray (pip install "surge[ray]"): each '
        "replica is a Ray actor on a node that has its resources, serving on that node's "
        "address"))


def _add_scale_to_zero_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--idle-timeout", type=float, default=300.0,
                       help="with --min-replicas 0: seconds without requests after which "
                            "every replica is stopped (default 300)")
    group.add_argument("--hold-timeout", type=float, default=60.0,
                       help="with --min-replicas 0: how long a request waits for the first "
                            "replica to start before a 503 with Retry-After (default 60)")
    group.add_argument("--max-held-requests", type=int, default=1000,
                       help="with --min-replicas 0: requests held while a replica starts; "
                            "past it, 503 with Retry-After (default 1000)")


def _add_ray_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--backend", dest="replica_backend", choices=("local", "ray"),
                       default="local",
                       help="where replicas run: local processes (default) or Ray actors")
    group.add_argument("--ray-address", default=None,
                       help="the Ray cluster's head (host:port, 'auto', ray://host:port); "
                            "default: start a local Ray")
    group.add_argument("--replica-cpus", type=float, default=1.0,
                       help="CPUs Ray reserves for each replica (default 1)")
    group.add_argument("--replica-gpus", type=float, default=0.0,
                       help="GPUs Ray reserves for each replica (default 0)")
    group.add_argument("--replica-resources", action="append", default=[],
                       metavar="NAME=AMOUNT",
                       help="a Ray custom resource each replica needs (repeat for several), "
                            "e.g. --replica-resources big_memory=1")
    group.add_argument("--ray-placement-timeout", type=float, default=120.0,
                       help="seconds a replica's actor may take to be placed on a Ray node "
                            "with its resources (a Ray autoscaler may add one) and started, "
                            "before it counts as failed (default 120)")
    group.add_argument("--ray-deployment", default="surge",
                       help="name of this set of replicas in Ray (actors "
                            "<deployment>/replica-N in namespace surge; default surge)")


def ray_resources(items: list[str]) -> dict[str, float]:
    """``--replica-resources NAME=AMOUNT`` flags as a dict."""
    resources: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0 or name in ("CPU", "GPU"):
            raise ValueError(f"--replica-resources {item!r} is invalid: allowed is NAME=AMOUNT "
                             "with an amount > 0 (CPUs and GPUs have --replica-cpus and "
                             "--replica-gpus)")
        resources[name] = value
    return resources


def add_route_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "route", help="load-balance existing OpenAI-compatible servers (failover, health)",
        description="A router in front of running servers: "
                    "surge route --backend http://10.0.0.1:8000 --backend http://10.0.0.2:8000")
    p.add_argument("--backend", action="append", required=True, metavar="URL",
                   help="a server's base URL (repeat for each), or 'ray': the replicas of "
                        "a Ray deployment that `surge serve --backend ray` runs")
    p.add_argument("--ray-address", default="auto",
                   help="with --backend ray: the Ray cluster's head (default auto)")
    p.add_argument("--ray-deployment", default="surge",
                   help="with --backend ray: the deployment to front (default surge)")
    p.add_argument("--weights", default=None,
                   help="comma-separated weights, one per --backend, for --policy weighted")
    p.add_argument("--tiers", default=None,
                   help="comma-separated tiers (full or fast), one per --backend: requests "
                        "marked critical go to full replicas, the rest to fast ones, each "
                        "spilling over to the other tier when theirs is saturated")
    p.add_argument("--critical-priority-below", type=int, default=None,
                   help="with --tiers: a request whose body priority is below this is "
                        "critical (besides the header X-Surge-Priority: critical)")
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on")
    http.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged)")
    http.add_argument("--drain-timeout", type=float, default=30.0,
                      help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
    http.add_argument("--max-body-bytes", type=int, default=32 << 20,
                      help="largest request body accepted, else 413 (default 32 MiB)")
    http.add_argument("--log-level", default="info",
                      choices=("critical", "error", "warning", "info", "debug"))
    http.add_argument("--access-log", action="store_true", help="log every HTTP request")
    http.add_argument("--otlp-endpoint", type=_otlp_endpoint, default=None, metavar="URL",
                      help="export a span per request over OTLP/HTTP to this collector and "
                           "send its traceparent to the backend (Surge replicas started with "
                           "the same flag continue the trace); off by default")
    routing = p.add_argument_group("routing")
    _add_router_options(routing)
    routing.add_argument("--tenant-header", default=None, metavar="NAME",
                         help="header naming the tenant, for --route-by-tenant (forwarded to "
                              "the backends like every end-to-end header)")
    p.set_defaults(handler=run_route)


# -- surge route ---------------------------------------------------------------------------------


def run_route(args: argparse.Namespace) -> int:
    from surge.http.logs import configure_logging
    from surge.router.app import build_router, run_router
    from surge.router.replicas import Replica, ReplicaSet

    configure_logging(args.log_level)
    settings = router_settings(args, args.max_body_bytes)
    breaker = breaker_config(args)
    if "ray" in args.backend:
        app = _ray_discovery_router(args, settings, breaker)
    else:
        weights = _weights(args.weights, len(args.backend), args.policy)
        tiers = _tiers(args.tiers, len(args.backend))
        replicas = ReplicaSet([Replica(url, name, weight, breaker_config=breaker, tier=tier)
                               for url, name, weight, tier in zip(
                                   _check_urls(args.backend), _names(args.backend), weights,
                                   tiers, strict=True)])
        app = build_router(replicas, route_policy(args), settings)
        if args.tiers is not None:
            from surge.router.tiers import TiersConfig

            app.use_tiers(TiersConfig(critical_below=args.critical_priority_below))
        elif args.critical_priority_below is not None:
            raise ValueError("--critical-priority-below only applies with --tiers")
    if args.otlp_endpoint:
        from surge.http.tracing import Tracing

        app.proxy.tracing = Tracing(args.otlp_endpoint, "surge-router")
    return run_router(app, args.host, args.port, drain_timeout=args.drain_timeout,
                      log_level=args.log_level, access_log=args.access_log)


def _otlp_endpoint(text: str) -> str:
    from surge.http.observe import traces_url

    try:
        traces_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ray_discovery_router(args: argparse.Namespace, settings: RouterSettings,
                          breaker: BreakerConfig) -> RouterApp:
    """The router in front of the replicas of a Ray deployment another process runs."""
    from surge.router.app import build_router
    from surge.router.backend import ReplicaPlan
    from surge.router.ray_backend import RayDiscovery, connect_ray
    from surge.router.replicas import ReplicaSet

    if args.backend != ["ray"] or args.weights:
        raise ValueError("--backend ray is invalid with other --backend URLs or --weights: "
                         "allowed is --backend ray alone")
    connect_ray(args.ray_address, log_to_driver=False)
    plan = ReplicaPlan(RayDiscovery(args.ray_deployment, breaker), 0)
    return build_router(ReplicaSet(), route_policy(args), settings, plan=plan)


def route_policy(args: argparse.Namespace) -> Policy:
    """The --policy, by tenant with --route-by-tenant."""
    return make_policy(args.policy, by_tenant=getattr(args, "route_by_tenant", False),
                       tenant_header=getattr(args, "tenant_header", None))


def _check_urls(urls: list[str]) -> list[str]:
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--backend {url!r} is invalid: allowed is a base URL such as "
                             "http://127.0.0.1:8001")
        if parts.path not in ("", "/"):
            raise ValueError(f"--backend {url!r} has a path: give the server's base URL (the "
                             "router forwards /v1/... as the client sent it)")
    return urls


def _names(urls: list[str]) -> list[str]:
    names: list[str] = []
    for url in urls:
        base = urlsplit(url).netloc
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def _tiers(text: str | None, count: int) -> list[str | None]:
    if text is None:
        return [None] * count
    from surge.router.tiers import TIERS

    tiers = [t.strip() for t in text.split(",")]
    if len(tiers) != count or not set(tiers) <= set(TIERS):
        raise ValueError(f"--tiers {text!r} is invalid: allowed is {count} of "
                         f"{' or '.join(TIERS)} separated by commas, one per --backend, e.g. "
                         "full,fast")
    return list(tiers)


def _weights(text: str | None, count: int, policy: str) -> list[float]:
    if text is None:
        return [1.0] * count
    if policy != "weighted":
        raise ValueError(f"--weights only applies to --policy weighted (got --policy {policy})")
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != count or not all(w > 0 for w in weights):
        raise ValueError(f"--weights {text!r} is invalid: allowed is {count} positive numbers "
                         "separated by commas, one per --backend, e.g. 3,1")
    return weights


# -- surge serve --replicas N --------------------------------------------------------------------


def wants_router(args: argparse.Namespace) -> bool:
    if args.replicas < 1 and args.min_replicas != 0:
        raise ValueError(f"--replicas {args.replicas} is invalid: allowed is an integer >= 1 "
                         "(0 only with --min-replicas 0)")
    return (args.replicas > 1 or (args.max_replicas or 0) > 1 or args.min_replicas == 0
            or args.replica_backend != "local" or args.fast_replicas != 0)


# -- shared ------------------------------------------------------------------------------------


def router_settings(args: argparse.Namespace, max_body_bytes: int) -> RouterSettings:
    from surge.router.app import RouterSettings
    from surge.router.health import HealthConfig
    from surge.router.proxy import ProxyConfig
    from surge.router.retry import RetryConfig

    path = None if args.health_path.lower() == "none" else args.health_path
    return RouterSettings(
        retry=RetryConfig(max_attempts=args.max_attempts, budget_ratio=args.retry_budget,
                          retry_429=args.on_429 == "retry"),
        proxy=ProxyConfig(max_body_bytes=max_body_bytes,
                          read_timeout=args.upstream_read_timeout or None),
        health=HealthConfig(path=path, interval=args.health_interval,
                            fail_threshold=args.health_fail_threshold,
                            success_threshold=args.health_success_threshold))


def breaker_config(args: argparse.Namespace) -> BreakerConfig:
    from surge.router.replicas import BreakerConfig

    return BreakerConfig(eject_after=args.eject_after, eject_seconds=args.eject_seconds,
                         max_eject_seconds=max(60.0, args.eject_seconds),
                         max_in_flight=args.max_inflight_per_replica)


def autoscale_config(args: argparse.Namespace) -> AutoscaleConfig:
    from surge.router.autoscale import AutoscaleConfig

    low = args.min_replicas if args.min_replicas is not None else args.replicas
    high = args.max_replicas if args.max_replicas is not None else max(args.replicas, 1)
    if not 0 <= low <= args.replicas <= high or high < 1:
        raise ValueError(f"--replicas {args.replicas} is invalid: allowed is between "
                         f"--min-replicas ({low}, at least 0) and --max-replicas ({high}, at "
                         "least 1)")
    if args.idle_timeout <= 0:
        raise ValueError(f"--idle-timeout {args.idle_timeout} is invalid: allowed is seconds "
                         "> 0")
    return AutoscaleConfig(min_replicas=low, max_replicas=high,
                           target_in_flight=args.target_inflight_per_replica,
                           scale_up_delay=args.scale_up_delay,
                           scale_down_delay=args.scale_down_delay,
                           idle_timeout=args.idle_timeout)


def scale_to_zero(args: argparse.Namespace) -> ScaleToZeroConfig | None:
    """How requests are held while the first replica starts, with --min-replicas 0."""
    from surge.router.coldstart import ScaleToZeroConfig

    if args.min_replicas != 0:
        return None
    if args.hold_timeout <= 0:
        raise ValueError(f"--hold-timeout {args.hold_timeout} is invalid: allowed is seconds > 0")
    if args.max_held_requests < 1:
        raise ValueError(f"--max-held-requests {args.max_held_requests} is invalid: allowed "
                         "is an integer >= 1")
    return ScaleToZeroConfig(hold_timeout=args.hold_timeout, max_held=args.max_held_requests)
