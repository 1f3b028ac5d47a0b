"""Serve's autoscaling settings of one deployment, as accepted config.

``DeploymentOptions`` (``serve.config``) takes these fields, so ``infer.downscale_delay_s=30``
works in ``build_app`` arguments and serve config YAMLs; they apply when the deployment's
``resources.min_actors < max_actors`` (otherwise the replica count is fixed). Defaults are
Ray Serve 2.60's.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.config import StrictModel


class AutoscalingKnobs(StrictModel):
    """Ray Serve's ``autoscaling_config`` fields other than the replica bounds."""

    target_ongoing_requests: float = Field(2.0, gt=0, description="autoscaling target per "
                                           "replica (requests running and queued)")
    upscale_delay_s: float = Field(30.0, ge=0, description="how long the load must stay above "
                                   "the target before a replica is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="how long the load must stay "
                                     "below the target before a replica is removed")
    look_back_period_s: float = Field(30.0, gt=0, description="window the load is averaged over")
    upscaling_factor: float | None = Field(None, gt=0, description="gain of upscaling "
                                           "decisions (None: 1)")
    downscaling_factor: float | None = Field(None, gt=0, description="gain of downscaling "
                                             "decisions (None: 1)")

    def autoscaling_config(self, min_replicas: int, max_replicas: int) -> dict[str, Any]:
        """Serve's ``autoscaling_config`` for a deployment between the two replica bounds."""
        config: dict[str, Any] = {
            "min_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s}
        for name in ("upscaling_factor", "downscaling_factor"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        return config
