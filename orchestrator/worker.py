"""The process every backend finally starts, once per rank: ``python -m orchestrator.worker CONFIG``.

It loads the resolved experiment YAML that ``orch submit`` wrote, detects the distributed
environment from the variables the backend set (torchrun, Slurm, Ray, or none), and calls the one
training entry point, :func:`detection.train.main`. ``orch train`` does the same in-process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.env import DistEnv
from cluster.errors import OrchError


def run(config_path: str, overrides: Sequence[str] = (), hooks: Sequence[Any] = (), env: DistEnv | None = None):
    """Train the experiment at ``config_path`` in this process; returns the ``TrainResult``."""
    from orchestrator.config import load_experiment

    experiment = load_experiment(config_path, overrides)
    env = env or DistEnv.detect(os.environ)
    from detection.train import main as train_main  # torch loads here

    result = train_main(launch_overrides(experiment, env, os.environ), env, hooks)
    if env.is_main:
        write_result(result)
    return result


def launch_overrides(experiment: Any, env: DistEnv, environ: Mapping[str, str]) -> Any:
    """What the launcher tells training through the environment, put into the config:
    ``tracking.tags.backend`` from ``$ORCH_BACKEND`` (default ``local``), and on rank 0 the MLflow
    run id that ``orch submit`` writes to ``$ORCH_RUN_ID_FILE`` while this process imports torch
    (``tracking.run_id``; waited for, up to 10 minutes)."""
    from orchestrator.config import with_overrides

    tracking = experiment.tracking
    changes: dict[str, Any] = {}
    if "backend" not in tracking.tags:
        changes["tracking.tags.backend"] = environ.get("ORCH_BACKEND") or "local"
    path = environ.get("ORCH_RUN_ID_FILE")
    if path and env.is_main and tracking.enable and not tracking.run_id:
        deadline = time.monotonic() + 600.0
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise OrchError(f"the MLflow run of this job was never created ({path} missing after 600 s); "
                                "was orch submit interrupted? submit the job again")
            time.sleep(0.05)
        with open(path) as fh:
            changes["tracking.run_id"] = fh.read().strip()
    return with_overrides(experiment, changes, source="launch environment") if changes else experiment


def write_result(result: Any) -> None:
    """Write ``<output_dir>/result.json`` (final metrics, run id) so that ``orch submit --wait``,
    ``orch status`` and k-fold aggregation can read a finished job's outcome."""
    import dataclasses
    import json

    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    path = os.path.join(str(data.get("output_dir") or "."), "result.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def setup_logging(rank: int) -> None:
    # Rank-aware logging: every line says which rank wrote it; non-zero ranks only warn.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry of a worker process; returns the exit code (0, 1 job failed, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.worker", description=__doc__)
    parser.add_argument("config", help="resolved experiment YAML written by orch submit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        env = DistEnv.detect(os.environ)
        setup_logging(env.rank)
        run(args.config, args.overrides, env=env)
    except OrchError as err:
        print(f"orch worker: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
