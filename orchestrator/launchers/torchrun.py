"""The torchrun backend: ``torchrun`` with c10d rendezvous, on this node or on several.

* One node: ``torchrun --nnodes 1 --nproc_per_node G --rdzv_endpoint 127.0.0.1:PORT`` with PORT
  from a bind-checked lease (:mod:`cluster.ports`), supervised like a local job (device lease,
  record, logs, cancel).
* Several nodes with ``resources.torchrun.hosts`` (``--hosts h1,h2``): one torchrun agent per host,
  started over ssh (hosts naming this machine are started directly, which is also how the tests
  run a 2-"node" job here). The rendezvous port is leased here when the first host is this
  machine, else asked from it over ssh (``python -m cluster.ports``).
* One node of several by hand (``--node-rank i --master-addr H``, what ``dist_train.sh`` users
  do): every node runs the same line, so the port must be given (``resources.torchrun.rdzv_port``).
* Several nodes and neither: ``--dry-run`` prints the per-node command lines; submit refuses.

torchrun ignores ``--node_rank`` with c10d (ranks are assigned at rendezvous), so it is not passed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import ClassVar, Sequence

from cluster.env import resolve_reachable, route_interface
from cluster.errors import ClusterError, LaunchError
from cluster.remote import ssh_argv as remote_ssh_argv
from orchestrator.launchers.local.launcher import LocalLauncher, node_request
from orchestrator.launchers.local.plan import NodeCommand, NodeJob, NodePlan, PortRule, base_env, format_command
from orchestrator.spec import JobSpec

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def torchrun_path() -> str:
    """The ``torchrun`` next to this Python (a venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "torchrun"
    return str(candidate) if candidate.exists() else "torchrun"


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (no ssh needed)."""
    return host in LOCAL_NAMES or host in (socket.gethostname(), socket.getfqdn())


def torchrun_argv(job: JobSpec, nnodes: int, nproc: int, endpoint: str, several: bool = False) -> list[str]:
    """The torchrun command line of one node; ``several``: one of several nodes started by orch,
    whose own address (``--local-addr``, the workers' MASTER_ADDR when it is the master)
    :mod:`cluster.reach` fills in on the node."""
    rdzv_id = job.name
    return [
        torchrun_path(), "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id,
        *(["--local-addr", "{node_addr}"] if several else []),
        "--max_restarts", "0", "-m", "orchestrator.worker", str(job.config_path),
    ]


def remote_command(argv: list[str], env: dict[str, str]) -> str:
    """``argv`` with ``env`` as one shell line that runs in the current folder on another host."""
    return f"cd {shlex.quote(os.getcwd())} && exec env {format_command(argv, env)}"


def ssh_argv(host: str, argv: list[str], env: dict[str, str], tty: bool = True) -> list[str]:
    """Run ``argv`` on ``host`` in the current folder. A node of a job (``tty``) goes through
    :mod:`cluster.remote`: ``ssh -tt`` (closing the connection, as ``orch cancel`` does, hangs up
    the remote torchrun too) with keep-alives, and one line naming the host when it is lost. A
    command whose output is read (``tty=False``) is plain ssh: a terminal mixes stderr into it."""
    if tty:
        return [sys.executable, "-m", "cluster.remote", host, remote_command(argv, env)]
    return remote_ssh_argv(host, remote_command(argv, env), tty=False)


def master_address(job: JobSpec, hosts: Sequence[str]) -> str:
    """The rendezvous address of a job on ``hosts``: 127.0.0.1 when every host is this machine,
    else the first host's address as this machine resolves it (an address, so that no node maps it
    to its own loopback: Debian's ``127.0.1.1 <own name>``). A name that does not resolve here is
    kept (the nodes may know it); one that resolves to loopback only is refused."""
    if all(is_local_host(h) for h in hosts):
        return "127.0.0.1"
    if hosts[0] in LOCAL_NAMES:
        raise LaunchError(f"job {job.name}: remote nodes cannot reach the master as {hosts[0]!r}; "
                          "name the first host by its network name or pass --master-addr")
    try:
        return resolve_reachable(hosts[0])
    except ClusterError as err:
        if "does not resolve" in str(err):
            return hosts[0]
        raise LaunchError(f"job {job.name}: {err} (--master-addr ADDRESS)") from None


def interface_text(addr: str, host: str, local: bool) -> str:
    """The interface a node will use towards the master, for the dry run: known here for this
    machine, else found on the node at start (and printed in the job's log)."""
    if local:
        try:
            return "{} ({})".format(*route_interface(addr))
        except ClusterError as err:
            return f"none: {err}"
    return f"the route to {addr} on {host} (said in the log at start)"


def layout(job: JobSpec) -> tuple[int, int]:
    """(nodes, processes per node): ``resources.layout()``, with the hosts counting as nodes when
    ``--nodes`` is not given; LaunchError when the hosts and the layout disagree."""
    res = job.experiment.resources
    hosts = res.torchrun.hosts
    if hosts and res.nodes is None and res.gpus_per_node is None:
        res = dataclasses.replace(res, nodes=len(hosts))
    nodes, nproc = res.layout()
    if hosts and len(hosts) != nodes:
        raise LaunchError(f"job {job.name}: --hosts names {len(hosts)} hosts but the job spans {nodes} node(s)")
    return nodes, nproc


class TorchrunLauncher(LocalLauncher):
    """Backend ``torchrun``: c10d rendezvous on one node or several (ssh, or by hand). Its jobs
    run under the local backend's supervisor (device and port leases, records, cancel), so it is
    the local launcher with other command lines."""

    name: ClassVar[str] = "torchrun"

    def plan(self, jobs: Sequence[JobSpec]) -> NodePlan:
        """Pure: the exact per-node command lines of every job."""
        lines, entries = [], []
        for index, job in enumerate(jobs):
            text, entry = self._plan_one(index, job)
            lines += [""] * bool(lines) + [text]  # a blank line between jobs
            entries.append(entry)
        return NodePlan(self.name, tuple(jobs), node_request(jobs, entries, None), tuple(lines))

    def _plan_one(self, index: int, job: JobSpec) -> tuple[str, NodeJob]:
        opts = job.experiment.resources.torchrun
        nodes, nproc = layout(job)
        env = base_env(job)
        head = f"# orch torchrun plan: job {job.name}: {nodes} node(s) x {nproc} process(es) = world size {nodes * nproc}"
        port_text = str(opts.rdzv_port) if opts.rdzv_port else "{port}"
        port = PortRule("fixed", port=opts.rdzv_port) if opts.rdzv_port else PortRule("lease")
        if opts.node_rank is not None:
            if nodes > 1 and not (opts.master_addr and opts.rdzv_port):
                raise LaunchError(
                    f"job {job.name}: --node-rank {opts.node_rank} starts one node of {nodes}; every node needs the "
                    "same rendezvous address: pass --master-addr HOST and --set resources.torchrun.rdzv_port=PORT"
                )
            if not 0 <= opts.node_rank < nodes:
                raise LaunchError(f"job {job.name}: --node-rank {opts.node_rank} is outside 0..{nodes - 1}")
            addr = opts.master_addr or "127.0.0.1"
            argv = torchrun_argv(job, nodes, nproc, f"{addr}:{port_text}")
            lines = [head, f"# this node only (node {opts.node_rank} of {nodes}); run the same line on every node:",
                     format_command(argv, env)]
            commands = [NodeCommand(tuple(argv), env, procs=nproc)]
        elif nodes == 1 or opts.hosts:
            hosts = opts.hosts or ("127.0.0.1",)
            addr = opts.master_addr or master_address(job, hosts)
            if not opts.rdzv_port and not is_local_host(hosts[0] if not opts.master_addr else addr):
                probe = hosts[0] if not opts.master_addr else addr
                port = PortRule("probe", host=probe, argv=tuple(ssh_argv(probe, [sys.executable, "-m", "cluster.ports"], {}, tty=False)))
            argv = torchrun_argv(job, nodes, nproc, f"{addr}:{port_text}", several=nodes > 1)
            if nodes > 1:  # each node first finds (and says) its way to the master: cluster.reach
                argv = [sys.executable, "-m", "cluster.reach", "--master", opts.master_addr or hosts[0], "--addr", addr,
                        "--port", port_text, "--"] + argv
            lines, commands = [head], []
            for rank, host in enumerate(hosts):
                local = is_local_host(host)
                run = argv if local else ssh_argv(host, argv, env)
                commands.append(NodeCommand(tuple(run), env if local else {}, procs=nproc, local=local))
                lines += [f"# node {rank} ({host}{'' if local else ', over ssh'}): rendezvous {addr}:{port_text}"
                          + (f", interface {interface_text(addr, host, local)}" if nodes > 1 else ""),
                          format_command(run, commands[-1].env)]
            if nodes > 1:
                lines.append("# {node_addr}: the node's own address towards the master, filled in on the node by "
                             "cluster.reach, which also sets GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME (unless set) and "
                             "fails the job at once when the node cannot reach the master")
        else:
            addr = opts.master_addr or "{master_addr}"
            argv = torchrun_argv(job, nodes, nproc, f"{addr}:{port_text}")
            lines = [head] + [f"# node {rank}:\n{format_command(argv, env)}" for rank in range(nodes)]
            lines.append("# to run: --hosts h1,h2,... (ssh), or on each node --node-rank i --master-addr H "
                         "--set resources.torchrun.rdzv_port=P")
            commands = []
        if "{port}" in "\n".join(lines):
            lines.append("# {port}: chosen at launch on the master, bind-checked (and leased when the master is this machine); "
                         "fix it with --set resources.torchrun.rdzv_port=P")
        lines.append("# torchrun assigns node ranks at rendezvous (it ignores --node_rank with c10d)")
        slots = sum(c.procs for c in commands if c.local)
        entry = NodeJob(index=index, name=job.name, slots=slots, commands=tuple(commands), port=port,
                        runnable=bool(commands))
        return "\n".join(lines), entry

    def preflight(self, plan: NodePlan, wait_s: float = 0.0) -> None:
        """Refuse, before any file or MLflow run exists, a job that spans several nodes with no way
        to start them (``plan`` keeps it, so that ``--dry-run`` prints the per-node lines), then
        check this node's capacity like the local backend."""
        for entry in plan.request.jobs:
            if not entry.runnable:
                raise LaunchError(
                    f"job {entry.name} spans several nodes: give --hosts h1,h2,... to start them "
                    "over ssh, or start each node with --node-rank i --master-addr H (orch submit --dry-run prints the lines)"
                )
        super().preflight(plan, wait_s)
