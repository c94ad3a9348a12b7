"""The detached driver of one Ray job: ``python -m orchestrator.launchers.ray_driver JOB.json``.

Started by :meth:`orchestrator.launchers.ray.RayLauncher.submit`. It starts a private Ray head
when the job names no address, runs the ``TorchTrainer``, and records RUNNING then SUCCEEDED /
FAILED / CANCELLED in the job's record. SIGTERM (``orch cancel``) stops the run cleanly: the Ray
head it started is stopped and the MLflow run is marked KILLED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from cluster.errors import OrchError
from orchestrator.spec import JobRecord, JobState

log = logging.getLogger("orchestrator.ray")


class Cancelled(BaseException):
    """Raised in the driver by SIGTERM (BaseException: nothing on the way may swallow it)."""


def _raise_cancelled(*_: Any) -> None:
    raise Cancelled()


def set_state(job_id: Optional[str], state: JobState, **fields: Any) -> None:
    """Record ``state`` (and any record fields) for ``job_id``; no-op without a job id."""
    if not job_id:
        return
    from orchestrator import jobs as records

    def change(r: JobRecord) -> None:
        r.state = state
        now = time.time()
        if state == JobState.RUNNING:
            r.started_at = r.started_at or now
        if state.finished:
            r.ended_at = now
        for key, value in fields.items():
            if key == "extra":
                r.extra.update(value)
            else:
                setattr(r, key, value)

    records.update_record(job_id, change)


def end_mlflow_run(tracking_uri: Optional[str], run_id: Optional[str], status: str, only_if_running: bool = True) -> None:
    """Mark the MLflow run ``status`` unless a rank already ended it (the trainer's MLflow hook
    ends it when training itself ends; a killed worker group cannot)."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    with contextlib.suppress(Exception):
        if only_if_running and client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_terminated(run_id, status=status)


def build_trainer(payload: dict[str, Any], use_gpu: bool, callbacks: Optional[list] = None):
    """The ``TorchTrainer`` of the job (Train V2 API); ``callbacks`` are Ray Train callbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.launchers.ray_worker import train_loop

    resources = {"CPU": float(payload["cpus_per_worker"])}
    if use_gpu:
        resources["GPU"] = float(payload["gpus_per_worker"])
    return TorchTrainer(
        train_loop,
        train_loop_config={"config_path": payload["config_path"], "output_dir": payload["output_dir"],
                           "cwd": payload.get("cwd")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(payload["num_workers"]), use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=payload.get("run_name") or payload["name"],
            storage_path=payload["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=int(payload["max_failures"])),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(payload["keep_checkpoints"])),
            worker_runtime_env={"env_vars": dict(payload.get("env") or {})},
            callbacks=callbacks,
        ),
    )


@contextlib.contextmanager
def ray_connection(address: Optional[str], job_id: Optional[str] = None, num_cpus: Optional[float] = None):
    """Connect to ``address``, or start a private local head first (stopped on exit)."""
    from orchestrator.launchers.ray_cluster import LocalRay, prepare_client

    prepare_client(address)
    import ray
    head = None
    try:
        if not address:
            head = LocalRay(num_cpus=num_cpus)
            address = head.start()
            set_state(job_id, JobState.PENDING, extra={"ray_head_pid": head.process.pid, "ray_address": address})
            log.info("started a private Ray head at %s", address)
        ray.init(address=address, log_to_driver=True)
        yield address
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if head is not None:
            head.stop()


def run_job(payload: dict[str, Any]) -> JobState:
    """Run one Ray job to its end; returns the final state (also recorded)."""
    job_id = payload.get("job_id")
    run_id, uri = payload.get("mlflow_run_id"), payload.get("tracking_uri")
    try:
        with ray_connection(payload["address"], job_id):
            import ray

            gpu = payload["use_gpu"]
            use_gpu = gpu == "yes" or (gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
            set_state(job_id, JobState.RUNNING)
            result = build_trainer(payload, use_gpu).fit()
            error = getattr(result, "error", None)
            if error is not None:
                raise RuntimeError(str(error).strip().splitlines()[-1] if str(error).strip() else repr(error))
    except Cancelled:
        end_mlflow_run(uri, run_id, "KILLED")
        set_state(job_id, JobState.CANCELLED)
        return JobState.CANCELLED
    except Exception as err:  # noqa: BLE001 - any failure ends as a FAILED record with its line
        log.error("Ray job failed: %s", err)
        end_mlflow_run(uri, run_id, "FAILED")
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        set_state(job_id, JobState.FAILED, error=message[:500], exit_code=1)
        return JobState.FAILED
    set_state(job_id, JobState.SUCCEEDED, exit_code=0)
    return JobState.SUCCEEDED


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; exit code 0 when the job succeeded, 1 otherwise."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        payload = json.loads(Path(args[0]).read_text())
    except (IndexError, OSError, ValueError) as err:
        print(f"orch ray driver: error: cannot read the job file: {err}", file=sys.stderr)
        return 2
    try:
        state = run_job(payload)
    except OrchError as err:
        print(f"orch ray driver: error: {err}", file=sys.stderr)
        set_state(payload.get("job_id"), JobState.FAILED, error=str(err), exit_code=err.exit_code)
        return err.exit_code
    return 0 if state == JobState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
