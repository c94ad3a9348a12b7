"""What a Slurm partition can ever give, and whether an sbatch request fits in it.

Read from ``scontrol -a -o show partition`` (every partition, hidden ones too, one line each) and
``scontrol -o show node <the partition's nodes>``: the partition exists, its nodes, ``MaxNodes``,
``MaxTime``, ``MaxCPUsPerNode``, ``MaxMemPerNode``, and per node its ``gpu`` GRES, CPUs and
``RealMemory``. A request is checked against all the partition's nodes ("ever": a DOWN or
DRAINED node may come back); ``--wait-for-resources`` waits for enough nodes that are not
DOWN/DRAIN. Every query has a timeout, and a field that is missing or cannot be read skips its
check (logged at debug level): a false refusal is worse than a late one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.errors import ConfigError, LaunchError
from orchestrator.launchers.slurm.sbatch import parse_time

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 15.0
POLL_S = 5.0
UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "N/A")
# Node states (and flags) that take no new job until an admin or Slurm brings the node back.
UNAVAILABLE = frozenset({"DOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "INVAL", "FUTURE"})
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.]*)=")


# ------------------------------------------------------------------------------- parsing
def parse_fields(line: str) -> dict[str, str]:
    """One ``scontrol -o`` record -> ``{key: value}``. Values may hold spaces (``OS=Linux 6.1 #1
    SMP``, ``Reason=Not responding``): a value runs until the next `` Key=``."""
    marks = list(_KEY.finditer(line))
    return {m.group(1): line[m.end(): nxt.start() if nxt else len(line)].strip()
            for m, nxt in zip(marks, marks[1:] + [None])}


def parse_records(text: str) -> list[dict[str, str]]:
    """Every non-empty line of ``scontrol -o show ...`` output, parsed."""
    return [parse_fields(line) for line in text.splitlines() if "=" in line]


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (``gpu:2(S:0,1),mps:100``)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_gres_gpus(text: Optional[str]) -> Optional[int]:
    """GPUs in a GRES string: ``gpu:4`` -> 4, ``gpu:a100:4(S:0-1)`` -> 4, ``gpu:a100:2,gpu:v100:1``
    -> 3, ``(null)`` / ``mps:100`` -> 0; None when it cannot be read."""
    if text is None:
        return None
    value = text.strip()
    if value in ("", "(null)", "N/A", "none"):
        return 0
    total = 0
    for item in _split_top(value):
        parts = re.sub(r"\(.*\)$", "", item).split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) == 1:
            total += 1  # `gpu` alone means one
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", parts[-1])
        if not match:
            return None
        total += int(match.group(1)) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[match.group(2)]
    return total


def parse_int(text: Optional[str]) -> Optional[int]:
    """``8000`` -> 8000; None for a missing or unreadable value."""
    return int(text) if text is not None and re.fullmatch(r"\d+", text.strip()) else None


def parse_limit(text: Optional[str]) -> tuple[bool, Optional[int]]:
    """A partition limit: ``(known, value)``; ``UNLIMITED`` is ``(True, None)``."""
    if text is None:
        return False, None
    if text.strip().upper() in UNLIMITED:
        return True, None
    value = parse_int(text)
    return value is not None, value


def parse_max_time(text: Optional[str]) -> tuple[bool, Optional[int]]:
    """``MaxTime``: ``(known, minutes)``; ``UNLIMITED`` / ``INFINITE`` is ``(True, None)``."""
    if text is None:
        return False, None
    if text.strip().upper() in UNLIMITED:
        return True, None
    try:
        return True, parse_time(text.strip())
    except ConfigError:
        return False, None


def parse_memory_mb(text: Any) -> Optional[float]:
    """An sbatch ``--mem`` value (``16GB``, ``1000MB``, ``2G``, ``500``: MB) -> MB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", str(text).strip().upper())
    if not match:
        return None
    return float(match.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match.group(2)]


def format_minutes(minutes: int) -> str:
    """Minutes as Slurm writes a time: ``90`` -> ``01:30:00``, ``2880`` -> ``2-00:00:00``."""
    days, rest = divmod(int(minutes), 1440)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text


@dataclass(frozen=True)
class SlurmNode:
    """One node as ``scontrol show node`` reports it (None: not reported / unreadable)."""

    name: str
    state: str
    cpus: Optional[int]
    mem_mb: Optional[int]
    gpus: Optional[int]

    @property
    def available(self) -> bool:
        """Not DOWN / DRAIN / FAIL: it can take a new job now."""
        return not (set(re.split(r"[+]", re.sub(r"[*~#!%$@^-]", "", self.state.upper()))) & UNAVAILABLE)

    @classmethod
    def parse(cls, fields: dict[str, str]) -> "SlurmNode":
        cpus = parse_int(fields.get("CPUEfctv")) or parse_int(fields.get("CPUTot"))
        gpus = parse_gres_gpus(fields["Gres"]) if "Gres" in fields else None
        if gpus is None and "CfgTRES" in fields:
            match = re.search(r"(?:^|,)gres/gpu=(\d+)", fields["CfgTRES"])
            gpus = int(match.group(1)) if match else None
        return cls(fields.get("NodeName", "?"), fields.get("State", ""), cpus, parse_int(fields.get("RealMemory")), gpus)


@dataclass(frozen=True)
class SlurmPartition:
    """One partition's limits (``known`` False: the field was missing or unreadable)."""

    name: str
    default: bool
    nodes_expr: str
    total_nodes: Optional[int]
    max_nodes: tuple[bool, Optional[int]]
    max_time: tuple[bool, Optional[int]]
    max_cpus_per_node: tuple[bool, Optional[int]]
    max_mem_per_node: tuple[bool, Optional[int]]

    @classmethod
    def parse(cls, fields: dict[str, str]) -> "SlurmPartition":
        return cls(
            name=fields.get("PartitionName", "?"), default=fields.get("Default", "NO").upper() == "YES",
            nodes_expr=fields.get("Nodes", ""), total_nodes=parse_int(fields.get("TotalNodes")),
            max_nodes=parse_limit(fields.get("MaxNodes")), max_time=parse_max_time(fields.get("MaxTime")),
            max_cpus_per_node=parse_limit(fields.get("MaxCPUsPerNode")),
            max_mem_per_node=parse_limit(fields.get("MaxMemPerNode")))


# ------------------------------------------------------------------------------- the ask
@dataclass(frozen=True)
class SlurmAsk:
    """One sbatch request (a job, or each task of an array) as preflight checks it."""

    label: str
    partition: Optional[str]
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    mem_mb: Optional[float]
    time_min: Optional[int]
    time_given: bool = True

    @classmethod
    def from_params(cls, params: dict[str, Any], label: str, time_given: bool = True) -> "SlurmAsk":
        """From submitit ``SlurmExecutor`` parameters (:func:`.sbatch.sbatch_parameters`)."""
        gpus = params.get("gpus_per_node") or 0
        if isinstance(gpus, str):  # "a100:2"
            gpus = parse_int(gpus.rsplit(":", 1)[-1]) or 0
        if params.get("gres"):
            gpus = max(int(gpus), parse_gres_gpus(str(params["gres"])) or 0)
        return cls(label=label, partition=params.get("partition"), nodes=int(params.get("nodes") or 1),
                   tasks_per_node=int(params.get("ntasks_per_node") or 1),
                   cpus_per_task=int(params.get("cpus_per_task") or 1), gpus_per_node=int(gpus),
                   mem_mb=parse_memory_mb(params["mem"]) if params.get("mem") is not None else None,
                   time_min=params.get("time"), time_given=time_given)


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f}".rstrip("0").rstrip(".")


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def shortfall(ask: SlurmAsk, part: SlurmPartition, nodes: Optional[Sequence[SlurmNode]],
              up_only: bool = False) -> Optional[str]:
    """The one-line reason ``ask`` can never run in ``part`` (None: it fits, as far as Slurm's
    answers tell). ``nodes``: the partition's nodes (None: unknown); ``up_only`` counts only
    nodes that are not DOWN/DRAIN (what a wait waits for)."""
    who, where = ask.label, f"partition {part.name}"
    known, max_time = part.max_time
    if known and max_time is not None and ask.time_min is not None and ask.time_min > max_time:
        given = "--time" if ask.time_given else "orch's default: --time was not given"
        return (f"{who} asks for a time limit of {format_minutes(ask.time_min)} ({given}) but {where} allows at most "
                f"{format_minutes(max_time)} (MaxTime); pass --time {format_minutes(max_time)} or less, or another --partition")
    known, max_nodes = part.max_nodes
    if known and max_nodes is not None and ask.nodes > max_nodes:
        return (f"{who} asks for {_n(ask.nodes, 'node')} but {where} allows at most {max_nodes} per job (MaxNodes); "
                "lower --nodes (or --gpus), or pick another --partition")
    pool = None if nodes is None else [n for n in nodes if n.available or not up_only]
    qualifier = ""
    if up_only and nodes is not None and len(pool) < len(nodes):
        qualifier = f" not DOWN/DRAIN ({len(nodes)} in all)"
    have_nodes = len(pool) if pool is not None else part.total_nodes
    if have_nodes is not None and ask.nodes > have_nodes:
        return (f"{who} asks for {_n(ask.nodes, 'node')} but {where} has {have_nodes} node{'s' if have_nodes != 1 else ''}"
                f"{qualifier}; lower --nodes (or --gpus), or pick a bigger --partition")
    cpus = ask.tasks_per_node * ask.cpus_per_task
    known, max_cpus = part.max_cpus_per_node
    if known and max_cpus is not None and cpus > max_cpus:
        return (f"{who} asks for {cpus} CPUs per node ({ask.tasks_per_node} tasks x {ask.cpus_per_task} cpus_per_task) "
                f"but {where} allows {max_cpus} per node (MaxCPUsPerNode); lower --cpus-per-task or --gpus-per-node")
    known, max_mem = part.max_mem_per_node
    if known and max_mem is not None and ask.mem_mb is not None and ask.mem_mb > max_mem:
        return (f"{who} asks for {_gb(ask.mem_mb)} GB per node (--mem-gb) but {where} allows "
                f"{_gb(max_mem)} GB per node (MaxMemPerNode); lower --mem-gb")
    if not pool:
        return None  # no node list: the partition's own limits are all we can check
    return _node_shortfall(ask, pool, f"the nodes of {where}{qualifier}")


def _node_shortfall(ask: SlurmAsk, pool: Sequence[SlurmNode], nodes_of: str) -> Optional[str]:
    """One node's share (GPUs, CPUs, memory) against the largest node, then ``ask.nodes`` nodes
    that hold all of it at once. A node that did not report a value is taken to have enough."""
    who = ask.label
    cpus = ask.tasks_per_node * ask.cpus_per_task
    gpus = [n.gpus for n in pool if n.gpus is not None]
    if ask.gpus_per_node and gpus and len(gpus) == len(pool) and ask.gpus_per_node > max(gpus):
        has = f"at most {max(gpus)}" if max(gpus) else "no GPU"
        return (f"{who} asks for {ask.gpus_per_node} GPUs per node but {nodes_of} have {has} (gres gpu); "
                + ("lower --gpus-per-node (and raise --nodes), or pick another --partition" if max(gpus) else
                   "pick a --partition with GPUs, or set runtime.device=cpu"))
    counts = [n.cpus for n in pool if n.cpus is not None]
    if counts and len(counts) == len(pool) and cpus > max(counts):
        return (f"{who} asks for {cpus} CPUs per node ({ask.tasks_per_node} tasks, one per rank, x {ask.cpus_per_task} "
                f"cpus_per_task) but {nodes_of} have at most {max(counts)}; lower --cpus-per-task or --gpus-per-node")
    mems = [n.mem_mb for n in pool if n.mem_mb is not None]
    if ask.mem_mb is not None and mems and len(mems) == len(pool) and ask.mem_mb > max(mems):
        return (f"{who} asks for {_gb(ask.mem_mb)} GB per node (--mem-gb) but {nodes_of} have at most "
                f"{_gb(max(mems))} GB (RealMemory {max(mems)} MB); lower --mem-gb")

    def holds(node: SlurmNode) -> bool:
        return ((node.gpus is None or node.gpus >= ask.gpus_per_node) and (node.cpus is None or node.cpus >= cpus)
                and (node.mem_mb is None or ask.mem_mb is None or node.mem_mb >= ask.mem_mb))

    able = sum(holds(n) for n in pool)
    if able < ask.nodes:
        share = ", ".join(p for p in (f"{ask.gpus_per_node} GPUs" if ask.gpus_per_node else "", f"{cpus} CPUs",
                                      f"{_gb(ask.mem_mb)} GB" if ask.mem_mb is not None else "") if p)
        return (f"{who} asks for {_n(ask.nodes, 'node')} with {share} each but only {able} of {nodes_of} "
                "hold that much; lower --nodes or the per-node request, or pick another --partition")
    return None


# ------------------------------------------------------------------------------- queries
def _scontrol(*args: str) -> Optional[subprocess.CompletedProcess]:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("scontrol %s gave no answer (%s): capacity check skipped", " ".join(args), err)
        return None


def query_partitions() -> Optional[list[SlurmPartition]]:
    """Every partition (hidden ones too); None when Slurm gives no readable answer."""
    proc = _scontrol("-a", "-o", "show", "partition")
    if proc is None or proc.returncode != 0:
        return None
    parts = [SlurmPartition.parse(f) for f in parse_records(proc.stdout) if "PartitionName" in f]
    return parts or None


def query_nodes(part: SlurmPartition) -> Optional[list[SlurmNode]]:
    """The nodes of ``part``; None when unknown."""
    expr = part.nodes_expr
    if expr in ("", "(null)"):
        return []
    proc = _scontrol("-o", "show", "node", *([] if expr.upper() == "ALL" else [expr]))
    if proc is None or proc.returncode != 0:
        log.debug("scontrol show node %s failed: capacity per node not checked", expr)
        return None
    nodes = [SlurmNode.parse(f) for f in parse_records(proc.stdout) if "NodeName" in f]
    return nodes or None


def _partitions_of(ask: SlurmAsk, parts: list[SlurmPartition]) -> list[SlurmPartition]:
    """The partitions ``ask`` may run in (its ``--partition`` list, else the default one);
    LaunchError for a name the cluster does not have."""
    by_name = {p.name: p for p in parts}
    if not ask.partition:
        return [p for p in parts if p.default][:1]
    names = [n.strip() for n in str(ask.partition).split(",") if n.strip()]
    missing = [n for n in names if n not in by_name]
    if missing:
        listed = ", ".join(p.name + (" (default)" if p.default else "") for p in parts)
        raise LaunchError(f"{ask.label} asks for partition {missing[0]}, which this Slurm cluster does not have; "
                          f"its partitions: {listed}; pass one with --partition")
    return [by_name[n] for n in names]


DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize: indices 0..1000
CONFIG_KEEP_S = 3600  # how long a read of `scontrol show config` is reused (ORCH_HOME/slurm-config.json)


def max_array_size(cache_file: Optional[Path] = None) -> int:
    """The cluster's ``MaxArraySize`` (an array may have that many tasks, indices 0..N-1), from
    ``scontrol show config``, kept in ``cache_file`` for :data:`CONFIG_KEEP_S` per ``SLURM_CONF``;
    Slurm's default where the cluster does not say (a dry run away from it)."""
    conf = os.environ.get("SLURM_CONF", "")
    if cache_file is not None:
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("conf") == conf and time.time() - cached.get("at", 0) < CONFIG_KEEP_S:
                return int(cached["max_array_size"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    proc = _scontrol("show", "config")
    if proc is None or proc.returncode != 0:
        return DEFAULT_MAX_ARRAY_SIZE
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.MULTILINE)
    size = int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"conf": conf, "at": time.time(), "max_array_size": size}))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home: asked again next time
    return size


def tasks_at_once(ask: SlurmAsk) -> Optional[int]:
    """How many tasks shaped like ``ask`` the partition's available nodes can run at the same
    time (CPUs, GPUs and memory per node); None when Slurm cannot tell."""
    parts = query_partitions()
    if parts is None:
        return None
    try:
        chosen = _partitions_of(ask, parts)
    except LaunchError:
        return None
    nodes = query_nodes(chosen[0]) if chosen else None
    if not nodes:
        return None
    cpus = ask.tasks_per_node * ask.cpus_per_task
    fits = 0
    for node in nodes:
        if not node.available or not node.cpus:
            continue
        per_node = node.cpus // cpus
        if ask.gpus_per_node:
            per_node = min(per_node, (node.gpus or 0) // ask.gpus_per_node)
        if ask.mem_mb and node.mem_mb:
            per_node = min(per_node, int(node.mem_mb // ask.mem_mb))
        fits += per_node
    return max(1, fits // max(1, ask.nodes))


def gpus_per_node(partition: Optional[str]) -> Optional[int]:
    """The most GPUs one node of ``partition`` (a comma list: its first; None: the default
    partition) has; None when Slurm cannot tell or the nodes have none."""
    parts = query_partitions()
    if parts is None:
        return None
    name = str(partition).split(",")[0].strip() if partition else None
    chosen = [p for p in parts if (p.name == name if name else p.default)][:1]
    nodes = query_nodes(chosen[0]) if chosen else None
    counts = [n.gpus for n in nodes or () if n.gpus]
    return max(counts) if counts else None


def check(asks: Sequence[SlurmAsk], up_only: bool) -> Optional[str]:
    """Ask Slurm once; the first shortfall of ``asks`` (an ask may use any of its partitions).
    LaunchError for an unknown partition; None when everything fits or Slurm cannot tell."""
    parts = query_partitions()
    if parts is None:
        log.debug("no readable answer from `scontrol show partition`: capacity not checked")
        return None
    nodes: dict[str, Optional[list[SlurmNode]]] = {}
    for ask in asks:
        reasons = []
        for part in _partitions_of(ask, parts):
            if part.name not in nodes:
                nodes[part.name] = query_nodes(part)
            reasons.append(shortfall(ask, part, nodes[part.name], up_only))
        if reasons and all(reasons):
            return reasons[0]
    return None


def require_capacity(asks: Sequence[SlurmAsk], wait_s: float = 0.0) -> None:
    """LaunchError unless every ask fits its partition's nodes, DOWN/DRAIN ones included (they
    may come back). With ``wait_s`` > 0, also wait up to that long for enough nodes that are not
    DOWN/DRAIN; without it, such a job is left to wait in Slurm's queue (a warning says so)."""
    message = check(asks, up_only=False)
    if message:
        raise LaunchError(message)
    message = check(asks, up_only=True)
    if not message:
        return
    if not wait_s or wait_s <= 0:
        log.warning("%s: it will wait in Slurm's queue until nodes come back (or pass --wait-for-resources)", message)
        return
    log.warning("waiting up to %g s (--wait-for-resources) for nodes to come back: %s", wait_s, message)
    deadline = time.monotonic() + wait_s
    while message:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LaunchError(message)
        time.sleep(min(POLL_S, left))
        message = check(asks, up_only=True)
