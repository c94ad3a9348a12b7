#!/usr/bin/env python3
"""Several real hosts on this one machine: network namespaces on a private bridge, for orch's
multi-node tests and for trying a multi-node job without a cluster.

    python scripts/local_hosts.py up [--hosts N] [--subnet 10.213.19.0/24] [--state-dir DIR]
    python scripts/local_hosts.py status
    python scripts/local_hosts.py exec h1 -- hostname     # a command inside host h1
    python scripts/local_hosts.py down                   # also after a crash

Each host ``h1..hN`` gets its own network stack (a namespace with ``eth0``, a veth whose other end
is on the bridge ``orchhosts0``), its own address (``.11``, ``.12``, ... of the subnet; this
machine is ``.1`` on the bridge), its own hostname (a UTS namespace kept by one long-lived process
per host, entered with ``nsenter``), its own ``/etc/hosts`` (``/etc/netns/<name>/hosts``: every
host's name and address, plus, on purpose, Debian's ``127.0.1.1 <own name>`` line, so that the
classic multi-node trap is present) and its own sshd, listening on its address only, key
authentication only, for one key generated here. The filesystem is this machine's, shared, as NFS
homes are on a cluster. ``up`` also adds the host names to this machine's /etc/hosts and an
``Include`` of the generated ssh config to ``~/.ssh/config`` (so ``ssh h1`` works), both marked
and removed by ``down``.

The subnet must be private (RFC 1918) and overlap no address or route of this machine; the hosts
get no default route, so nothing they send can leave the bridge (checked after ``up``: the script
refuses otherwise). ``up`` again with the same options does nothing; with others it starts over.
Root only; the state dir (default /run/orch-hosts) is checked like local_slurm's (no symlink,
ours, writable by no one else). Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from local_slurm_state import UnsafeStateDir, check_removable, make_state_dir, remove_state_dir, state_path

DEFAULT_STATE_DIR = os.environ.get("ORCH_HOSTS_DIR", "/run/orch-hosts")
DEFAULT_SUBNET = "10.213.19.0/24"
BRIDGE = "orchhosts0"
MARKER = "# orch local hosts"
SSH_CONFIG = Path.home() / ".ssh" / "config"


class SetupError(RuntimeError):
    """The hosts could not be brought up; the message says which step failed."""


def _log(message: str) -> None:
    print(f"local_hosts: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


def layout(hosts: int, subnet: str) -> dict:
    """The names and addresses of ``hosts`` hosts on ``subnet`` (pure)."""
    net = ipaddress.ip_network(subnet)
    if not net.is_private or net.version != 4 or net.prefixlen > 27:
        raise SetupError(f"--subnet {subnet} must be a private IPv4 network of /27 or larger (e.g. {DEFAULT_SUBNET})")
    addr = [str(a) for a in net.hosts()]
    return {
        "subnet": str(net), "bridge": BRIDGE, "bridge_addr": addr[0],
        "hosts": [{"name": f"h{i + 1}", "addr": addr[10 + i], "veth": f"orchv-h{i + 1}"} for i in range(hosts)],
    }


def check_subnet_free(subnet: str) -> None:
    """Refuse a subnet that overlaps an address or route of this machine (outside our bridge):
    the hosts' traffic must have nowhere to go but the bridge."""
    net = ipaddress.ip_network(subnet)
    routes = _run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines()
    addrs = _run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines()
    for line in routes + addrs:
        if f" {BRIDGE} " in f" {line} ":
            continue
        for word in line.split():
            try:
                other = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if other.version == 4 and other.prefixlen > 0 and net.overlaps(other):
                raise SetupError(f"--subnet {subnet} overlaps {other} of this machine ({line.strip()}); pick another private subnet")


def check_isolated(state: dict) -> None:
    """Every host's routes stay on the subnet (no default route, no gateway), and the bridge holds
    only our veths: nothing a host sends can leave this machine."""
    net = ipaddress.ip_network(state["subnet"])
    for host in state["hosts"]:
        for line in _run(["ip", "-n", host["name"], "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines():
            words = line.split()
            if words[0] in ("local", "broadcast") or " dev lo " in f" {line} ":
                continue
            if words[0] == "default" or "via" in words or not ipaddress.ip_network(words[0], strict=False).subnet_of(net):
                raise SetupError(f"host {host['name']} has a route off the subnet ({line.strip()}); refusing")
    members = _run(["ip", "-o", "link", "show", "master", state["bridge"]]).stdout
    ours = {h["veth"] for h in state["hosts"]}
    for line in members.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name not in ours:
            raise SetupError(f"bridge {state['bridge']} has a foreign member {name} (a possible uplink); refusing")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, mode)


def hosts_text(state: dict, own: str) -> str:
    """``/etc/hosts`` of host ``own``: Debian's lines (``127.0.1.1 <own name>`` included, the trap)
    then every host's name and address and this machine's name on the bridge."""
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{own}", f"{state['bridge_addr']}\t{socket.gethostname()}-bridge"]
    lines += [f"{h['addr']}\t{h['name']}" for h in state["hosts"]]
    return "\n".join(lines) + "\n"


def sshd_config(state_dir: Path, host: dict) -> str:
    """One host's sshd: its address only, the generated key only."""
    d = state_dir / host["name"]
    return "\n".join([
        f"ListenAddress {host['addr']}:22", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {state_dir / 'authorized_keys'}", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "UsePAM no", "PrintMotd no", "AcceptEnv ORCH_* GLOO_* NCCL_*",
        # A client that stopped answering (this machine cut off) ends its session, and with it the
        # job's processes on this host, in 15 s, as on a cluster whose sshd does the same.
        "ClientAliveInterval 5", "ClientAliveCountMax 3", "",
    ])


def ssh_client_config(state_dir: Path, state: dict) -> str:
    """What ``ssh h1`` needs here: the address, the key, the known host keys."""
    out = []
    for h in state["hosts"]:
        out += [f"Host {h['name']} {h['addr']}", f"  HostName {h['addr']}", "  User root",
                f"  IdentityFile {state_dir / 'id_ed25519'}", "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {state_dir / 'known_hosts'}", "  StrictHostKeyChecking yes",
                "  ConnectTimeout 5", "  LogLevel ERROR", ""]
    return "\n".join(out)


def keeper_pid(name: str) -> int | None:
    """The pid of the process that keeps host ``name``'s hostname (UTS namespace) alive."""
    for pid in _netns_pids(name):
        try:
            if psutil.Process(pid).cmdline()[:2] == [f"orch-host-{name}", "infinity"]:
                return pid
        except psutil.Error:
            continue
    return None


def _netns_pids(name: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def enter(name: str) -> list[str]:
    """The command prefix that runs a command inside host ``name`` (its network, hostname and
    /etc/hosts): ``nsenter`` into its keeper process."""
    pid = keeper_pid(name)
    if pid is None:
        raise SetupError(f"host {name} is not up; run: python scripts/local_hosts.py up")
    return ["nsenter", "-t", str(pid), "--net", "--uts", "--mount", f"--wd={os.getcwd()}", "--"]


def cgroup_mounts() -> str:
    """Shell commands that mount this machine's /sys/fs/cgroup hierarchies again (its mount table)."""
    out = []
    for mount in psutil.disk_partitions(all=True):
        source, target, fstype, options = mount.device, mount.mountpoint, mount.fstype, mount.opts
        if target == "/sys/fs/cgroup" or target.startswith("/sys/fs/cgroup/"):
            out.append(f"mkdir -p {target} && mount -t {fstype} -o {options} {source} {target};")
    return " ".join(out)


def _start_host(state_dir: Path, state: dict, host: dict) -> None:
    name, veth = host["name"], host["veth"]
    netns = Path("/etc/netns") / name
    netns.mkdir(parents=True, exist_ok=True)
    _write(netns / "hosts", hosts_text(state, name))
    _write(netns / "hostname", name + "\n")
    _run(["ip", "netns", "add", name])
    _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"])
    _run(["ip", "link", "set", f"{veth}p", "netns", name])
    _run(["ip", "link", "set", veth, "master", state["bridge"], "up"])
    prefix = ipaddress.ip_network(state["subnet"]).prefixlen
    for cmd in (["link", "set", "lo", "up"], ["link", "set", f"{veth}p", "name", "eth0"],
                ["addr", "add", f"{host['addr']}/{prefix}", "dev", "eth0"], ["link", "set", "eth0", "up"]):
        _run(["ip", "-n", name] + cmd)
    # The keeper: a process in the host's namespaces whose mount namespace (made by `ip netns exec`)
    # has /etc/netns/<name>/* bound over /etc, and whose UTS namespace holds the hostname.
    # `ip netns exec` mounts a fresh /sys there, without this machine's cgroup mounts, which slurmd
    # needs: mount the same hierarchies again (cgroup mounts of one hierarchy share their groups).
    keep = f"hostname {name} && {{ {cgroup_mounts()} true; }} && exec -a orch-host-{name} sleep infinity"
    subprocess.Popen(["ip", "netns", "exec", name, "unshare", "--uts", "--", "bash", "-c", keep],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(lambda: keeper_pid(name) is not None, 10, f"host {name}'s keeper process")
    d = state_dir / name
    d.mkdir(mode=0o700, exist_ok=True)
    if not (d / "host_key").exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / "host_key")])
    _write(d / "sshd_config", sshd_config(state_dir, host), 0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    _run(enter(name) + ["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
    _wait(lambda: _port_open(host["addr"], 22), 10, f"sshd of {name} on {host['addr']}:22")


def _port_open(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SetupError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.2)


def _edit_marked(path: Path, state_dir: Path, new_lines: list[str], top: bool = False) -> None:
    """Replace the lines of ``path`` marked as this state dir's by ``new_lines`` (at the top or the end)."""
    marker = f"{MARKER} {state_dir}"
    text = path.read_text() if path.exists() else ""
    kept = [line for line in text.splitlines(keepends=True) if not line.rstrip().endswith(marker)]
    added = [f"{line}  {marker}\n" for line in new_lines]
    result = "".join(added + kept if top else kept + added)
    if result != text:
        path.write_text(result)


def up(state_dir: Path, hosts: int, subnet: str) -> dict:
    """Bring ``hosts`` hosts up (idempotent); returns the state."""
    want = layout(hosts, subnet)
    state_file = state_dir / "hosts.json"
    if state_file.exists():
        have = json.loads(state_file.read_text())
        if {k: have.get(k) for k in want} == want and not problems(have):
            _log(f"{hosts} host(s) already up")
            return have
        down(state_dir)
    taken = set(_run(["ip", "netns", "list"]).stdout.split()) & {h["name"] for h in want["hosts"]}
    if taken or _run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        raise SetupError(f"hosts {', '.join(sorted(taken)) or '(bridge ' + BRIDGE + ')'} exist already, not made with "
                         f"--state-dir {state_dir}: take them down with the --state-dir that made them")
    check_subnet_free(subnet)
    make_state_dir(state_dir)
    if not (state_dir / "id_ed25519").exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "orch-local-hosts", "-f", str(state_dir / "id_ed25519")])
    _write(state_dir / "authorized_keys", (state_dir / "id_ed25519.pub").read_text(), 0o600)
    _write(state_dir / "hosts.json", json.dumps(want, indent=1))  # written first: down finds a half-made set
    prefix = ipaddress.ip_network(subnet).prefixlen
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "add", f"{want['bridge_addr']}/{prefix}", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    for host in want["hosts"]:
        _start_host(state_dir, want, host)
    check_isolated(want)
    known = [f"{h['name']},{h['addr']} {(state_dir / h['name'] / 'host_key.pub').read_text().split()[0]} "
             f"{(state_dir / h['name'] / 'host_key.pub').read_text().split()[1]}" for h in want["hosts"]]
    _write(state_dir / "known_hosts", "\n".join(known) + "\n")
    _write(state_dir / "ssh_config", ssh_client_config(state_dir, want), 0o644)
    SSH_CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
    _edit_marked(SSH_CONFIG, state_dir, [f"Include {state_dir / 'ssh_config'}"], top=True)
    _edit_marked(Path("/etc/hosts"), state_dir, [f"{h['addr']} {h['name']}" for h in want["hosts"]])
    bad = problems(want)
    if bad:
        raise SetupError("; ".join(bad))
    _log(f"{hosts} host(s) up: " + ", ".join(f"{h['name']}={h['addr']}" for h in want["hosts"]))
    return want


def problems(state: dict) -> list[str]:
    """What is wrong with a set of hosts that should be up (empty when all is well)."""
    out = []
    for host in state["hosts"]:
        if keeper_pid(host["name"]) is None:
            out.append(f"host {host['name']}: no namespace or keeper process")
        elif not _port_open(host["addr"], 22):
            out.append(f"host {host['name']}: sshd not answering on {host['addr']}:22")
    return out


def _kill_all(name: str) -> None:
    """Every process in host ``name``'s network namespace (its sshd, the keeper, the jobs left)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while pids and _netns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)


def down(state_dir: Path) -> None:
    """Take every host down, also after a crash: processes, namespaces, links, /etc/netns,
    the marked lines of /etc/hosts and ~/.ssh/config, the state dir."""
    state_file = state_dir / "hosts.json"
    state = json.loads(state_file.read_text()) if check_removable(state_dir) and state_file.exists() else None
    names = [h["name"] for h in state["hosts"]] if state else []
    for name in names:
        _kill_all(name)
        _run(["ip", "netns", "del", name], check=False)
        for file in ("hosts", "hostname"):
            Path(f"/etc/netns/{name}/{file}").unlink(missing_ok=True)
        try:
            Path(f"/etc/netns/{name}").rmdir()
        except OSError:
            pass
    for host in state["hosts"] if state else []:
        _run(["ip", "link", "del", host["veth"]], check=False)
    if state:
        _run(["ip", "link", "del", state["bridge"]], check=False)
    for path in (Path("/etc/hosts"), SSH_CONFIG):
        if path.exists():
            _edit_marked(path, state_dir, [])
    if SSH_CONFIG.exists() and not SSH_CONFIG.read_text().strip():
        SSH_CONFIG.unlink()  # made by up
    remove_state_dir(state_dir)
    _log(f"down ({len(names)} host(s) removed)")


def status(state_dir: Path) -> int:
    state_file = state_dir / "hosts.json"
    if not state_file.exists():
        print("no hosts")
        return 1
    state = json.loads(state_file.read_text())
    for host in state["hosts"]:
        pid = keeper_pid(host["name"])
        print(f"{host['name']}\t{host['addr']}\t{'up' if pid else 'DOWN'}\tsshd {'up' if _port_open(host['addr'], 22) else 'DOWN'}")
    return 1 if problems(state) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "exec"])
    parser.add_argument("host", nargs="?", help="exec: the host to run COMMAND in (after --)")
    parser.add_argument("--hosts", type=int, default=2, choices=range(1, 9), metavar="N", help="number of hosts (1..8, default 2)")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"private subnet of the bridge (default {DEFAULT_SUBNET})")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"keys, configs, logs (default {DEFAULT_STATE_DIR})")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_intermixed_args(argv[:split]), argv[split + 1:]
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces, starts sshd and edits /etc/hosts")
    state_dir = state_path(args.state_dir)
    try:
        if args.command == "up":
            up(state_dir, args.hosts, args.subnet)
        elif args.command == "down":
            down(state_dir)
        elif args.command == "status":
            return status(state_dir)
        else:
            if not args.host or not command:
                parser.error("exec needs HOST -- COMMAND...")
            os.execvp("nsenter", enter(args.host) + command)
    except (SetupError, UnsafeStateDir) as err:
        _log(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
