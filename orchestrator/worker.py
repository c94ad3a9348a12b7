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
from collections.abc import Sequence
from typing import Any

from cluster.env import DistEnv
from cluster.errors import OrchError


def run(config_path: str, overrides: Sequence[str] = (), hooks: Sequence[Any] = (), env: DistEnv | None = None):
    """Train the experiment at ``config_path`` in this process; returns the ``TrainResult``."""
    from orchestrator.config import load_experiment

    experiment = load_experiment(config_path, overrides)
    env = env or DistEnv.detect(os.environ)
    # For a local job, `orch submit` creates the MLflow run while this process starts; the
    # MLflow hook waits for its id in $ORCH_RUN_ID_FILE (detection.tracking.wait_for_run_id).
    from detection.train import main as train_main

    result = train_main(experiment, env, hooks)
    if env.is_main:
        write_result(result)
    return result


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
