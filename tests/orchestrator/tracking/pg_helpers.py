"""A private PostgreSQL server for MLflow at scale (Debian's ``postgresql``): its own data,
socket and temporary folders under one folder of its own, on 127.0.0.1 at a port chosen at run
time, trust authentication, one database ``mlflow``; stopped (``pg_ctl stop -m fast``) and its
folder removed after. Run as root, the server runs as the ``postgres`` user (PostgreSQL refuses
root), so its folder is made in /tmp, which that user can reach (pytest's are private)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from ship_helpers import _free_port


def pg_bin(name: str) -> str:
    """A PostgreSQL program (``initdb``, ``pg_ctl``, ``createdb``): Debian keeps them in
    /usr/lib/postgresql/<version>/bin, off PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    found = found or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is missing: apt-get install -y postgresql")
    return found[-1]


class Postgres:
    """``with Postgres() as pg: pg.uri`` (``postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow``:
    the driver named, else SQLAlchemy looks for psycopg 3)."""

    def __init__(self) -> None:
        root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="orch-pg-", dir="/tmp" if root else None))
        self.data, self.sockets, self.log = self.folder / "data", self.folder / "sockets", self.folder / "postgres.log"
        self.port = _free_port()
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"
        self._as: list[str] = []
        self.started = False

    def _run(self, *argv: str, env: Optional[dict] = None) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=300, env=env,
                              cwd=self.folder)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> "Postgres":
        self.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.folder, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        env = dict(os.environ, TMPDIR=str(self.folder), LC_ALL="C.UTF-8")
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", env=env)
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "-o",
                  f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1", "start", env=env)
        self.started = True
        self._run(pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow", env=env)
        return self

    def stop(self) -> None:
        if self.started:
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.started = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
