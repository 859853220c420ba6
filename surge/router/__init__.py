"""The router: load balancing over replicas, failover, health checks and autoscaling.

``surge route`` fronts running servers; ``surge serve --replicas N`` starts local replicas
behind it. ``build_router`` gives the ASGI app for embedding (with a fallback app, e.g. a web
UI, for the paths it does not forward). Replicas the router should start and stop come from a
``ReplicaBackend`` in a ``ReplicaPlan``: local processes (``surge.router.local``), or any
``ReplicaLauncher`` under ``ManagedReplicas``.
"""

from surge.router.app import RouterApp, RouterSettings, build_router, run_router
from surge.router.backend import BackendHost, ReplicaBackend, ReplicaPlan
from surge.router.policies import POLICIES, RequestFacts, make_policy
from surge.router.replicas import BreakerConfig, Replica, ReplicaSet
from surge.router.supervisor import (
    LaunchedReplica,
    ManagedReplicas,
    ReplicaLauncher,
    SupervisorConfig,
)

__all__ = [
    "POLICIES",
    "BackendHost",
    "BreakerConfig",
    "LaunchedReplica",
    "ManagedReplicas",
    "Replica",
    "ReplicaBackend",
    "ReplicaLauncher",
    "ReplicaPlan",
    "ReplicaSet",
    "RequestFacts",
    "RouterApp",
    "RouterSettings",
    "SupervisorConfig",
    "build_router",
    "make_policy",
    "run_router",
]
