"""One node of a job started over ssh, watched from here: a host that is lost ends the job in one
line naming it.

    python -m cluster.remote HOST REMOTE_COMMAND

runs ``ssh -tt -o BatchMode=yes -o ServerAliveInterval=S -o ServerAliveCountMax=N HOST
REMOTE_COMMAND`` (``-tt``: closing the connection, as ``orch cancel`` does, hangs up the remote
command too). ssh's keep-alives notice a host that stopped answering (its link down, the machine
gone) within ``S * N`` seconds, instead of the job's ranks waiting out their collective timeout;
ssh then exits with 255, as it does when the host closes the connection (sshd killed with
everything else on the host). This process then prints ``orch: error: host HOST was lost (...)``,
the line the supervisor reports, and exits with 255. Standard library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

ALIVE_INTERVAL_S = 5
ALIVE_COUNT = 3
SSH_FAILED = 255


def ssh_argv(host: str, remote: str, tty: bool = True) -> list[str]:
    """The ssh command line: no prompts, keep-alives that notice a lost host."""
    return ["ssh", *(["-tt"] if tty else []), "-o", "BatchMode=yes", "-o", f"ServerAliveInterval={ALIVE_INTERVAL_S}",
            "-o", f"ServerAliveCountMax={ALIVE_COUNT}", host, remote]


def lost_line(host: str, code: int, stderr_tail: str) -> Optional[str]:
    """``orch: error: host HOST was lost (...)`` when ssh's exit status ``code`` says the connection
    failed (255), else None (the remote command's own status)."""
    if code != SSH_FAILED:
        return None
    why = (stderr_tail.strip().splitlines()[-1].strip() if stderr_tail.strip()
           else "its ssh connection failed: no answer, or closed by the host")
    return f"orch: error: host {host} was lost ({why}; no answer for {ALIVE_INTERVAL_S * ALIVE_COUNT} s ends the job)"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m cluster.remote HOST REMOTE_COMMAND", file=sys.stderr)
        return 2
    host, remote = argv
    # ssh's own complaints come on stderr (the remote command's output comes through the tty).
    proc = subprocess.Popen(ssh_argv(host, remote), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-2000:]
    code = proc.wait()
    line = lost_line(host, code, tail.decode("utf-8", "replace"))
    if line:
        print(line, file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
