"""The router: load balancing over replicas, failover, health checks and autoscaling.

``surge route`` fronts running servers; ``surge serve --replicas N`` starts local replicas
behind it. ``build_router`` gives the ASGI app for embedding (with a fallback app, e.g. a web
UI, for the paths it does not forward).
"""

from surge.router.app import RouterApp, RouterSettings, build_router, run_router
from surge.router.policies import POLICIES, RequestFacts, make_policy
from surge.router.replicas import BreakerConfig, Replica, ReplicaSet

__all__ = [
    "POLICIES",
    "BreakerConfig",
    "Replica",
    "ReplicaSet",
    "RequestFacts",
    "RouterApp",
    "RouterSettings",
    "build_router",
    "make_policy",
    "run_router",
]
