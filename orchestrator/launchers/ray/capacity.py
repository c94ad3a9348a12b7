"""What a Ray cluster can ever give, and whether a job (or a sweep's trial) fits in it.

Ray does not refuse a request it can never satisfy: a trial asking ``{"GPU": 1}`` on a GPU-less
cluster stays PENDING forever (FIELD_NOTES). So preflight compares the request with the named
cluster's resources (``ray.cluster_resources()``, and ``ray.nodes()`` for what one node holds), or
for a private head with what Ray would count on this machine, and refuses with one line.

The cluster is asked from a child process (``python -m orchestrator.launchers.ray.capacity``):
``ray.init`` towards an address where something that is not Ray listens retries for minutes, and
only a separate process can be stopped after a timeout. No answer (or one that cannot be read)
skips the check: a false refusal is worse than a late one. With ``wait_s`` the child keeps
polling until the request fits or the time is up, meanwhile showing the request to Ray's
autoscaler as a pending placement group (so that an autoscaling cluster grows for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from cluster.errors import LaunchError
from cluster.process import signal_group

log = logging.getLogger(__name__)

EPS = 1e-4  # Ray's resource granularity
QUERY_TIMEOUT_S = 60.0  # start Python, import ray, connect, read; on top of any wait
POLL_S = 1.0
MARK = "ORCH_RAY_CAPACITY "  # prefix of the child's answer lines (Ray may print to stdout too)
RESOURCES = ("GPU", "CPU")  # the ones orch asks for, checked in this order


@dataclass(frozen=True)
class RayAsk:
    """What one job (or one sweep trial) asks of a Ray cluster: ``workers`` bundles of
    ``per_worker`` placed on nodes independently, plus an optional ``driver`` bundle.

    ``use_gpu`` ``auto`` counts the GPU only where the cluster has one (the driver decides the
    same way: CPU on a GPU-less cluster). ``hints`` say, per resource, which flag to change.
    """

    label: str
    workers: int
    per_worker: dict[str, float]
    use_gpu: str = "yes"
    driver: dict[str, float] = field(default_factory=dict)
    unit: str = "worker"
    hints: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RayAsk":
        return cls(**data)

    def bundles(self, total: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """``(per_worker, driver)`` as they will be asked of a cluster with ``total`` resources."""
        gpu = self.use_gpu == "yes" or (self.use_gpu == "auto" and total.get("GPU", 0) > 0)
        per = {r: float(v) for r, v in self.per_worker.items() if v > 0 and (r != "GPU" or gpu)}
        return per, {r: float(v) for r, v in self.driver.items() if v > 0}


@dataclass(frozen=True)
class RayCapacity:
    """A cluster's resources: ``total`` and each alive node's (empty when unknown)."""

    where: str
    total: dict[str, float]
    nodes: tuple[dict[str, float], ...] = ()


def amount(value: float, resource: str) -> str:
    """``3 CPUs``, ``1 GPU``, ``0.5 GPU``."""
    return f"{value:g} {resource}{'s' if value > 1 else ''}"


def _has(value: float, resource: str) -> str:
    return f"no {resource}" if value <= EPS else amount(value, resource)


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(r, 0.0) + EPS >= v for r, v in bundle.items())


def place(bundles: Sequence[dict[str, float]], nodes: Sequence[dict[str, float]]) -> int:
    """How many of ``bundles`` fit on ``nodes`` together (first fit, largest bundle first)."""
    free = [dict(n) for n in nodes]
    placed = 0
    for bundle in sorted(bundles, key=lambda b: tuple(-b.get(r, 0.0) for r in RESOURCES)):
        for node in free:
            if _fits(bundle, node):
                for r, v in bundle.items():
                    node[r] = node.get(r, 0.0) - v
                placed += 1
                break
    return placed


def _per_text(per: dict[str, float]) -> str:
    return " and ".join(amount(per[r], r) for r in _ordered(per))


def shortfall(ask: RayAsk, cap: RayCapacity) -> Optional[str]:
    """The one-line reason ``ask`` can never run on ``cap`` (None when it fits): the cluster's
    totals, then one worker on one node, then all workers on the nodes together."""
    per, driver = ask.bundles(cap.total)
    units = f"{ask.workers} {ask.unit}{'s' if ask.workers != 1 else ''}"
    for r in _ordered(set(per) | set(driver)):
        need = ask.workers * per.get(r, 0.0) + driver.get(r, 0.0)
        have = float(cap.total.get(r, 0.0))
        if need > have + EPS:
            parts = [f"{units} x {amount(per[r], r)}"] if r in per and (ask.workers > 1 or driver.get(r)) else []
            parts += [f"{amount(driver[r], r)} for its driver"] if driver.get(r) else []
            detail = f" ({' + '.join(parts)})" if parts else ""
            return (f"{ask.label} asks for {amount(need, r)}{detail} but the Ray cluster has {_has(have, r)} "
                    f"({cap.where}); {ask.hints.get(r, 'use a bigger cluster (--address)')}")
    nodes = [n for n in cap.nodes if n]
    if not nodes or not per:
        return None  # per-node resources unknown: the totals are all we can say
    if not any(_fits(per, n) for n in nodes):
        too_big = [r for r in _ordered(per) if all(n.get(r, 0.0) + EPS < per[r] for n in nodes)]
        if too_big:
            r = too_big[0]
            has = f"no node of the Ray cluster has more than {_has(max(n.get(r, 0.0) for n in nodes), r)}"
        else:
            r = _ordered(per)[0]
            has = f"no node of the Ray cluster has all of it ({_nodes_text(nodes, per)})"
        return (f"{ask.label} asks for {_per_text(per)} per {ask.unit}, on one node, but {has} ({cap.where}); "
                f"{ask.hints.get(r, 'use a cluster with bigger nodes')}")
    bundles = [per] * ask.workers + ([driver] if driver else [])
    if place(bundles, nodes) < len(bundles):
        fit = min(place([per] * ask.workers, nodes), ask.workers)
        r = _ordered(per)[0]
        return (f"{ask.label} asks for {units} x {_per_text(per)}{' plus a driver' if driver else ''}; the Ray "
                f"cluster has enough in sum but its nodes ({_nodes_text(nodes, per)}) hold at most {fit} "
                f"({cap.where}); {ask.hints.get(r, 'use a cluster with bigger nodes')}")
    return None


def _ordered(resources) -> list[str]:
    return [r for r in RESOURCES if r in resources] + sorted(r for r in resources if r not in RESOURCES)


def _nodes_text(nodes: Sequence[dict[str, float]], per: dict[str, float]) -> str:
    shown = [" + ".join(_has(float(n.get(r, 0.0)), r) for r in _ordered(per)) for n in nodes[:6]]
    return "nodes of " + ", ".join(shown) + (", ..." if len(nodes) > 6 else "")


def first_shortfall(asks: Sequence[RayAsk], cap: RayCapacity) -> Optional[str]:
    """The shortfall of the first ask that does not fit, or None."""
    return next((m for m in (shortfall(a, cap) for a in asks) if m), None)


def where(address: Optional[str]) -> str:
    """How a refusal names the cluster."""
    return f"at {address}" if address else "the private head orch starts on this machine, with its CPUs and GPUs"


def query(address: Optional[str], asks: Sequence[RayAsk], wait_s: float = 0.0,
          on_first: Optional[Callable[[RayCapacity], None]] = None,
          timeout_s: Optional[float] = None) -> Optional[RayCapacity]:
    """Ask the cluster at ``address`` (None: this machine as a private head would see it) from a
    child process; with ``wait_s`` the child polls until every ask fits or the time is up.
    ``on_first`` sees the first answer. None when no answer came (logged at debug level)."""
    payload = json.dumps({"address": address, "asks": [a.to_json() for a in asks], "wait_s": wait_s, "poll_s": POLL_S})
    limit = (QUERY_TIMEOUT_S if timeout_s is None else timeout_s) + max(0.0, wait_s)
    last: Optional[RayCapacity] = None
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.launchers.ray.capacity"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        timer = threading.Timer(limit, signal_group, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            with contextlib.suppress(OSError):  # a child that died at start-up: no answer, below
                proc.stdin.write(payload)
                proc.stdin.close()
            for line in proc.stdout:
                try:
                    data = json.loads(line[len(MARK):]) if line.startswith(MARK) else None
                    cap = RayCapacity(where(address), dict(data["total"]), tuple(dict(n) for n in data["nodes"]))
                except (ValueError, TypeError, KeyError):
                    continue  # Ray's own output, or a line cut short by the timeout
                if last is None and on_first is not None:
                    on_first(cap)
                last = cap
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                signal_group(proc.pid, signal.SIGKILL)  # its own session: the whole group
                proc.wait()
        if last is None:
            err.seek(0)
            tail = " | ".join(err.read().strip().splitlines()[-3:])
            log.debug("no capacity answer from the Ray cluster %s (exit %s): %s; capacity not checked",
                      address or "(private head)", proc.returncode, tail)
    return last


def require_capacity(address: Optional[str], asks: Sequence[RayAsk], wait_s: float = 0.0) -> None:
    """LaunchError naming the shortfall unless every ask fits the cluster. A named cluster may
    grow (autoscaling): ``wait_s`` > 0 polls it that long first. A private head is this machine
    and never grows, so it is never waited for."""
    if not asks:
        return
    wait = max(0.0, wait_s or 0.0) if address else 0.0

    def announce(cap: RayCapacity) -> None:
        message = first_shortfall(asks, cap)
        if message and wait > 0:
            log.warning("the Ray cluster is too small for now; waiting up to %g s for it to grow "
                        "(--wait-for-resources): %s", wait, message)

    cap = query(address, asks, wait, announce)
    if cap is None:
        return
    message = first_shortfall(asks, cap)
    if message:
        raise LaunchError(message)


# ------------------------------------------------------------------------------------- child
def local_resources() -> dict[str, float]:
    """CPUs and GPUs of this machine as ``ray start --head`` would count them."""
    from ray._private import accelerators
    from ray._private.utils import get_num_cpus

    total = {"CPU": float(get_num_cpus())}
    manager = accelerators.get_accelerator_manager_for_resource("GPU")
    if manager is not None:
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            count = min(count, len(visible))
        total["GPU"] = float(count)
    return total


def _emit(total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    print(MARK + json.dumps({"total": total, "nodes": nodes}), flush=True)


def main() -> int:
    """The child: read ``{address, asks, wait_s, poll_s}`` on stdin, print one answer line per
    poll (the last one is the answer)."""
    from orchestrator.launchers.ray.cluster import prepare_client

    request = json.loads(sys.stdin.read())
    address = request["address"]
    if not address:
        total = local_resources()
        _emit(total, [total])
        return 0
    prepare_client(address)
    import ray

    asks = [RayAsk.from_json(a) for a in request["asks"]]
    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    demand = None
    try:
        deadline = time.monotonic() + float(request.get("wait_s") or 0.0)
        while True:
            total = {k: float(v) for k, v in ray.cluster_resources().items()}
            nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
            _emit(total, nodes)
            left = deadline - time.monotonic()
            short = [a for a in asks if shortfall(a, RayCapacity("", total, tuple(nodes)))]
            if left <= 0 or not short:
                return 0
            if demand is None:
                demand = _show_demand(short[0], total)
            time.sleep(min(float(request.get("poll_s") or POLL_S), left))
    finally:
        if demand is not None:
            from ray.util import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(demand)
        ray.shutdown()


def _show_demand(ask: RayAsk, total: dict[str, float]):
    """A pending placement group of ``ask``'s bundles while we wait: Ray's autoscaler grows a
    cluster only for demand it sees (polling alone would wait for nothing). Placed all or
    nothing, so it holds no resource while pending; removed when the wait ends."""
    from ray.util import placement_group

    per, driver = ask.bundles(total)
    bundles = [per] * ask.workers + ([driver] if driver else [])
    try:
        return placement_group([b for b in bundles if b], strategy="PACK", name="orch-wait-for-resources")
    except Exception as err:  # noqa: BLE001 - only a hint to the autoscaler; the wait goes on without it
        print(f"no placement group for the autoscaler: {err}", file=sys.stderr)
        return None


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
