"""How the Ray Serve deployment scales: the names of its deployments and `RayConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..runtime.errors import InputError

MODEL = "FlashFaceModel"
INGRESS = "FlashFaceIngress"
LOWER_BOUNDS = (  # (field, bound, whether the bound itself is refused)
    ("identities_per_replica", 1, False),
    ("ingress_replicas", 1, False),
    ("target_ongoing_requests", 0, True),
    ("health_check_period_s", 0, True),
    ("num_gpus", 0, False),
    ("num_cpus", 0, False),
)


@dataclass(frozen=True)
class RayConfig:
    """How the deployment scales (the `serve run` config file carries the same fields).

    min_replicas/max_replicas: model replicas (equal: a fixed count; else autoscaling on
    `target_ongoing_requests` per replica); num_gpus/num_cpus: resources of one model replica
    (`serve --gpus-per-replica auto`: 1 where its backend runs on a GPU, else 0);
    identities_per_replica: identities a replica keeps loaded (LRU); ingress_replicas: HTTP replicas;
    app_name, route_prefix: the Serve application;
    health_check_period_s: how often Serve checks each model replica, so how soon a dead one is
    replaced (not a `serve` option: the tests shorten it).
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    identities_per_replica: int = 16
    ingress_replicas: int = 1
    app_name: str = "flashface"
    route_prefix: str = "/"
    health_check_period_s: float = 5.0

    def validated(self) -> RayConfig:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InputError(
                f"replicas need 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})", "min_replicas"
            )
        for name, low, strict in LOWER_BOUNDS:
            value = getattr(self, name)
            if not (value > low if strict else value >= low):
                raise InputError(f"{name}={value} must be {'>' if strict else '>='} {low}", name)
        return self

    def deployment_options(self, max_queue: int) -> dict[str, Any]:
        """Ray Serve options of the model deployment."""
        scaling: dict[str, Any]
        if self.min_replicas == self.max_replicas:
            scaling = {"num_replicas": self.min_replicas}
        else:
            scaling = {
                "autoscaling_config": {
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                    "target_ongoing_requests": self.target_ongoing_requests,
                }
            }
        return {
            **scaling,
            # our own priority queue holds the work: let requests reach it instead of Ray's router queue
            "max_ongoing_requests": max_queue + 4,
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "health_check_period_s": self.health_check_period_s,
        }
