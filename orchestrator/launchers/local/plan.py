"""The typed plan of jobs run on this node by the local supervisor (local and torchrun backends).

:class:`NodeRequest` is what the detached supervisor reads back (``to_json``/``from_json``):
per job, the device slots it leases, the port rule, and the exact command lines; ``{port}`` in a
command's argv or env is replaced by the job's port at launch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from orchestrator.launchers.base import Plan, json_ready
from orchestrator.spec import JobSpec

PortMode = Literal["none", "lease", "fixed", "probe"]


@dataclass(frozen=True)
class NodeCommand:
    """One process (or a torchrun agent / an ssh to another node) of a job."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    procs: int = 1  # device slots its processes use (its share of the job's lease)
    local: bool = True  # runs on this node (False: an ssh to another host)
    cwd: Optional[str] = None


@dataclass(frozen=True)
class PortRule:
    """How a job's rendezvous port is chosen at launch: ``none`` (one process), ``lease`` (a
    bind-checked lease on this node), ``fixed`` (given by the user), ``probe`` (ask the remote
    master for a free port with ``argv`` over ssh)."""

    mode: PortMode = "none"
    port: Optional[int] = None
    host: Optional[str] = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeJob:
    """One job of a node plan. ``index`` is its position in ``Plan.jobs``; ``job_id`` is filled
    at submission."""

    index: int
    name: str
    slots: int
    commands: tuple[NodeCommand, ...]
    port: PortRule = PortRule()
    runnable: bool = True  # False: a multi-node torchrun job with no way to start its nodes
    job_id: Optional[str] = None


@dataclass(frozen=True)
class NodeRequest:
    """What the supervisor runs: jobs in queue order, the parallelism cap, the slot pool."""

    jobs: tuple[NodeJob, ...]
    max_parallel: Optional[int] = None
    cpu_slots: Optional[int] = None
    queue: bool = True  # False (--no-wait): fail instead of waiting for busy devices

    def to_json(self) -> dict[str, Any]:
        """Plain data for the supervisor's payload file."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NodeRequest":
        """The request written by :meth:`to_json`."""
        jobs = tuple(
            NodeJob(**{**j, "commands": tuple(NodeCommand(**{**c, "argv": tuple(c["argv"])}) for c in j["commands"]),
                       "port": PortRule(**{**j["port"], "argv": tuple(j["port"]["argv"])})})
            for j in data["jobs"])
        return cls(jobs=jobs, max_parallel=data.get("max_parallel"), cpu_slots=data.get("cpu_slots"),
                   queue=data.get("queue", True))


@dataclass(frozen=True)
class NodePlan(Plan):
    """A local or torchrun plan: the request and the lines ``--dry-run`` prints."""

    request: NodeRequest
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def worker_argv(job: JobSpec) -> list[str]:
    """``<python> -m orchestrator.worker <config>``: the one training process of every rank."""
    return [sys.executable, "-m", "orchestrator.worker", str(job.config_path)]


def base_env(job: JobSpec) -> dict[str, str]:
    """Variables every process of a job gets (unbuffered output so `orch logs -f` is live)."""
    # PASSIVE: spinning OpenMP waiters collapse throughput when parallel jobs share few cores.
    return {"PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# Characters no shell treats specially in a word (no braces: "a{b,c}" is brace-expanded by bash).
_SAFE_WORD = re.compile(r"[\w@%+=:,./-]+")
# What the supervisor (or the user, by hand) fills in: left readable in the dry-run text. Alone,
# or next to safe characters, such a token is literal in sh and bash (no comma or '..' inside).
PLACEHOLDERS = ("{port}", "{master_addr}")


def _quote(text: str) -> str:
    """``text`` as one shell word: as is when made of safe characters and exact placeholders
    only, else single-quoted (``{port}`` inside quotes is still filled in at launch)."""
    bare = text
    for token in PLACEHOLDERS:
        bare = bare.replace(token, "")
    return text if _SAFE_WORD.fullmatch(bare) or (text and not bare) else shlex.quote(text)


def format_command(argv: list[str] | tuple[str, ...], env: dict[str, str]) -> str:
    """One shell-pasteable line: ``VAR=value ... argv``."""
    return " ".join([f"{k}={_quote(v)}" for k, v in env.items()] + [_quote(a) for a in argv])
