"""The first step of every node of a multi-node torchrun job: how this host reaches the master,
said in the log, and a job that cannot reach it failed at once in one line.

    python -m cluster.reach --master h1 --addr 10.0.0.11 --port 29400 -- torchrun ... --local-addr {node_addr} ...

On this host: the interface and source address of the route to ``--addr`` become
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` (unless the user set them) and ``{node_addr}`` in
the command (torchrun's ``--local-addr``, which becomes the workers' MASTER_ADDR on the master:
an address, never the host name that Debian maps to 127.0.1.1 there). A host other than the
master then waits until the rendezvous port answers (``--wait-s``; "connection refused" only
means the master's torchrun is not listening yet) and fails at once when the network says the
master cannot be reached (no route, host unreachable). Then the command replaces this process.
Standard library only, like the rest of ``cluster``.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import time
from typing import Optional

from cluster.env import route_interface, socket_ifname_env
from cluster.errors import ClusterError

# The network's own "no": waiting longer will not help.
UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN}
# A live host answers a connection at once, if only to refuse it (its torchrun not started yet);
# silence for this long means the host or its link is gone.
SILENT_S = 10.0


def wait_reachable(addr: str, port: int, wait_s: float) -> Optional[str]:
    """None once ``addr:port`` accepts a TCP connection, else why not: at once when the network
    says unreachable, after ``SILENT_S`` of silence (no host answers), after ``wait_s`` when the
    host answers but nothing listens on the port."""
    deadline = time.monotonic() + wait_s
    last = "no answer"
    silent_since = None
    while True:
        try:
            socket.create_connection((addr, port), timeout=SILENT_S / 2).close()
            return None
        except ConnectionRefusedError:
            last, silent_since = "connection refused: nothing listens there", None
        except socket.timeout:
            silent_since = silent_since or time.monotonic() - SILENT_S / 2
            if time.monotonic() - silent_since >= SILENT_S:
                return f"no answer for {SILENT_S:.0f} s: the host is down or its link is cut"
            continue
        except OSError as err:
            if err.errno in UNREACHABLE:
                return err.strerror or str(err)
            last = err.strerror or str(err)
        if time.monotonic() >= deadline:
            return f"{last}, for {wait_s:.0f} s"
        time.sleep(0.5)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m cluster.reach", description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", required=True, help="the master host's name (for messages)")
    parser.add_argument("--addr", required=True, help="the master's address (the rendezvous address)")
    parser.add_argument("--port", required=True, type=int, help="the rendezvous port")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the master to listen")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    host = socket.gethostname()
    where = f"the master {args.master} at {args.addr}:{args.port}"
    try:
        ifname, source = route_interface(args.addr)
    except ClusterError as err:
        print(f"orch: error: host {host} cannot reach {where}: {err}", file=sys.stderr, flush=True)
        return 1
    os.environ.update(socket_ifname_env(os.environ, ifname))
    chosen = ", ".join(f"{name}={os.environ[name]}" for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"))
    print(f"orch: {host}: {where} via {ifname} ({source}); {chosen}", flush=True)
    if source != args.addr:  # not the master itself
        problem = wait_reachable(args.addr, args.port, args.wait_s)
        if problem:
            print(f"orch: error: host {host} cannot reach {where} ({problem})", file=sys.stderr, flush=True)
            return 1
    if command:
        command = [part.replace("{node_addr}", source) for part in command]
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
