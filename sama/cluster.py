"""Where sama's Ray work runs: the one ``ray.init`` policy of every job, the quickstart and training.

``RAY_ADDRESS`` (or an explicit address) joins an existing cluster, as ``ray job submit`` sets it;
with neither, a local Ray starts in this process: the embedded default. What Ray prints, and what
stays in its session directory, is :mod:`sama.logs`'s.
"""

from __future__ import annotations

import os


def connect(address: str | None = None) -> str | None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray, with
    :mod:`sama.logs`' settings; returns the Ray session directory (its ``logs/`` hold Ray's own
    output). No-op returning None when Ray is already initialised in this process."""
    import ray

    from sama import logs

    if ray.is_initialized():
        return None
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None:
        # A local cluster started here: Ray's default niceness 15 for workers would let any other
        # load on the machine starve the job's (and training's) worker processes; and no
        # dashboard, whose processes cost the embedded default a core's worth of startup.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(include_dashboard=False, configure_logging=False, **logs.prepare_ray_init(local=True))
    else:
        ray.init(address=target, configure_logging=False, **logs.prepare_ray_init(local=False))
    return logs.ray_started()


def driver_host() -> str:
    """An address of this (the driver's) machine that the cluster's workers reach: loopback when
    the cluster is this machine alone, else the driver node's address."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    here = ray.util.get_node_ip_address()
    if all(node.get("NodeManagerAddress") == here for node in nodes):
        return "127.0.0.1"
    return here
