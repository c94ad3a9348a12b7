"""What the fault suite needs to know of each backend: how to submit the scenario's job, where its
processes are (each rank, the owning supervisor or driver), what marks its processes in /proc,
and which devices and ports it holds while it runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

from fault_inject import cmdline, descendants, environ, live_pids

from orchestrator.launch import ResourceFlags
from orchestrator.spec import JobRecord


class Backend:
    """The local backend; the others override what differs."""

    name = "local"
    world = 2

    def flags(self) -> ResourceFlags:
        return ResourceFlags(backend=self.name, gpus=self.world)

    def overrides(self) -> dict[str, Any]:
        """Config keys of this backend's jobs (dotted)."""
        return {"resources.backend": self.name}

    def owner_pid(self, record: JobRecord) -> Optional[int]:
        """The supervisor (local, torchrun) or driver (Ray) owning the job; None on Slurm."""
        return record.pid

    def rank_pids(self, record: JobRecord) -> dict[int, int]:
        """rank -> pid of the job's training processes (empty until they run)."""
        pids = record.extra.get("pids") or []
        return {rank: pid for rank, pid in enumerate(pids) if "orchestrator.worker" in cmdline(pid)}

    def markers(self, record: JobRecord) -> tuple[list[str], set[int]]:
        """(command-line markers, process groups) of the job's processes."""
        pgid = record.extra.get("pgid")
        return [record.output_dir], {int(pgid)} if pgid else set()

    def resources(self, record: JobRecord) -> dict[str, list]:
        """Devices and ports the live job holds."""
        port = record.extra.get("port")
        return {"devices": list(record.extra.get("devices") or ()), "ports": [port] if port else []}


class TorchrunBackend(Backend):
    name = "torchrun"

    def rank_pids(self, record: JobRecord) -> dict[int, int]:
        out = {}
        for agent in record.extra.get("pids") or []:
            for pid in descendants(agent):
                # Not torchrun's agent itself (argv[0:2] is `python .../torchrun`; the scenario's
                # folder may hold the word "torchrun" too).
                argv = cmdline(pid).split()
                if "orchestrator.worker" in argv and not any(Path(a).name == "torchrun" for a in argv[:2]):
                    rank = environ(pid).get("RANK")
                    if rank is not None:
                        out[int(rank)] = pid
        return out


class SlurmBackend(Backend):
    name = "slurm"

    def flags(self) -> ResourceFlags:
        return ResourceFlags(backend="slurm", partition="dev", gpus=self.world, gpus_per_node=1)

    def overrides(self) -> dict[str, Any]:
        # device auto: the job asks for (fake) GPUs, one per node, and trains on the CPU.
        return {"resources.backend": "slurm", "runtime.device": "auto", "resources.time": "02:00:00"}

    def owner_pid(self, record: JobRecord) -> Optional[int]:
        return None

    def rank_pids(self, record: JobRecord) -> dict[int, int]:
        out = {}
        folder = record.extra.get("slurm_folder", "")
        for pid in live_pids():
            line = cmdline(pid)
            if "submitit.core._submit" in line and folder in line:
                env = environ(pid)
                if env.get("SLURM_JOB_ID") == record.native_id and "SLURM_PROCID" in env:
                    out[int(env["SLURM_PROCID"])] = pid
        return out

    def markers(self, record: JobRecord) -> tuple[list[str], set[int]]:
        return [record.output_dir, record.extra.get("slurm_folder") or record.output_dir], set()

    def resources(self, record: JobRecord) -> dict[str, list]:
        """(node, GPU index) pairs from ``scontrol show job -d``; the rendezvous port of this run."""
        out = subprocess.run(["scontrol", "show", "job", "-d", record.native_id], capture_output=True, text=True,
                             timeout=20).stdout
        devices = []
        for node, idx in re.findall(r"Nodes=(\S+) CPU_IDs=\S+ Mem=\S+ GRES=gpu[^(]*\(IDX:([\d,-]+)\)", out):
            devices += [f"{node}:gpu{i}" for i in _indices(idx)]
        ports = []
        for path in Path(record.extra["slurm_folder"]).glob(f"{record.native_id}_rendezvous_*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            ports.append(f"{data['master_addr']}:{data['master_port']}")
        return {"devices": devices, "ports": ports[-1:]}


def _indices(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out += list(range(int(low), int(high or low) + 1))
    return out


class RayBackend(Backend):
    name = "ray"

    def overrides(self) -> dict[str, Any]:
        return {"resources.backend": "ray"}

    def head_pid(self, record: JobRecord) -> Optional[int]:
        pid = record.extra.get("ray_head_pid")
        return int(pid) if pid else None

    def rank_pids(self, record: JobRecord) -> dict[int, int]:
        head = self.head_pid(record)
        if not head:
            return {}
        workers = sorted(p for p in descendants(head) if cmdline(p).startswith("ray::RayTrainWorker"))
        return dict(enumerate(workers))

    def markers(self, record: JobRecord) -> tuple[list[str], set[int]]:
        address = record.extra.get("ray_address") or ""
        port = address.rsplit(":", 1)[-1] if address else ""
        # Ray's processes name the head's GCS port in their command lines.
        markers = [record.output_dir] + ([f"127.0.0.1:{port}", f"gcs_server_port={port}"] if port else [])
        groups = {int(g) for g in (record.extra.get("pgid"), self.head_pid(record)) if g}
        return markers, groups

    def resources(self, record: JobRecord) -> dict[str, list]:
        address = record.extra.get("ray_address")
        return {"devices": [], "ports": [address] if address else []}


BACKENDS: dict[str, Backend] = {b.name: b for b in (Backend(), TorchrunBackend(), SlurmBackend(), RayBackend())}
