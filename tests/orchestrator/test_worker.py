"""The worker's bridge from launcher variables to the config (``launch_overrides``): training
itself reads no ``ORCH_*`` variable."""

from __future__ import annotations

import threading
import time

from cluster.env import DistEnv
from orchestrator.config import load_experiment
from orchestrator.worker import launch_overrides


def test_backend_becomes_a_tag_and_the_run_id_file_is_waited_for(tiny_experiment, tmp_path):
    exp = load_experiment(tiny_experiment)
    assert launch_overrides(exp, DistEnv.single(), {}).tracking.tags == {"backend": "local"}
    id_file = tmp_path / ".mlflow_run_id"
    # orch submit writes the id a moment after the worker started.
    writer = threading.Timer(0.3, lambda: id_file.write_text("abc123\n"))
    writer.start()
    started = time.monotonic()
    got = launch_overrides(exp, DistEnv.single(), {"ORCH_BACKEND": "torchrun", "ORCH_RUN_ID_FILE": str(id_file)})
    assert time.monotonic() - started >= 0.25
    assert (got.tracking.run_id, got.tracking.tags) == ("abc123", {"backend": "torchrun"})
    # Other ranks do not log to MLflow, so they do not wait; a user's own backend tag stays.
    rank1 = DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2, master_port=1)
    mine = load_experiment(tiny_experiment, ["tracking.tags.backend=mine"])
    other = launch_overrides(mine, rank1, {"ORCH_BACKEND": "slurm", "ORCH_RUN_ID_FILE": str(tmp_path / "never")})
    assert other is mine
