"""Work on the node where a Ray Train worker runs, whatever node that is: a zero-CPU Ray task
pinned to the node (``NodeAffinitySchedulingStrategy``, not soft) that dumps a rank's stacks with
py-spy or kills a hung rank. The driver's hang watchdog uses it for every rank, on its own node
too, so one code path serves one node and many. Ray is imported only when called."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

from orchestrator.watchdog import Stall, dump_rank
from orchestrator.watchdog_stacks import Where

TASK_TIMEOUT_S = 120.0  # a py-spy dump (native frames, then without) takes seconds; a dead node never answers


def node_ids() -> dict[str, str]:
    """Host name -> Ray node id of the cluster's live nodes (the first node of a host that runs
    several: they share its processes)."""
    import ray

    found: dict[str, str] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            found.setdefault(node["NodeManagerHostname"], node["NodeID"])
    return found


def on_nodes(fn: Callable[..., Any], calls: dict[int, tuple[str, tuple]], timeout_s: float = TASK_TIMEOUT_S
             ) -> dict[int, Any]:
    """Run ``fn(*args)`` for each ``key: (host, args)`` as a zero-CPU Ray task on that host's node;
    returns key -> its result, or the ``Exception`` that stopped it (no node, a timeout)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = node_ids()
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs, results = {}, {}
    for key, (host, args) in calls.items():
        if host not in nodes:
            results[key] = LookupError(f"{host} is no live node of this Ray cluster")
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id=nodes[host], soft=False)
        refs[key] = task.options(scheduling_strategy=strategy).remote(*args)
    for key, ref in refs.items():
        try:
            results[key] = ray.get(ref, timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - one rank's dump failing must not stop the others'
            results[key] = err
    return results


def _dump_here(folder: str, output_dir: str, rank: int, pid: int, host: str, stall: Stall) -> Where:
    """A Ray task's body: dump ``pid`` (a worker of this node) and say who dumped it."""
    import ray

    found = dump_rank(folder, output_dir, rank, pid, host, stall)
    with open(os.path.join(folder, f"rank-{rank}.txt"), "a", encoding="utf-8") as handle:
        handle.write(f"\n(dumped by a Ray task pinned to node {ray.get_runtime_context().get_node_id()}, "
                     f"pid {os.getpid()})\n")
    return found


def dump_on_nodes(output_dir: str, stall: Stall) -> Callable[[str, dict[int, tuple[int, str]]], dict[int, Where]]:
    """The watchdog's ``dump_remote`` for a Ray job: every rank's stacks dumped on its node
    (``rank-<r>.txt`` lands in the report folder: the output folder is shared storage)."""

    def dump(folder: str, ranks: dict[int, tuple[int, str]]) -> dict[int, Where]:
        calls = {rank: (host, (folder, output_dir, rank, pid, host, stall)) for rank, (pid, host) in ranks.items()}
        results = on_nodes(_dump_here, calls)
        return {rank: result if isinstance(result, Where) else Where(f"not dumped: {result}"[:300])
                for rank, result in results.items()}

    return dump


def _kill(pid: int) -> Optional[str]:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as err:
        return str(err)
    return None


def kill_on_nodes(ranks: dict[int, tuple[int, str]]) -> dict[int, Any]:
    """SIGKILL each rank's process (rank -> (pid, host)) on its node: Ray Train then restarts
    the worker group from the last checkpoint."""
    return on_nodes(_kill, {rank: (host, (pid,)) for rank, (pid, host) in ranks.items()})
