#!/usr/bin/env python3
"""A real Slurm cluster on this one machine, for orch's tests and for trying orch on Slurm.

    python scripts/local_slurm.py up [--nodes 1|2] [--gpus-per-node G] [--no-accounting]
                                     [--state-dir DIR]
    eval "$(python scripts/local_slurm.py env)"      # export SLURM_CONF=...
    python scripts/local_slurm.py status
    python scripts/local_slurm.py down              # stop every daemon, wipe all state
    python scripts/local_slurm.py up --hosts-from /run/orch-hosts --state-dir DIR
                                    # one slurmd per host of scripts/local_hosts.py

``up`` installs Debian's Slurm and munge (and slurmdbd + MariaDB for ``--accounting``, so that
``sacct`` works) with apt-get when they are missing, writes ``slurm.conf`` with the partitions
``dev`` (default, no time limit) and ``debug`` (MaxTime 1 h) under the state dir, starts the
daemons directly (no systemd), and returns once every node is idle. Ports are chosen at run time, so it never clashes with
another cluster or service; ``up`` again with the same options does nothing, with other options
it restarts from scratch. Fake GPUs are GRES whose files are symlinks to /dev/null (Slurm only
sets CUDA_VISIBLE_DEVICES for character devices). Needs root: apt-get installs the packages,
/etc/hosts gets the node names, munged and MariaDB are started as their own users (munge,
mysql), and slurmd runs as root to start jobs as the user who submitted them. As root it uses a
state dir only after ``local_slurm_state`` checked it (no symlink, ours, writable by no one else).
Standard library only. Facts behind every setting: shared/LOCAL_SLURM.md.

With ``--hosts-from`` (the state dir of ``scripts/local_hosts.py``) the nodes are those hosts,
named as they are (h1, h2, ...; /etc/hosts is left alone), each slurmd started inside its host
with ``NodeAddr`` its own address; slurmctld (and slurmdbd, MariaDB) stay on this machine and are
reached at its bridge address. A host that stops answering is down after ``SlurmdTimeout=20`` s
and its jobs fail (``JobRequeue=0``) instead of waiting for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

# Next to this file; `python scripts/local_slurm.py` puts scripts/ first on sys.path.
import local_hosts
from local_slurm_state import (UnsafeStateDir, check_removable, check_state_dir, make_state_dir,
                               remove_state_dir, state_path)

DEFAULT_STATE_DIR = os.environ.get("ORCH_SLURM_DIR", "/tmp/orch-slurm")
SLURM_PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
ACCOUNTING_PACKAGES = ["slurmdbd", "mariadb-server", "mariadb-client"]
HOSTS_MARKER = "# orch local slurm"
CPUS_PER_NODE = 4  # advertised (config_overrides): lets arrays and 2-rank jobs run side by side
MEM_PER_NODE_MB = 8000
# Daemons in stop order (jobs' nodes first, the database last).
DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")


class SetupError(RuntimeError):
    """The cluster could not be started; the message says which step failed."""


def _log(message: str) -> None:
    print(f"local_slurm: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], check: bool = True, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the daemons bind it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------- install
def ensure_packages(accounting: bool) -> None:
    """apt-get install what is missing (non-interactive; service starts fail harmlessly)."""
    wanted = SLURM_PACKAGES + (ACCOUNTING_PACKAGES if accounting else [])
    missing = [p for p in wanted if _run(["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout.strip() != "install ok installed"]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SetupError(f"packages {missing} are missing and apt-get is not available; install Slurm by hand")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _log(f"installing {' '.join(missing)} (apt-get)")
    # Wait for apt's locks rather than fail: another installer (a test installing chromium) may hold them.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "-q"]
    _run([*apt, "update"], env=env, timeout=1200)
    _run([*apt, "install", "-y", "--no-install-recommends", *missing], env=env, timeout=1200)


# ----------------------------------------------------------------------------------- config
def _hostname() -> str:
    return socket.gethostname()


def load_hosts(hosts_from: str | None) -> list[dict] | None:
    """The hosts (name, addr) of a scripts/local_hosts.py state dir, with the machine's bridge
    address as ``ctld``; None without ``--hosts-from``."""
    if not hosts_from:
        return None
    path = Path(hosts_from) / "hosts.json"
    if not path.exists():
        raise SetupError(f"--hosts-from {hosts_from}: no hosts.json; bring them up with scripts/local_hosts.py up")
    state = json.loads(path.read_text())
    return [dict(h, ctld=state["bridge_addr"], hosts_from=str(hosts_from)) for h in state["hosts"]]


def node_names(nodes: int, hosts: list[dict] | None) -> list[str]:
    return [h["name"] for h in hosts] if hosts else [f"node{i + 1}" for i in range(nodes)]


def write_config(state: Path, nodes: int, gpus_per_node: int, accounting: bool, hosts: list[dict] | None = None,
                 max_array_size: int | None = None) -> dict:
    """Write slurm.conf (+ gres.conf, slurmdbd.conf) under ``state``; return the chosen ports."""
    ports = {"ctld": free_port(), "nodes": [free_port() for _ in range(nodes)]}
    for sub in ("spool", "log", "run", "slurmd", "gpus"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    names = node_names(nodes, hosts)
    for name in names:
        (state / "slurmd" / name).mkdir(exist_ok=True)
    gres = f" Gres=gpu:{gpus_per_node}" if gpus_per_node else ""
    lines = [
        "ClusterName=orchlocal",
        f"SlurmctldHost=localhost({hosts[0]['ctld'] if hosts else '127.0.0.1'})",
        f"SlurmctldPort={ports['ctld']}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "AuthInfo=cred_expire=10",  # a requeued job may start again after 11 s, not 121 s
        f"StateSaveLocation={state / 'spool'}",
        f"SlurmdSpoolDir={state / 'slurmd' / '%n'}",
        f"SlurmctldPidFile={state / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={state / 'run' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={state / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={state / 'log' / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroups here
        "TaskPlugin=task/none",
        "SlurmdParameters=config_overrides",  # advertise CPUs/memory we do not physically have
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=500",  # without it each job takes a whole node's memory
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1",
        "EnforcePartLimits=ALL",  # impossible requests fail at submit instead of pending forever
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=300",
        "MailProg=/bin/true",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
    ]
    if hosts:  # a host that stops answering is DOWN in ~30 s, not 300, and its jobs fail (no requeue by default)
        lines += ["SlurmdTimeout=20", "MessageTimeout=5", "JobRequeue=0"]
    if gpus_per_node:
        lines.append("GresTypes=gpu")
    if max_array_size:  # a site's lower limit (Slurm's default is 1001: indices 0..1000)
        lines.append(f"MaxArraySize={max_array_size}")
    if accounting:
        ports["dbd"] = free_port()
        ports["mysql"] = free_port()
        lines += [
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={ports['dbd']}",
        ]
    else:
        lines.append("AccountingStorageType=accounting_storage/none")
    addrs = [h["addr"] for h in hosts] if hosts else ["127.0.0.1"] * nodes
    for name, port, addr in zip(names, ports["nodes"], addrs):
        lines.append(
            f"NodeName={name} NodeHostname={name if hosts else _hostname()} NodeAddr={addr} Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory={MEM_PER_NODE_MB}{gres} State=UNKNOWN"
        )
    # debug has a time limit, as real clusters' short partitions do (tests of --time > MaxTime).
    for partition, default, max_time in (("dev", "YES", "INFINITE"), ("debug", "NO", "01:00:00")):
        lines.append(f"PartitionName={partition} Nodes=ALL Default={default} MaxTime={max_time} State=UP")
    (state / "slurm.conf").write_text("\n".join(lines) + "\n")

    gres_lines = ["AutoDetect=off"]
    if gpus_per_node:
        for name in names:
            for i in range(gpus_per_node):
                dev = state / "gpus" / f"{name}-nvidia{i}"
                if not dev.is_symlink():
                    dev.symlink_to("/dev/null")  # a character device: Slurm then sets CUDA_VISIBLE_DEVICES
            gres_lines.append(f"NodeName={name} Name=gpu File={state / 'gpus'}/{name}-nvidia[0-{gpus_per_node - 1}]")
    (state / "gres.conf").write_text("\n".join(gres_lines) + "\n")

    if accounting:
        dbd = state / "slurmdbd.conf"
        dbd.write_text(
            "\n".join([
                "AuthType=auth/munge",
                "DbdHost=localhost",
                "DbdAddr=127.0.0.1",
                f"DbdPort={ports['dbd']}",
                "SlurmUser=root",
                f"PidFile={state / 'run' / 'slurmdbd.pid'}",
                f"LogFile={state / 'log' / 'slurmdbd.log'}",
                "StorageType=accounting_storage/mysql",
                "StorageHost=127.0.0.1",
                f"StoragePort={ports['mysql']}",
                "StorageUser=slurm",
                "StoragePass=orchlocal",
                "StorageLoc=slurm_acct_db",
            ]) + "\n"
        )
        dbd.chmod(0o600)  # slurmdbd refuses a readable config (it holds a password)
    return ports


def ensure_hosts(nodes: int) -> None:
    """node1/node2 must resolve: the first one becomes MASTER_ADDR of a job."""
    names = [f"node{i + 1}" for i in range(nodes)]
    text = Path("/etc/hosts").read_text()
    if all(_resolves(n) for n in names):
        return
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"{'' if text.endswith(chr(10)) else chr(10)}127.0.0.1 {' '.join(names)} {HOSTS_MARKER}\n")


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def remove_hosts() -> None:
    try:
        lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
        kept = [line for line in lines if HOSTS_MARKER not in line]
        if kept != lines:
            Path("/etc/hosts").write_text("".join(kept))
    except OSError as err:
        _log(f"could not clean /etc/hosts: {err}")


# ----------------------------------------------------------------------------------- daemons
def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child of ours counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def running_clusters() -> list[Path]:
    """State dirs of the local clusters whose slurmctld is running (from its ``-f <state>/slurm.conf``;
    a slurmctld started otherwise counts, as ``Path()``: never a folder to write to)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        argv = process.info["cmdline"] or []
        if argv and os.path.basename(argv[0]) == "slurmctld" and process.info["status"] != psutil.STATUS_ZOMBIE:
            conf = argv[argv.index("-f") + 1] if "-f" in argv[:-1] else ""
            found.append(Path(conf).parent if conf else Path())
    return found


def other_slurmctld() -> bool:
    """A slurmctld is running (another local cluster; ours is stopped when this is asked)."""
    return bool(running_clusters())


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    tail = ""
    if log is not None and log.exists():
        tail = " | log: " + " / ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    raise SetupError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_munge(state: Path) -> None:
    """Reuse a working munged; otherwise start the system one (its socket is what Slurm uses)."""
    if _run(["bash", "-c", "munge -n | unmunge"], check=False).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run(["mungekey", "--create", "--keyfile", str(key)] if shutil.which("mungekey") else
             ["bash", "-c", f"dd if=/dev/urandom bs=1 count=1024 of={key} 2>/dev/null"])
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    # Not one test session's process: the machine's one munged serves every local cluster and is
    # handed to the last one running (see stop()), which may belong to another session.
    _run(["runuser", "-u", "munge", "--", "munged"], env={k: v for k, v in os.environ.items() if k != "ORCH_TEST_SESSION"})
    pid = _read_pid(Path("/run/munge/munged.pid"))
    if pid:
        (state / "run" / "munged.pid").write_text(str(pid))  # ours: `down` stops it
    _wait(lambda: _run(["bash", "-c", "munge -n | unmunge"], check=False).returncode == 0, 15, "munge")


def start_mariadb(state: Path, port: int) -> None:
    """A private MariaDB (datadir under the state dir, loopback only) for slurmdbd."""
    datadir, sock = state / "mariadb", state / "run" / "mysqld.sock"
    # Its own temporary folder: two clusters brought up at once (parallel test workers) both
    # used the machine's /tmp, and mariadb-install-db failed in one of them ("Could not remove
    # temporary table '/tmp/#sql-temptable-...'").
    tmpdir = state / "mariadb-tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    shutil.chown(tmpdir, "mysql", "mysql")
    tmpdir.chmod(0o700)
    if not datadir.exists():
        datadir.mkdir(parents=True)
        shutil.chown(datadir, "mysql", "mysql")
        install = shutil.which("mariadb-install-db") or "mysql_install_db"
        _run([install, "--no-defaults", f"--datadir={datadir}", "--user=mysql", f"--tmpdir={tmpdir}",
              "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120,
             env=dict(os.environ, TMPDIR=str(tmpdir)))
    shutil.chown(state / "run", "mysql", "mysql")  # socket and pid file live there
    server = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    log = state / "log" / "mariadb.log"
    subprocess.Popen(
        [server, "--no-defaults", "--user=mysql", f"--datadir={datadir}", f"--port={port}",
         "--bind-address=127.0.0.1", f"--socket={sock}", f"--pid-file={state / 'run' / 'mariadbd.pid'}",
         f"--tmpdir={tmpdir}",
         f"--log-error={log}", "--innodb-buffer-pool-size=64M", "--skip-name-resolve"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _wait(lambda: sock.exists() and _port_open(port), 60, "MariaDB", log)
    client = shutil.which("mariadb") or "mysql"
    sql = ("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'orchlocal'; "
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
    _run([client, "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql])


def start_slurm(state: Path, nodes: int, accounting: bool, ports: dict, hosts: list[dict] | None = None) -> None:
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    conf = str(state / "slurm.conf")
    if accounting:
        _run(["slurmdbd"], env=env)
        _wait(lambda: _port_open(ports["dbd"]), 30, "slurmdbd", state / "log" / "slurmdbd.log")
    _run(["slurmctld", "-f", conf], env=env)
    _wait(lambda: _port_open(ports["ctld"]), 30, "slurmctld", state / "log" / "slurmctld.log")
    for i, name in enumerate(node_names(nodes, hosts)):
        # In host mode inside the host (its network, hostname and /etc/hosts): nsenter.
        inside = local_hosts.enter(name) if hosts else []
        _run(inside + ["slurmd", "-f", conf, "-N", name], env=env)


def nodes_idle(state: Path) -> bool:
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    proc = _run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, env=env, timeout=20)
    states = [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode == 0 and bool(states) and all(s in ("idle", "mixed", "allocated") for s in states)


def running_daemons(state: Path) -> dict[str, int]:
    """Daemons of this state dir that are alive, by pid-file name."""
    alive = {}
    for pid_file in sorted((state / "run").glob("*.pid")) if (state / "run").exists() else []:
        pid = _read_pid(pid_file)
        if pid and _pid_alive(pid):
            alive[pid_file.stem] = pid
    return alive


def _cancel_jobs(conf: Path) -> None:
    """Cancel every job of the cluster at ``conf`` and wait (15 s at most) until none is left."""
    env = dict(os.environ, SLURM_CONF=str(conf))
    _run(["scancel", "--full", "--user", os.environ.get("USER", "root")], check=False, env=env, timeout=20)
    ids = _run(["squeue", "-h", "-o", "%i"], check=False, env=env, timeout=20).stdout.split()
    if ids:
        _run(["scancel", *ids], check=False, env=env, timeout=20)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _run(["squeue", "-h", "-o", "%i"], check=False, env=env, timeout=20).stdout.strip():
            time.sleep(0.5)


def stop(state: Path) -> None:
    """Cancel jobs, stop this state dir's daemons (TERM, then KILL) and wipe the state dir.
    Raises UnsafeStateDir, before anything is read, for a folder local_slurm_state refuses."""
    check_removable(state)
    conf = state / "slurm.conf"
    daemons = running_daemons(state)
    if conf.exists() and any(name.startswith("slurmctld") for name in daemons):
        try:
            _cancel_jobs(conf)
        except subprocess.TimeoutExpired as err:  # a slurmctld that does not answer is stopped all the same
            _log(f"{err}; stopping the daemons")
    # The machine has one munged (its socket is what every Slurm uses): while another local cluster
    # runs, ours hands it over (that cluster's `down` stops it) instead of pulling it from under it.
    heirs = [other for other in running_clusters() if other.is_absolute() and other != state and (other / "run").is_dir()]
    if "munged" in daemons and heirs:
        (heirs[0] / "run" / "munged.pid").write_text(str(daemons.pop("munged")))
    for prefix in DAEMONS:
        for name, pid in daemons.items():
            if name.startswith(prefix):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_pid_alive(p) for n, p in daemons.items() if n.startswith(prefix)):
            time.sleep(0.2)
        for name, pid in daemons.items():
            if name.startswith(prefix) and _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    # Slurm state and the accounting database go together: a kept DB with fresh job ids makes
    # sacct report an old job's final state for a new job.
    if not remove_state_dir(state):
        _log(f"could not remove all of {state}")
    # node1/node2 are every local cluster's names: another one still up (another test session)
    # needs them to resolve, or its jobs' ranks wait forever for MASTER_ADDR node1.
    if not other_slurmctld():
        remove_hosts()


# ----------------------------------------------------------------------------------- commands
def up(state: Path, nodes: int, gpus_per_node: int, accounting: bool, hosts: list[dict] | None = None,
       max_array_size: int | None = None) -> None:
    """Start (or keep) the cluster described by the options; return when every node is idle."""
    nodes = len(hosts) if hosts else nodes
    options = {"nodes": nodes, "gpus_per_node": gpus_per_node, "accounting": accounting,
               **({"hosts": hosts} if hosts else {})}
    if max_array_size:
        options["max_array_size"] = max_array_size
    meta = state / "cluster.json"
    if meta.exists() and json.loads(meta.read_text()).get("options") == options and nodes_idle(state):
        _log(f"already up ({state})")
        return
    if state.exists():
        stop(state)
    ensure_packages(accounting)
    make_state_dir(state)
    started = time.monotonic()
    ports = write_config(state, nodes, gpus_per_node, accounting, hosts, max_array_size)
    meta.write_text(json.dumps({"options": options, "ports": ports}, indent=1))
    if not hosts:  # the hosts of local_hosts resolve already
        ensure_hosts(nodes)
    try:
        start_munge(state)
        if accounting:
            start_mariadb(state, ports["mysql"])
        start_slurm(state, nodes, accounting, ports, hosts)
        _wait(lambda: nodes_idle(state), 60, "idle nodes (sinfo)", state / "log" / "slurmctld.log")
    except Exception:
        _log("start failed; stopping what was started")
        logs = state / "log"
        for log in sorted(logs.glob("*.log")) if logs.exists() else []:
            _log(f"--- {log.name}: " + " / ".join(log.read_text(errors="replace").splitlines()[-3:]))
        stop(state)
        raise
    _log(f"up in {time.monotonic() - started:.1f} s: {nodes} node(s), {gpus_per_node} fake GPU(s) each, "
         f"accounting {'on' if accounting else 'off'}")


def env_line(state: Path) -> str:
    return f"export SLURM_CONF={state / 'slurm.conf'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--nodes", type=int, choices=[1, 2], default=1)
    parser.add_argument("--gpus-per-node", type=int, default=2, help="fake GPUs (GRES) per node; 0 = none")
    parser.add_argument("--accounting", action=argparse.BooleanOptionalAction, default=True,
                        help="slurmdbd + MariaDB so that sacct works (default: on)")
    parser.add_argument("--max-array-size", type=int, default=None,
                        help="slurm.conf MaxArraySize (default: Slurm's 1001)")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"all state and logs (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--hosts-from", metavar="DIR", help="one node per host of scripts/local_hosts.py (its --state-dir)")
    args = parser.parse_args(argv)
    try:
        state = state_path(args.state_dir)
        if args.command != "env":
            check_state_dir(state)  # before root reads or writes anything in it
        if args.command == "up":
            if os.geteuid() != 0:
                raise SetupError("run as root: it installs packages, edits /etc/hosts and starts daemons")
            up(state, args.nodes, args.gpus_per_node, args.accounting, load_hosts(args.hosts_from), args.max_array_size)
            print(env_line(state))
        elif args.command == "down":
            stop(state)
            _log(f"down; {state} removed")
        elif args.command == "env":
            print(env_line(state))
        else:
            daemons = running_daemons(state)
            print(f"state dir: {state}")
            print("daemons: " + (", ".join(f"{n}={p}" for n, p in daemons.items()) or "none"))
            if (state / "slurm.conf").exists() and daemons:
                env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
                print(_run(["sinfo"], check=False, env=env).stdout, end="")
                print(env_line(state))
            return 0 if daemons else 1
    except (SetupError, local_hosts.SetupError, UnsafeStateDir, subprocess.TimeoutExpired) as err:
        _log(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
