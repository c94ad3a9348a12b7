"""scripts/local_slurm.py ``down`` leaves the node1/node2 lines of /etc/hosts while another local
cluster's slurmctld runs (found by the fault suite: another session's ``down`` made ``node1``
unresolvable and every rank of a running job waited for its MASTER_ADDR). No Slurm is started."""

import importlib.util
import time
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load():
    sys.path.insert(0, str(SCRIPTS))  # local_slurm imports local_slurm_state
    try:
        spec = importlib.util.spec_from_file_location("local_slurm_for_hosts", SCRIPTS / "local_slurm.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_a_running_slurmctld_of_another_cluster_is_seen():
    local_slurm = _load()
    # A process whose argv[0] is "slurmctld", as another cluster's daemon would be.
    proc = subprocess.Popen(["bash", "-c", "exec -a slurmctld sleep 60"])
    try:
        deadline = time.monotonic() + 10
        while not local_slurm.other_slurmctld():
            assert time.monotonic() < deadline, "a running slurmctld was not seen"
    finally:
        proc.kill()
        proc.wait()
