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


def test_down_hands_its_munged_to_another_running_cluster(tmp_path, monkeypatch):
    """The machine has one munged; the cluster that started it must not stop it while another
    local cluster runs (seen: the other cluster's srun then hung on a missing munge socket). It
    hands the munged over: the other cluster's pid files then hold it, and its ``down`` stops it."""
    local_slurm = _load()
    ours, other = tmp_path / "ours", tmp_path / "other"
    for state in (ours, other):
        local_slurm.make_state_dir(state)
        (state / "run").mkdir()
    # Stand-ins named as the daemons are: "munged" (ours), and the other cluster's slurmctld with
    # its `-f <state>/slurm.conf`, as local_slurm starts it.
    munged = subprocess.Popen(["bash", "-c", "exec -a munged sleep 60"])
    ctld = subprocess.Popen(["bash", "-c", 'exec -a slurmctld "$0" -c "import time; time.sleep(60)" -f "$1"',
                             sys.executable, str(other / "slurm.conf")])
    # Only this test's clusters: real ones of other tests may run beside it and must be left alone.
    real = local_slurm.running_clusters
    monkeypatch.setattr(local_slurm, "running_clusters", lambda: [p for p in real() if tmp_path in p.parents])
    try:
        (ours / "run" / "munged.pid").write_text(str(munged.pid))
        deadline = time.monotonic() + 10
        while other not in local_slurm.running_clusters():
            assert time.monotonic() < deadline, "the other cluster's slurmctld was not seen"
            time.sleep(0.1)
        local_slurm.stop(ours)
        assert munged.poll() is None, "munged was stopped while another cluster runs"
        assert not ours.exists()
        assert (other / "run" / "munged.pid").read_text() == str(munged.pid)
    finally:
        for proc in (munged, ctld):
            proc.kill()
            proc.wait()
