"""One scenario, start to end: submit the job (and its pair), land the fault, let the job recover
or fail, resume it by hand where the fault is fatal by design, then check every invariant.

The result is a plain dict (``Outcome.to_json``) with the figures the summary table adds up and
the list of broken invariants (``problems``), which the test asserts empty.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fault_backends import BACKENDS, Backend
from fault_checks import (checkpoint_problems, disjoint_problems, lease_problems, lost_work_problems,
                          one_line_problems, orphans, progress, run_statuses)
from fault_inject import (CreateWatch, Squatter, fill, free_port_block, kill, last_iter, read_text, slurmd_pid,
                          start_slurmd, tmpfs, wait_for)
from fault_schedule import CHECKPOINT_INTERVAL, EVAL_INTERVAL, MAX_ITERS, Scenario

from orchestrator.spec import JobState

JOB_TIMEOUT_S = 360.0
TMP_CHECKPOINT = re.compile(r"\..*\.pth\.[^.]+\.tmp")  # cluster.files.atomic_path names it .<name>.<random>.tmp


@dataclass
class Context:
    """What a scenario runs against: its own folder, a writer of experiment files (the tiny
    experiment on the suite's dataset, outputs in ``folder/work``, logging to the MLflow server
    (``uri``, ``proc``, ``stop()``, ``start()``), the Slurm state dir (None when Slurm is not up) and a
    ``setenv(name, value)`` that the test undoes afterwards."""

    folder: Path
    write_experiment: Callable[[Path, str, dict], Path]  # (folder, name, dotted overrides) -> YAML path
    mlflow: Any
    slurm_dir: Optional[Path]
    setenv: Callable[[str, str], None]


@dataclass
class Outcome:
    scenario: dict
    landed: str = ""
    first_state: str = ""
    error: Optional[str] = None
    resubmitted: bool = False
    finished: bool = False
    fault_iter: int = 0
    saved_iter: int = 0
    resumed_iter: Optional[int] = None
    lost_steps: int = 0
    runs: dict = field(default_factory=dict)
    running_runs: int = 0
    orphans: list = field(default_factory=list)
    leaked_leases: list = field(default_factory=list)
    shared: list = field(default_factory=list)
    pair_samples: int = 0  # moments both jobs were seen running (their devices and ports compared)
    pair_example: Optional[list] = None  # what the two held at the first of them
    checkpoints_checked: int = 0
    problems: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class Scenario_Run:
    """The moving parts of one scenario (see the module docstring)."""

    def __init__(self, sc: Scenario, ctx: Context) -> None:
        self.sc, self.ctx = sc, ctx
        self.backend: Backend = BACKENDS[sc.backend]
        self.out = Outcome(sc.to_json())
        self.squatter = Squatter()
        self.filler: Optional[Path] = None
        self.samples: list[tuple[dict, dict]] = []
        self.inject_offset = 0  # length of the faulted job's log when the fault was injected
        self.resumed_record = None
        self.stop_sampling = threading.Event()
        self.handles: list = []  # every job submitted (cancelled when the scenario cannot go on)

    # -- set-up ----------------------------------------------------------------------------------
    def write(self, key: str) -> Path:
        """The scenario's experiment file (``a``: the faulted job; ``b``: the job beside it)."""
        name = self.sc.name + ("" if key == "a" else "-pair")
        overrides = {"schedule.iterations": MAX_ITERS, "eval.interval": EVAL_INTERVAL,
                     "checkpoint.interval": CHECKPOINT_INTERVAL, "checkpoint.max_keep": 2,
                     "optim.auto_scale_lr.enable": False,  # keep MAX_ITERS steps on 2 ranks
                     "tracking.experiment": self.sc.name, **self.backend.overrides()}
        return self.ctx.write_experiment(self.ctx.folder / key, name, overrides)

    def submit(self, path: Path, resume: bool = False):
        from orchestrator.submit import submit

        _, [handle] = submit([str(path)], ("runtime.resume=auto",) if resume else (), self.backend.flags())
        self.handles.append(handle)
        return handle

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> Outcome:
        started = time.monotonic()
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - a timeout here is a finding too (a hung job): record it
            text = (str(err).strip().splitlines() or [""])[0][:300]
            self.out.problems.append(f"the scenario could not go on: {type(err).__name__}: {text}")
            self.cancel_all()
        self.out.seconds = round(time.monotonic() - started, 1)
        return self.out

    def _run(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.callback(self.restore)
            exp = self.write("a")
            pair = self.write("b") if self.sc.pair else None
            work = self.ctx.folder / "a" / "work"
            if self.sc.fault == "disk_full":
                stack.enter_context(tmpfs(work, 256))
            if self.sc.fault == "port_squat" and self.sc.mode in ("range", "all_ports"):
                self.squat_range(pair is not None)
            handle = self.submit(exp)
            pair_handle = self.submit(pair) if pair else None
            if pair_handle is not None:
                sampler = threading.Thread(target=self.sample, args=(handle, pair_handle), daemon=True)
                sampler.start()
                stack.callback(self.stop_sampling.set)
            self.inject(handle)
            self.finish(handle, exp)
            if pair_handle is not None:
                state = pair_handle.wait(timeout_s=JOB_TIMEOUT_S)
                if state is not JobState.SUCCEEDED:
                    self.out.problems.append(f"the job beside it ended {state.value}: {pair_handle.record().error}")
                self.stop_sampling.set()
                self.out.pair_samples = len(self.samples)
                self.out.pair_example = list(self.samples[0]) if self.samples else None
                self.out.shared = disjoint_problems(self.samples)
                self.out.problems += self.out.shared
            self.final_checks([handle.record()] + ([pair_handle.record()] if pair_handle else []))

    def cancel_all(self) -> None:
        """Cancel the scenario's unfinished jobs: a hung one must not hold the next scenario's
        devices (a Slurm job holds its nodes' GPUs)."""
        for handle in self.handles:
            with contextlib.suppress(Exception):
                if not handle.state().finished:
                    handle.cancel()

    def sample(self, a, b) -> None:
        """While both jobs run: note the devices and ports each holds."""
        while not self.stop_sampling.is_set():
            try:
                ra, rb = a.record(), b.record()
                if ra.state is JobState.RUNNING and rb.state is JobState.RUNNING:
                    got = (self.backend.resources(ra), self.backend.resources(rb))
                    if all(g["devices"] or g["ports"] for g in got):
                        self.samples.append(got)
                if ra.state.finished or rb.state.finished:
                    return
            except Exception:  # noqa: BLE001 - a record mid-write: try again
                pass
            time.sleep(0.5)

    # -- the fault -------------------------------------------------------------------------------
    def inject(self, handle) -> None:
        sc = self.sc
        if sc.fault == "port_squat":
            return self.squat_after_lease(handle) if sc.mode == "after_lease" else None
        record = wait_for(lambda: (r := handle.record()).state is JobState.RUNNING and r, 300, "the job to run",
                          poll_s=0.2)
        log = record.log_path
        target = None
        if sc.fault in ("kill_rank", "signal_rank"):
            pids = wait_for(lambda: ((p := self.backend.rank_pids(handle.record())) and len(p) >= 2 and p)
                            or handle.state().finished, 300, "the ranks to start", poll_s=0.3)
            if pids is True:
                raise AssertionError("the job ended before its ranks were seen: the fault never landed")
            target = pids[sc.rank]
        wait_for(lambda: last_iter(read_text(log)) >= sc.at_iter or handle.state().finished, 300,
                 f"step {sc.at_iter}", poll_s=0.02)
        if sc.window == "checkpoint":
            folder = Path(record.output_dir) / "checkpoints"
            with CreateWatch(folder) as watch:
                name = watch.next(TMP_CHECKPOINT, 120, stop=lambda: handle.state().finished)
                self.fire(handle, target)
                self.out.landed = "checkpoint" if name and (folder / name).exists() else "step"
        elif sc.window == "eval":
            time.sleep(0.15)
            text = read_text(log)
            self.fire(handle, target)
            self.out.landed = "eval" if f"eval at iter {sc.at_iter}:" not in text else "step"
        else:
            self.fire(handle, target)
            self.out.landed = "step"
        self.inject_offset = len(read_text(log))
        self.recover(handle)

    def fire(self, handle, target: Optional[int]) -> None:
        sc, record = self.sc, handle.record()
        if sc.fault == "kill_rank":
            kill(target, signal.SIGKILL)
        elif sc.fault == "signal_rank":
            kill(target, getattr(signal, sc.signal))
        elif sc.fault in ("kill_supervisor", "kill_driver"):
            kill(self.backend.owner_pid(record), signal.SIGKILL)
        elif sc.fault == "signal_job":
            subprocess.run(["scancel", f"--signal={sc.signal[3:]}", record.native_id], check=True, timeout=30)
        elif sc.fault == "requeue":
            subprocess.run(["scontrol", "requeue", record.native_id], check=True, timeout=30)
        elif sc.fault == "kill_slurmd":
            node = sc.mode
            kill(slurmd_pid(self.ctx.slurm_dir, node), signal.SIGKILL)
        elif sc.fault == "mlflow_down":
            self.ctx.mlflow.stop()
        elif sc.fault == "disk_full":
            self.filler = fill(Path(record.output_dir))
        else:
            raise AssertionError(f"no way to inject {sc.fault}")

    def recover(self, handle) -> None:
        """What an admin does after the fault, while the job goes on (daemons come back)."""
        sc = self.sc
        if sc.fault == "kill_slurmd":
            time.sleep(sc.down_s)
            start_slurmd(self.ctx.slurm_dir, sc.mode)
        elif sc.fault == "mlflow_down" and sc.mode == "restart_during":
            time.sleep(sc.down_s)
            self.ctx.mlflow.start()

    def squat_range(self, pair: bool) -> None:
        """Squat ports of a small lease range before the submission (all of them: ``all_ports``)."""
        width = 5 if pair else 3
        first = free_port_block(width, seed=self.sc.seed)
        self.ctx.setenv("ORCH_PORT_RANGE", f"{first}-{first + width - 1}")
        taken = width if self.sc.mode == "all_ports" else width - (2 if pair else 1)
        for port in range(first, first + taken):
            assert self.squatter.take(port)
        self.out.landed = f"{taken} of {width} ports of the range squatted before the lease"

    def squat_after_lease(self, handle) -> None:
        """Bind the job's rendezvous port between its lease and the ranks' rendezvous."""
        if self.sc.backend == "slurm":
            folder = Path(handle.record().output_dir) / "slurm"

            def port():
                for path in folder.glob("*_rendezvous_*.json"):
                    text = read_text(path)
                    found = re.search(r'"master_port": (\d+)', text)
                    if found:
                        return int(found.group(1))
                return None
        else:
            def port():
                return handle.record().extra.get("port")
        leased = wait_for(port, 300, "the leased port", poll_s=0.01)
        ok = self.squatter.take(leased)
        started = last_iter(read_text(handle.record().log_path)) > 0
        self.out.landed = "port squatted before the rendezvous" if ok and not started else "too late: the job had it"
        self.inject_offset = 0

    def restore(self) -> None:
        """Undo the fault whatever happened (the next scenario needs the daemons)."""
        self.squatter.close()
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
        if self.ctx.mlflow.proc is None:
            self.ctx.mlflow.start()
        if self.ctx.slurm_dir is not None:
            for node in ("node1", "node2"):
                if slurmd_pid(self.ctx.slurm_dir, node) is None:
                    start_slurmd(self.ctx.slurm_dir, node)

    # -- after the fault -------------------------------------------------------------------------
    def finish(self, handle, exp: Path) -> None:
        state = handle.wait(timeout_s=JOB_TIMEOUT_S)
        if self.sc.fault == "mlflow_down" and self.ctx.mlflow.proc is None:
            self.ctx.mlflow.start()  # restart_after_end
        record = handle.record()
        self.out.first_state, self.out.error = state.value, record.error
        before = read_text(record.log_path)
        after = None
        if state is JobState.FAILED:
            self.out.problems += one_line_problems(record.error, "first run")
            allowed = self.sc.fatal or (self.sc.fault == "port_squat" and self.sc.mode == "after_lease")
            if not allowed:
                self.out.problems.append(f"the job failed although it should survive {self.sc.fault}: {record.error}")
            self.at_failure(record)
            resumed = self.submit(exp, resume=True)
            self.out.resubmitted = True
            final = resumed.wait(timeout_s=JOB_TIMEOUT_S)
            if final is not JobState.SUCCEEDED:
                self.out.problems.append(f"the resumed job ended {final.value}: {resumed.record().error}")
            after = read_text(resumed.record().log_path)
            self.resumed_record = resumed.record()
        elif state is not JobState.SUCCEEDED:
            self.out.problems.append(f"the job ended {state.value}: {record.error}")
        p = progress(before, self.inject_offset, after if self.out.resubmitted else None)
        self.out.fault_iter, self.out.saved_iter, self.out.resumed_iter = p.fault_iter, p.saved_iter, p.resumed_iter
        self.out.lost_steps = p.lost
        if self.out.resubmitted and p.resumed_iter is None:
            self.out.problems.append("the resubmitted job's log shows no start of training")
        if self.sc.fault != "port_squat":
            self.out.problems += lost_work_problems(p, CHECKPOINT_INTERVAL)

    def at_failure(self, record) -> None:
        """Right after a fatal fault: nothing of the job runs on (its shipper may, until the run's
        status is shipped), its checkpoints load, its leases are free; once the fault is cleared
        (space freed, server back), syncing its journal ends its MLflow run (not RUNNING)."""
        markers, groups = self.backend.markers(record)
        left = orphans(markers, groups, grace_s=20, shippers=False)
        self.out.orphans += [f"after the failure: {pid} {line[:160]}" for pid, line in left]
        self.out.problems += [f"process of the failed job left running: {pid} {line[:160]}" for pid, line in left]
        checked, problems = checkpoint_problems(record.output_dir)
        self.out.checkpoints_checked += checked
        self.out.problems += problems
        # Leases of this job only: the job beside it may hold its own.
        own = (record.job_id, f"slurm job {record.native_id}")
        leaks = [leak for leak in lease_problems() if any(f"'{label}'" in leak for label in own)]
        self.out.leaked_leases += leaks
        self.out.problems += [f"after the failure: {leak}" for leak in leaks]
        self.restore()
        statuses, problems = run_statuses([record.output_dir], self.ctx.mlflow.uri, self.sc.name)
        self.out.problems += [f"after the failure: {p}" for p in problems if f"run {record.name}:" in p or "sync" in p]

    def final_checks(self, records: list) -> None:
        main = self.resumed_record or records[0]
        result = Path(main.output_dir) / "result.json"
        if result.exists():
            import json

            iterations = json.loads(result.read_text()).get("iterations")
            self.out.finished = main.state is JobState.SUCCEEDED and iterations == MAX_ITERS
            if iterations != MAX_ITERS:
                self.out.problems.append(f"result.json says {iterations} iterations, not {MAX_ITERS}")
        for record in records:
            checked, problems = checkpoint_problems(record.output_dir)
            self.out.checkpoints_checked += checked
            self.out.problems += problems
        statuses, problems = run_statuses([r.output_dir for r in records], self.ctx.mlflow.uri, self.sc.name)
        self.out.runs = statuses
        self.out.running_runs = sum(s == "RUNNING" for s in statuses.values())
        self.out.problems += problems
        for record in records + ([main] if main is not records[0] else []):
            markers, groups = self.backend.markers(record)
            left = orphans(markers, groups, grace_s=90, shippers=True)
            self.out.orphans += [f"{pid} {line[:160]}" for pid, line in left]
            self.out.problems += [f"process left running after the job: {pid} {line[:160]}" for pid, line in left]
        leaks = lease_problems()
        self.out.leaked_leases += leaks
        self.out.problems += leaks


def run_scenario(sc: Scenario, ctx: Context) -> Outcome:
    """Run ``sc`` (see :class:`Scenario_Run`)."""
    return Scenario_Run(sc, ctx).run()


__all__ = ["Context", "Outcome", "run_scenario", "os"]
