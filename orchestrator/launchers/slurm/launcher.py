"""The Slurm backend: one sbatch job per experiment (one job array per set of runs) via submitit.

``plan`` groups jobs with identical sbatch parameters (each group is one job or one array) into a
typed :class:`SlurmPlan` whose text is submitit's own sbatch script (:mod:`.sbatch`); ``submit``
hands exactly that to sbatch through ``submitit.SlurmExecutor``. Job state comes from
:mod:`.state` (sacct when accounting exists, squeue / scontrol otherwise); the code that runs
inside the job is :mod:`.task`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from cluster.errors import LaunchError
from orchestrator import records
from orchestrator.home import orch_home
from orchestrator.launchers.base import Launcher, Plan, Status
from orchestrator.launchers.slurm.capacity import DEFAULT_MAX_ARRAY_SIZE
from orchestrator.launchers.slurm.sbatch import job_folder, render, sbatch_parameters, slurm_reachable
from orchestrator.spec import JobRecord, JobSpec, JobState

if TYPE_CHECKING:
    from orchestrator.config.schema import Experiment
    from orchestrator.launchers.slurm.capacity import SlurmAsk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SbatchGroup:
    """Jobs sharing one set of sbatch parameters: one sbatch job, or one job array."""

    params: dict[str, Any]  # submitit SlurmExecutor parameters
    indices: tuple[int, ...]  # positions in Plan.jobs
    folder: str  # submitit folder (scripts, pickles, logs, rendezvous files)
    script: str  # the sbatch script submitit writes for it

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "indices": list(self.indices), "folder": self.folder, "script": self.script}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SbatchGroup":
        return cls(data["params"], tuple(data["indices"]), data["folder"], data["script"])


@dataclass(frozen=True)
class SlurmPlan(Plan):
    """The sbatch scripts of a submission (TorchX's ``SlurmBatchRequest``: its text is the dry run)."""

    groups: tuple[SbatchGroup, ...]

    @property
    def text(self) -> str:
        texts = []
        for group in self.groups:
            text = group.script
            if len(group.indices) > 1:
                text += "# array tasks (each runs one resolved config):\n" + "".join(
                    f"#   {i}: {self.jobs[j].name}  {self.jobs[j].config_path}\n" for i, j in enumerate(group.indices))
            texts.append(text)
        return "\n".join(texts)


def slurm_asks(plan: SlurmPlan) -> list["SlurmAsk"]:
    """One capacity request per sbatch group (a job, or each task of an array)."""
    from orchestrator.launchers.slurm.capacity import SlurmAsk

    asks = []
    for group in plan.groups:
        members = [plan.jobs[i] for i in group.indices]
        label = (f"job {members[0].name}" if len(members) == 1
                 else f"each task of array {group.params.get('job_name')} ({len(members)} tasks)")
        time_given = all(j.experiment.resources.time is not None for j in members)
        asks.append(SlurmAsk.from_params(group.params, label, time_given))
    return asks


DEFAULT_ARRAY_PARALLELISM = 8  # an array's `%` throttle when neither --max-parallel nor Slurm says


def _shape(params: dict[str, Any]) -> str:
    """What jobs must share to go into one array: every sbatch parameter but the name."""
    return json.dumps({**params, "job_name": None}, sort_keys=True, default=str)


class SlurmLauncher(Launcher):
    """``orch submit --backend slurm`` (or ``--partition P`` with Slurm reachable)."""

    name: ClassVar[str] = "slurm"
    poll_s: ClassVar[float] = 1.0

    def __init__(self) -> None:
        self._node_gpus: dict[Optional[str], Optional[int]] = {}  # partition -> GPUs of its nodes
        # The cluster's limits, read by `fit` (a plan itself asks nothing): MaxArraySize, and how
        # many tasks of each shape the partition runs at once (the default `%` throttle).
        self.max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
        self.at_once: dict[str, Optional[int]] = {}
        self._limits_read = False
        self._reachable = False
        self._shapes: dict[str, str] = {}  # resources -> shape key, so 1000 trials compute a few

    def read_limits(self, experiment: Experiment) -> None:
        """Read the cluster's limits for jobs like ``experiment``, once per shape: MaxArraySize
        (``scontrol show config``, cached under ORCH_HOME) and, when no ``--max-parallel`` caps
        the arrays, how many such tasks the partition's nodes hold at once."""
        from orchestrator.launchers.slurm.capacity import SlurmAsk, max_array_size, tasks_at_once

        if not self._limits_read:
            self._limits_read = True
            self._reachable = slurm_reachable()
            if self._reachable:
                self.max_array_size = max_array_size(orch_home() / "slurm-config.json")
        if not self._reachable or experiment.resources.slurm.array_parallelism is not None:
            return
        resources = repr((experiment.resources, experiment.runtime.device))  # 1000 trials: a few shapes
        if resources in self._shapes:
            return
        params = sbatch_parameters(JobSpec(name=experiment.name, experiment=experiment, config_path=Path("config.yaml"),
                                           output_dir=Path("."), backend=self.name))
        key = self._shapes[resources] = _shape(params)
        if key not in self.at_once:
            self.at_once[key] = tasks_at_once(SlurmAsk.from_params(params, f"job {experiment.name}"))

    def fit(self, experiment: Experiment) -> Experiment:
        """``--gpus N`` alone on a partition of G-GPU nodes (N > G) runs on N/G nodes of G GPUs,
        as ``sbatch --gpus-per-node`` users expect (``--gpus 16`` on 8-GPU nodes: 2 x 8). Where
        Slurm cannot tell (a dry run away from the cluster), the layout stays one node. Also
        reads the cluster's limits that the plan obeys (:meth:`read_limits`)."""
        experiment = self._fit_layout(experiment)
        self.read_limits(experiment)
        return experiment

    def _fit_layout(self, experiment: Experiment) -> Experiment:
        from orchestrator.launchers.slurm.capacity import gpus_per_node

        res = experiment.resources
        if res.nodes is not None or res.gpus_per_node is not None or res.gpus <= 1:
            return experiment
        if res.partition not in self._node_gpus:
            self._node_gpus[res.partition] = gpus_per_node(res.partition)
        per_node = self._node_gpus[res.partition]
        if not per_node or res.gpus <= per_node:
            return experiment
        where = f"partition {res.partition}" if res.partition else "the default partition"
        if res.gpus % per_node:
            raise LaunchError(f"--gpus {res.gpus} does not fill whole nodes of {where} ({per_node} GPUs each); "
                              f"give a multiple of {per_node}, or --nodes / --gpus-per-node")
        log.info("%d GPUs on %s (%d per node): %d nodes x %d", res.gpus, where, per_node, res.gpus // per_node, per_node)
        return replace(experiment, resources=replace(res, gpus_per_node=per_node))

    def plan(self, jobs: Sequence[JobSpec]) -> SlurmPlan:
        """Group and render (pure: no processes, no files)."""
        if not jobs:
            raise LaunchError("nothing to submit: no jobs were planned")
        grouped: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for index, job in enumerate(jobs):
            params = sbatch_parameters(job)
            grouped.setdefault(_shape(params), (params, []))[1].append(index)
        groups = []
        for key, (params, indices) in grouped.items():
            # An array of more tasks than MaxArraySize is refused by sbatch: several arrays then.
            size = max(1, self.max_array_size)
            chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
            for chunk in chunks:
                members = [jobs[i] for i in chunk]
                chunk_params = dict(params)
                if len(members) > 1:  # one name for the array: what its runs' names share
                    prefix = os.path.commonprefix([j.name for j in members]).rstrip("-_.")
                    chunk_params["job_name"] = prefix or "orch-array"
                    if "array_parallelism" not in chunk_params:  # no --max-parallel: what the partition runs
                        chunk_params["array_parallelism"] = self.at_once.get(key) or DEFAULT_ARRAY_PARALLELISM
                    # the throttle is one per array: a set split in several arrays shares it out
                    share = -(-int(chunk_params["array_parallelism"]) // len(chunks))
                    chunk_params["array_parallelism"] = max(1, min(share, len(members)))
                folder = job_folder(members)
                groups.append(SbatchGroup(chunk_params, tuple(chunk), str(folder),
                                          render(chunk_params, folder, len(members))))
        return SlurmPlan(self.name, tuple(jobs), tuple(groups))

    def preflight(self, plan: SlurmPlan, wait_s: float = 0.0) -> None:
        """Fail before any file or MLflow run exists when no Slurm controller answers, or when a
        job asks more than its partition can ever give (unknown partition, nodes, GPUs, CPUs or
        memory per node, time limit). ``wait_s``: wait that long for DOWN/DRAINED nodes to come
        back when the job needs them."""
        from orchestrator.launchers.slurm.capacity import require_capacity

        if not slurm_reachable():
            raise LaunchError("Slurm is not reachable (sinfo failed); check SLURM_CONF and that slurmctld runs, "
                              "start the local cluster (python scripts/local_slurm.py up), or use another --backend")
        require_capacity(slurm_asks(plan), wait_s)

    def submit(self, plan: SlurmPlan) -> list[str]:
        """sbatch every group; returns at once with one job id (and record) per job. All or
        nothing: when sbatch refuses a group (a set split in several arrays), the groups it took
        already are cancelled and their records marked CANCELLED, so that no part of a
        submission that failed trains (and a retried set is not queued twice)."""
        job_ids: list[str] = [""] * len(plan.jobs)
        try:
            self._submit_groups(plan, job_ids)
        except LaunchError as err:
            queued = [records.load_record(j) for j in job_ids if j]
            if not queued:
                raise
            try:
                self.cancel_many(queued)
            except LaunchError as cancel_err:
                raise LaunchError(f"{err}; and the {len(queued)} job(s) of this submission queued before it could not "
                                  f"all be cancelled ({cancel_err}): `orch cancel` them") from None
            for record in queued:
                records.transition(record.job_id, JobState.CANCELLED,
                                   error="not started: Slurm refused another part of the same submission")
            raise LaunchError(f"{err} (the {len(queued)} job(s) of this submission Slurm had taken were cancelled: "
                              "nothing runs)") from None
        return job_ids

    def _submit_groups(self, plan: SlurmPlan, job_ids: list[str]) -> None:
        import submitit

        from orchestrator.launchers.slurm.task import SlurmTrainJob

        for group in plan.groups:
            members = [plan.jobs[i] for i in group.indices]
            folder = Path(group.folder)
            max_requeues = members[0].experiment.resources.slurm.max_requeues
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
            executor.update_parameters(**group.params)
            calls = [SlurmTrainJob(str(j.config_path), str(folder), max_requeues) for j in members]
            try:
                if len(calls) == 1:
                    submitted = [executor.submit(calls[0])]
                else:
                    with executor.batch():
                        pending = [executor.submit(call) for call in calls]
                    submitted = list(pending)
            except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as err:
                detail = getattr(err, "stderr", None) or getattr(err, "output", None) or str(err)
                detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
                line = next((s for s in reversed(detail.strip().splitlines()) if s.strip()), str(err))
                if "temporarily" in line:  # EAGAIN: the controller takes no more jobs now
                    hint = ("the controller takes no more jobs now: its MaxJobCount (`scontrol show config`) "
                            "counts every array task, and ended jobs leave it only after MinJobAge; retry later")
                else:
                    hint = "check --partition, --gpus-per-node and resources.slurm"
                raise LaunchError(f"sbatch refused {members[0].name}: {line.strip()}; {hint}") from None
            for index, job, sjob in zip(group.indices, members, submitted):
                record = records.create_record(
                    name=job.name, backend=self.name, output_dir=str(job.output_dir), config_path=str(job.config_path),
                    log_file=str(sjob.paths.stdout), native_id=str(sjob.job_id),
                    tracking_uri=job.experiment.tracking.uri if job.experiment.tracking.enable else None,
                    extra={"slurm_folder": str(folder), "result_path": str(sjob.paths.result_pickle),
                           # An array has one script, named after the array's own id.
                           "submission_file": str(folder / f"{str(sjob.job_id).split('_')[0]}_submission.sh")},
                )
                job_ids[index] = record.job_id

    def status(self, records: Sequence[JobRecord]) -> dict[str, Status]:
        """One ``sacct`` for all of ``records`` (and one ``squeue`` for those accounting does not
        know), through the answers cache: see :mod:`.state`. Read-only."""
        from orchestrator.launchers.slurm import state as slurm_state

        asked = {r.native_id: r for r in records if r.native_id and not r.state.finished}
        if not asked:
            return {}
        found = slurm_state.query_cached(list(asked), {n: r.extra.get("result_path") for n, r in asked.items()},
                                         orch_home(), {n: r.submitted_at for n, r in asked.items()})
        answers = {}
        for native_id, record in asked.items():
            status = found.get(native_id)
            if status is None or (status.state is JobState.UNKNOWN and status.source == "none"):
                continue  # Slurm forgot the job and it left no result: keep what we knew
            error = None
            if status.state is JobState.FAILED and not record.error:
                why = slurm_state.error_line(record.extra.get("result_path"), record.log_path)
                if status.raw.startswith("NODE_FAIL") and slurm_state.lost_nodes():  # name the lost host first
                    why = f"host {', '.join(slurm_state.lost_nodes())} was lost (not responding)" + (f"; {why}" if why else "")
                error = f"Slurm job {native_id} {status.raw.split()[0] if status.raw else 'FAILED'}" + (
                    f" (exit {status.exit_code})" if status.exit_code is not None else "") + (f": {why}" if why else "")
            started = status.started_at if status.state is not JobState.PENDING else None  # squeue's is an estimate
            answers[record.job_id] = Status(status.state, exit_code=status.exit_code, started_at=started,
                                            ended_at=status.ended_at, error=error,
                                            extra={"slurm_state": status.raw, "state_source": status.source})
        return answers

    def cancel(self, record: JobRecord) -> None:
        """``scancel`` the job (a job Slurm already finished is left alone)."""
        self.cancel_many([record])

    def cancel_many(self, records: Sequence[JobRecord]) -> None:
        """One ``scancel`` for many jobs (per 500 ids); ids Slurm no longer knows are no error."""
        from orchestrator.launchers.slurm.state import SACCT_CHUNK

        native = [r.native_id for r in records if r.native_id]
        if not native or not shutil.which("scancel"):
            return
        for start in range(0, len(native), SACCT_CHUNK):
            chunk = native[start:start + SACCT_CHUNK]
            proc = subprocess.run(["scancel", *chunk], capture_output=True, text=True, timeout=60)
            if proc.returncode != 0 and "already completing or completed" not in proc.stderr \
                    and "Invalid job id" not in proc.stderr:
                raise LaunchError(f"scancel {' '.join(chunk[:3])}{' ...' if len(chunk) > 3 else ''} failed: "
                                  f"{proc.stderr.strip()}")

    def describe(self, record: JobRecord) -> list[tuple[str, str]]:
        rows = [("slurm state", record.extra["slurm_state"])] if record.extra.get("slurm_state") else []
        if record.extra.get("submission_file"):
            rows.append(("sbatch script", record.extra["submission_file"]))
        return rows

