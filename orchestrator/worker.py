"""The process every backend finally starts, once per rank: ``python -m orchestrator.worker CONFIG``.

It loads the resolved experiment YAML that ``orch submit`` wrote, detects the distributed
environment from the variables the backend set (torchrun, Slurm, Ray, or none), starts the
shipper of the run's journal (rank 0), and calls the one training entry point,
:func:`detection.train.main`. ``orch train``, Slurm tasks, Ray Train workers and Ray Tune trials
call :func:`run` in-process.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from cluster.env import DistEnv
from cluster.errors import OrchError
from cluster.imports import heavy_imports
from cluster.logs import setup_logging

log = logging.getLogger("orchestrator.worker")
# A restarted or requeued rank 0 waits this long for its killed predecessor's lock to go.
HOLD_WAIT_S = 60.0


def run(config_path: str, overrides: Sequence[str] = (), hooks: Sequence[Any] = (), env: DistEnv | None = None,
        ship: bool = True):
    """Train the experiment at ``config_path`` in this process; returns the ``TrainResult``.
    ``ship``: rank 0 starts the journal's shipper (a sweep ships its trials itself). The run's
    folder is the one ``runtime.output_dir`` names: whoever started this decided it
    (:mod:`orchestrator.outputs`); it is never chosen again here."""
    from orchestrator.config import load_experiment

    from orchestrator.config import output_dir_of
    from orchestrator.outputs import hold, release

    experiment = with_destination(load_experiment(config_path, overrides))
    env = env or DistEnv.detect(os.environ)
    # One live run per folder, whatever started it: rank 0 holds the folder's run lock while it
    # trains (a second run into it is refused at once; the lock dies with this process).
    folder = output_dir_of(experiment)
    taken = env.is_main and hold(folder, wait_s=HOLD_WAIT_S)
    try:
        if ship and env.is_main:
            start_shipping(experiment)
        with heavy_imports():  # torch loads here
            from detection.train import main as train_main

        result = train_main(experiment, env, hooks)
        if env.is_main:
            write_result(result)
        return result
    finally:
        if taken:
            release(folder)


def with_destination(experiment: Any) -> Any:
    """The experiment with its tracking URI resolved (``tracking.uri``, else
    ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``, made absolute): the journal records where its
    run goes, so that ``orch sync`` sends it there from any folder or shell."""
    tracking = experiment.tracking
    if not tracking.enable or tracking.uri:
        return experiment
    from orchestrator.config import with_overrides
    from orchestrator.tracking.runs import tracking_uri_of

    return with_overrides(experiment, {"tracking.uri": tracking_uri_of(experiment)})


def start_shipping(experiment: Any) -> None:
    """Hand this run's journal to this host's shipper (``tracking.mode`` auto or online),
    starting it unless one runs: it follows the journal while training writes it and ships it
    to its final status after this process ended (a bounded wait when the server is down: see
    ``orchestrator.tracking.host_shipper``). A server that does not answer now gets one warning:
    the values wait in the journal."""
    tracking = experiment.tracking
    if not tracking.enable or tracking.mode == "offline":
        return
    from orchestrator.config import output_dir_of
    from orchestrator.tracking import runs

    uri = runs.tracking_uri_of(experiment)
    folder = runs.journal_dir(output_dir_of(experiment))
    if not runs.reachable(uri):
        log.warning("MLflow at %s does not answer from this node: the run is kept in %s and shipped when it "
                    "answers (or run `orch sync %s` from a machine that reaches it)", uri, folder,
                    output_dir_of(experiment))
    runs.start_shipper(folder, uri, until_pid=os.getpid())
    from orchestrator.tracking.registry import keep_shipper

    keep_shipper()  # another job's allocation may end the host's shipper while this one trains


def write_result(result: Any) -> None:
    """Write ``<output_dir>/result.json`` (final metrics) so that ``orch submit --wait``,
    ``orch status`` and k-fold aggregation can read a finished job's outcome."""
    import dataclasses
    import json

    from cluster.files import write_text_atomic

    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    path = os.path.join(str(data.get("output_dir") or "."), "result.json")
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry of a worker process; returns the exit code (0, 1 job failed, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.worker", description=__doc__)
    parser.add_argument("config", help="resolved experiment YAML written by orch submit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from cluster.pdeath import die_with_parent

    # A rank dies with what started it (the local supervisor, a torchrun agent, srun's step):
    # never an orphan training on after its job was declared over.
    die_with_parent(os.getppid())
    try:
        env = DistEnv.detect(os.environ)
        setup_logging(env.rank)
        run(args.config, args.overrides, env=env)
    except OrchError as err:
        print(f"orch worker: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk (or quota) is the machine's state, not a bug: say it in one line, with the way on.
        folder = os.path.dirname(os.path.abspath(args.config))
        print(f"orch worker: error: {os.strerror(err.errno).lower()} writing {err.filename or 'to ' + folder}: free "
              f"space in {folder} (fewer checkpoints: checkpoint.max_keep), then resubmit with --set "
              "runtime.resume=auto to continue from its last checkpoint", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
