"""The local backend: this node's GPU slices (CPU slots without a GPU), parallel jobs under one
detached supervisor per submission (:mod:`.supervisor`), typed node plans (:mod:`.plan`)."""

from orchestrator.launchers.local.launcher import LocalLauncher, cancel_requested, queue_order
from orchestrator.launchers.local.plan import NodeCommand, NodeJob, NodePlan, NodeRequest, PortRule, format_command

__all__ = ["LocalLauncher", "NodeCommand", "NodeJob", "NodePlan", "NodeRequest", "PortRule", "cancel_requested",
           "format_command", "queue_order"]
