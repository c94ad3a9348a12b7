"""Where this process sits in a distributed job: a pure function of the environment variables.

Order of detection (first match wins), and why:

1. ``ORCH_RAY_RANK`` / ``ORCH_RAY_WORLD_SIZE`` (with ``ORCH_RAY_LOCAL_RANK``,
   ``ORCH_RAY_LOCAL_WORLD_SIZE``, optional ``ORCH_RAY_NODE_RANK`` / ``ORCH_RAY_NUM_NODES``, and
   ``MASTER_ADDR`` / ``MASTER_PORT``): set only by orch's Ray worker, so unambiguous even when Ray
   runs inside a Slurm allocation (whose ``SLURM_*`` variables every Ray worker inherits).
   A Ray worker that already has a Ray Train context can call :meth:`DistEnv.from_values`.
2. torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...): torchrun started inside a
   Slurm job (``srun torchrun ...``) must win over the Slurm task variables.
3. Slurm task variables (``SLURM_PROCID``, ``SLURM_NTASKS``, ...), with the master address taken
   from the first host of the node list and the port from ``ORCH_MASTER_PORT`` / ``MASTER_PORT``,
   which orch decides at submit time.
4. A single process.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Optional

from cluster.errors import ClusterError
from cluster.hostlist import expand_hostlist, expand_tasks_per_node

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
Source = Literal["torchrun", "slurm", "ray", "single"]
SOURCES = ("torchrun", "slurm", "ray", "single")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size, node and rendezvous address of this process.

    ``master_port`` is ``None`` only for a single process (no process group is needed).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = LOOPBACK
    master_port: Optional[int] = None
    source: Source = "single"

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that logs, evaluates and saves)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is needed (more than one process)."""
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        """The ``torch.distributed`` ``init_method`` of this process: ``env://`` under torchrun
        (its rendezvous put ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment, and an elastic
        restart may change them), else ``tcp://<master_addr>:<master_port>``."""
        if self.source == "torchrun":
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"

    def to_environ(self) -> dict[str, str]:
        """The torch ``env://`` variables describing this process (for a child process)."""
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.num_nodes),
            "MASTER_ADDR": self.master_addr,
        }
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)
        return env

    @classmethod
    def single(cls) -> "DistEnv":
        """One process, no process group."""
        return cls()

    @classmethod
    def from_values(
        cls,
        *,
        rank: int,
        world_size: int,
        local_rank: Optional[int] = None,
        local_world_size: Optional[int] = None,
        node_rank: Optional[int] = None,
        num_nodes: Optional[int] = None,
        master_addr: Optional[str] = None,
        master_port: Optional[int] = None,
        source: Source = "single",
    ) -> "DistEnv":
        """Build and validate a :class:`DistEnv` from known values (e.g. a Ray Train context).

        Missing local values default to one node holding every rank; ``node_rank`` defaults to
        ``rank // local_world_size`` and ``num_nodes`` to ``world_size // local_world_size``.
        """
        if source not in SOURCES:
            raise ClusterError(f"unknown DistEnv source {source!r}; valid: {', '.join(SOURCES)}")
        local_world_size = world_size if local_world_size is None else local_world_size
        local_rank = rank % local_world_size if local_rank is None and local_world_size > 0 else local_rank
        _check(world_size >= 1, f"world size must be >= 1, got {world_size} ({source})")
        _check(local_world_size >= 1, f"local world size must be >= 1, got {local_world_size} ({source})")
        _check(0 <= rank < world_size, f"rank {rank} is outside world size {world_size} ({source})")
        _check(
            0 <= local_rank < local_world_size,
            f"local rank {local_rank} is outside local world size {local_world_size} ({source})",
        )
        _check(
            local_world_size <= world_size,
            f"local world size {local_world_size} exceeds world size {world_size} ({source})",
        )
        if node_rank is None:
            node_rank = rank // local_world_size
        if num_nodes is None:
            num_nodes = max(1, -(-world_size // local_world_size))
        _check(0 <= node_rank < num_nodes, f"node rank {node_rank} is outside {num_nodes} nodes ({source})")
        if master_port is not None:
            _check(1 <= master_port <= 65535, f"master port {master_port} is not in 1..65535 ({source})")
        _check(
            world_size == 1 or master_port is not None,
            f"world size {world_size} needs a master port ({source}); orch sets MASTER_PORT at launch",
        )
        return cls(
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=master_addr or LOOPBACK,
            master_port=master_port,
            source=source,
        )

    @classmethod
    def detect(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        """Read the distributed environment from ``environ`` (default ``os.environ``).

        Pure: looks at nothing but the mapping. Raises :class:`ClusterError` naming the variable
        when one is missing, not an integer, or contradicts another.
        """
        env = os.environ if environ is None else environ
        if "ORCH_RAY_RANK" in env or "ORCH_RAY_WORLD_SIZE" in env:
            return _from_ray(env)
        if "RANK" in env or "WORLD_SIZE" in env:
            return _from_torchrun(env)
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            return _from_slurm(env)
        return cls.single()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClusterError(message)


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None, required: bool = True) -> Optional[int]:
    """Integer variable ``name``; ClusterError naming it when absent (and required) or malformed."""
    value = env.get(name)
    if value is None or value.strip() == "":
        if default is None and required:
            raise ClusterError(f"environment variable {name} is not set; it is needed to find this process's rank")
        return default
    try:
        return int(value.strip())
    except ValueError:
        raise ClusterError(f"environment variable {name}={value!r} is not an integer") from None


def _port(env: Mapping[str, str], names: tuple[str, ...], world_size: int) -> Optional[int]:
    for name in names:
        if env.get(name, "").strip():
            port = _int(env, name)
            _check(1 <= port <= 65535, f"environment variable {name}={port} is not a port (1..65535)")
            return port
    if world_size > 1:
        raise ClusterError(
            f"{' / '.join(names)} is not set but WORLD_SIZE is {world_size}; "
            f"launch through orch (it leases a port) or export {names[-1]}"
        )
    return None


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    # A lone process needs no local layout; otherwise guessing it would pick a wrong device.
    single = 0 if world == 1 else None
    local_rank = _int(env, "LOCAL_RANK", default=single)
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=None if single is None else 1)
    node_rank = _int(env, "GROUP_RANK", required=False)
    num_nodes = _int(env, "GROUP_WORLD_SIZE", required=False)
    if num_nodes is None and world % local_world:
        raise ClusterError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}; set GROUP_WORLD_SIZE"
        )
    if world > 1:
        _check(bool(env.get("MASTER_ADDR", "").strip()), f"MASTER_ADDR is not set but WORLD_SIZE is {world}")
    return DistEnv.from_values(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR", "").strip() or None,
        master_port=_port(env, ("MASTER_PORT",), world),
        source="torchrun",
    )


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID")
    node_rank = _int(env, "SLURM_NODEID")
    # The step's values describe the srun that started this task; the job's may be larger.
    nodes_var = next((n for n in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if n in env), None)
    num_nodes = _int(env, nodes_var) if nodes_var else None
    tasks_var = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None)
    if tasks_var:
        counts = expand_tasks_per_node(env[tasks_var])
        _check(
            num_nodes is None or len(counts) == num_nodes,
            f"{tasks_var}={env[tasks_var]!r} lists {len(counts)} nodes but {nodes_var}={num_nodes}",
        )
        _check(
            sum(counts) == world,
            f"{tasks_var}={env[tasks_var]!r} adds up to {sum(counts)} tasks but SLURM_NTASKS={world}",
        )
        _check(node_rank < len(counts), f"SLURM_NODEID={node_rank} but {tasks_var} lists {len(counts)} nodes")
        local_world, num_nodes = counts[node_rank], len(counts)
    elif "SLURM_NTASKS_PER_NODE" in env:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE")
    else:
        raise ClusterError("SLURM_TASKS_PER_NODE is not set; cannot tell how many tasks share this node")
    master_addr = env.get("MASTER_ADDR", "").strip() or None
    if master_addr is None:
        list_var = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env), None)
        if list_var is None:
            _check(world == 1, "SLURM_JOB_NODELIST is not set; cannot find the master node")
        else:
            hosts = expand_hostlist(env[list_var])
            _check(
                num_nodes is None or len(hosts) == num_nodes,
                f"{list_var}={env[list_var]!r} names {len(hosts)} hosts but the job has {num_nodes} nodes",
            )
            master_addr = hosts[0]
    return DistEnv.from_values(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=_port(env, ("ORCH_MASTER_PORT", "MASTER_PORT"), world),
        source="slurm",
    )


def _from_ray(env: Mapping[str, str]) -> DistEnv:
    world = _int(env, "ORCH_RAY_WORLD_SIZE")
    if world > 1:
        _check(bool(env.get("MASTER_ADDR", "").strip()), f"MASTER_ADDR is not set but ORCH_RAY_WORLD_SIZE is {world}")
    return DistEnv.from_values(
        rank=_int(env, "ORCH_RAY_RANK"),
        world_size=world,
        local_rank=_int(env, "ORCH_RAY_LOCAL_RANK"),
        local_world_size=_int(env, "ORCH_RAY_LOCAL_WORLD_SIZE"),
        node_rank=_int(env, "ORCH_RAY_NODE_RANK", required=False),
        num_nodes=_int(env, "ORCH_RAY_NUM_NODES", required=False),
        master_addr=env.get("MASTER_ADDR", "").strip() or None,
        master_port=_port(env, ("MASTER_PORT",), world),
        source="ray",
    )


# -- addresses and interfaces of a multi-node job ------------------------------------------------
def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (an IP address) is a loopback address (``127.0.1.1`` included)."""
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def resolve_reachable(host: str, allow_loopback: bool = False) -> str:
    """``host``'s IPv4 address as other hosts see it: the first address it resolves to that is not
    loopback. Debian's /etc/hosts maps a host's own name to ``127.0.1.1``; that line must not
    become the address a job advertises (the classic first-multi-node hang). ClusterError when
    ``host`` resolves to loopback only (unless ``allow_loopback``: then that loopback address), or
    not at all."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise ClusterError(f"host {host!r} does not resolve on {socket.gethostname()} ({err}); "
                           "give the master as an address every node reaches") from None
    addrs = list(dict.fromkeys(info[4][0] for info in infos))
    usable = [a for a in addrs if not is_loopback(a)] or (addrs if allow_loopback else [])
    if not usable:
        raise ClusterError(f"host {host!r} resolves only to loopback ({', '.join(addrs)}) on {socket.gethostname()}: "
                           "other nodes cannot reach that; give the master as an address every node reaches")
    return usable[0]


def route_interface(addr: str) -> tuple[str, str]:
    """(interface, source address) this host uses to reach IP ``addr``: the kernel's route choice
    (a UDP ``connect`` sends nothing), then the interface that holds the source address. For an
    address of this host itself, its own interface (not ``lo``, which routes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((addr, 9))
        except OSError as err:
            raise ClusterError(f"{socket.gethostname()} has no route to {addr} ({err.strerror})") from None
        source = probe.getsockname()[0]
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == source:
            return name, source
    raise ClusterError(f"{socket.gethostname()}: no interface holds {source}, the source address towards {addr}")


def _ipv4_of(ifname: str) -> Optional[str]:
    """The IPv4 address of interface ``ifname`` (SIOCGIFADDR; None when it has none)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def socket_ifname_env(environ: Mapping[str, str], ifname: str) -> dict[str, str]:
    """``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` = ``ifname``, leaving out those the user set
    (pure). Without them gloo binds the address of this host's name, loopback under Debian's
    ``127.0.1.1`` line, and advertises it to its peers."""
    return {name: ifname for name in SOCKET_IFNAME_VARS if not environ.get(name, "").strip()}


def several_nodes(env: DistEnv, environ: Mapping[str, str]) -> tuple[DistEnv, dict[str, str], str]:
    """For a process of a job on several nodes: ``env`` with the master as an address (never the
    ``127.0.1.1`` that Debian gives the master its own name on the master), the socket interface
    variables to export (those the user set are kept), and one line saying both. One node:
    ``env`` unchanged, nothing to export. Not pure: it resolves a name and asks for a route."""
    if env.num_nodes <= 1:
        return env, {}, ""
    # Loopback only: "nodes" of this one machine (a local 2-node Slurm); it works there and nowhere else.
    addr = resolve_reachable(env.master_addr, allow_loopback=True)
    ifname, source = route_interface(addr)
    if env.source == "torchrun" and environ.get("MASTER_ADDR") != addr:
        export_master = {"MASTER_ADDR": addr}  # env:// reads it
    else:
        export_master = {}
    export = {**socket_ifname_env(environ, ifname), **export_master}
    chosen = {k: export.get(k) or environ[k] for k in SOCKET_IFNAME_VARS if k in export or k in environ}
    line = (f"{socket.gethostname()}: master {env.master_addr} at {addr}:{env.master_port} via {ifname} ({source}); "
            + ", ".join(f"{k}={v}" for k, v in sorted(chosen.items())))
    return replace(env, master_addr=addr), export, line
