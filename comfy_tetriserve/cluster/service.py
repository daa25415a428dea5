"""Building the cluster executor from the service's settings (``serve --cluster ray``)."""
from __future__ import annotations

import os

from . import require_ray
from .topology import MoveCost, parse_devices_per_node


def build_cluster_executor(config):
    """The ClusterExecutor for ``config`` (InvalidRequest saying what to install when Ray is missing)."""
    require_ray()
    parse_devices_per_node(config.devices_per_node)
    from .executor import ClusterExecutor

    address = config.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
    return ClusterExecutor(address, devices_per_node=config.devices_per_node,
                           checkpoint_every_s=config.checkpoint_every_s,
                           move_cost=MoveCost(bytes_per_s=config.inter_node_gbps * 1e9 / 8),
                           spare_nodes=config.spare_nodes)
