"""The Ray backend: Ray Train jobs (:mod:`.launcher`, :mod:`.request`), their detached driver
(:mod:`.driver`), what runs in each Ray Train worker (:mod:`.worker`), and a private
single-node Ray head on loopback (:mod:`.cluster`). Ray itself is imported only inside."""

from orchestrator.launchers.ray.launcher import RayLauncher, RayPlan, check_addresses, start_driver
from orchestrator.launchers.ray.request import RayJobRequest

__all__ = ["RayJobRequest", "RayLauncher", "RayPlan", "check_addresses", "start_driver"]
