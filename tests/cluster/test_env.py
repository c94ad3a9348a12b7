"""DistEnv.detect: a pure function of the environment (table tests)."""

import pytest

from cluster.env import DistEnv
from cluster.errors import ClusterError

TORCHRUN = {
    "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "x",
}
SLURM = {
    "SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
    "SLURM_JOB_NUM_NODES": "4", "SLURM_TASKS_PER_NODE": "2(x3),1",
    "SLURM_JOB_NODELIST": "gpu[01-03],cpu5", "ORCH_MASTER_PORT": "31234",
}
RAY = {
    "ORCH_RAY_RANK": "3", "ORCH_RAY_WORLD_SIZE": "4", "ORCH_RAY_LOCAL_RANK": "1",
    "ORCH_RAY_LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "30001",
}


def with_(base, **changes):
    env = dict(base)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, DistEnv()),
        ({"PATH": "/bin", "SLURM_JOB_ID": "12"}, DistEnv()),  # an allocation shell is not a task
        (TORCHRUN, DistEnv(5, 1, 8, 4, 1, 2, "node0", 29511, "torchrun")),
        (with_(TORCHRUN, GROUP_RANK=None, GROUP_WORLD_SIZE=None), DistEnv(5, 1, 8, 4, 1, 2, "node0", 29511, "torchrun")),
        ({"RANK": "0", "WORLD_SIZE": "1"}, DistEnv(source="torchrun")),
        # torchrun inside a Slurm step: torchrun's variables win.
        ({**SLURM, **TORCHRUN}, DistEnv(5, 1, 8, 4, 1, 2, "node0", 29511, "torchrun")),
        (SLURM, DistEnv(5, 1, 7, 2, 2, 4, "gpu01", 31234, "slurm")),
        (with_(SLURM, ORCH_MASTER_PORT=None, MASTER_PORT="29999"), DistEnv(5, 1, 7, 2, 2, 4, "gpu01", 29999, "slurm")),
        (with_(SLURM, MASTER_ADDR="login1"), DistEnv(5, 1, 7, 2, 2, 4, "login1", 31234, "slurm")),
        # The step's node list and layout describe this srun, not the whole allocation.
        (with_(SLURM, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID="1",
               SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NODELIST="gpu[02-03]"),
         DistEnv(1, 0, 2, 1, 1, 2, "gpu02", 31234, "slurm")),
        (with_(SLURM, SLURM_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="8", SLURM_PROCID="5"),
         DistEnv(5, 1, 8, 2, 2, 4, "gpu01", 31234, "slurm")),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
          "SLURM_JOB_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "n1"},
         DistEnv(0, 0, 1, 1, 0, 1, "n1", None, "slurm")),
        (RAY, DistEnv(3, 1, 4, 2, 1, 2, "10.0.0.7", 30001, "ray")),
        # orch's Ray variables win over the Slurm variables every Ray worker inherits.
        ({**SLURM, **RAY}, DistEnv(3, 1, 4, 2, 1, 2, "10.0.0.7", 30001, "ray")),
    ],
)
def test_detect(environ, expected):
    assert DistEnv.detect(environ) == expected


@pytest.mark.parametrize(
    "environ, variable",
    [
        (with_(TORCHRUN, RANK=None), "RANK"),
        (with_(TORCHRUN, WORLD_SIZE=None), "WORLD_SIZE"),
        (with_(TORCHRUN, LOCAL_RANK=None), "LOCAL_RANK"),
        (with_(TORCHRUN, LOCAL_WORLD_SIZE=None), "LOCAL_WORLD_SIZE"),
        (with_(TORCHRUN, MASTER_PORT=None), "MASTER_PORT"),
        (with_(TORCHRUN, MASTER_ADDR=None), "MASTER_ADDR"),
        (with_(TORCHRUN, RANK="five"), "RANK"),
        (with_(TORCHRUN, MASTER_PORT="70000"), "MASTER_PORT"),
        (with_(TORCHRUN, RANK="8"), "rank 8"),
        (with_(TORCHRUN, LOCAL_RANK="4"), "local rank 4"),
        (with_(TORCHRUN, WORLD_SIZE="6", GROUP_WORLD_SIZE=None), "LOCAL_WORLD_SIZE"),
        (with_(TORCHRUN, GROUP_RANK="2"), "node rank 2"),
        (with_(SLURM, SLURM_LOCALID=None), "SLURM_LOCALID"),
        (with_(SLURM, SLURM_NODEID=None), "SLURM_NODEID"),
        (with_(SLURM, SLURM_NTASKS="9"), "SLURM_NTASKS=9"),
        (with_(SLURM, SLURM_JOB_NUM_NODES="3"), "SLURM_JOB_NUM_NODES=3"),
        (with_(SLURM, SLURM_JOB_NODELIST="gpu[01-02]"), "SLURM_JOB_NODELIST"),
        (with_(SLURM, SLURM_JOB_NODELIST="gpu[01-"), "never closed"),
        (with_(SLURM, SLURM_TASKS_PER_NODE=None), "SLURM_TASKS_PER_NODE"),
        (with_(SLURM, ORCH_MASTER_PORT=None), "ORCH_MASTER_PORT"),
        (with_(SLURM, SLURM_JOB_NODELIST=None), "SLURM_JOB_NODELIST"),
        (with_(RAY, ORCH_RAY_LOCAL_RANK=None), "ORCH_RAY_LOCAL_RANK"),
        (with_(RAY, MASTER_ADDR=None), "MASTER_ADDR"),
    ],
)
def test_detect_errors_name_the_variable(environ, variable):
    with pytest.raises(ClusterError, match=variable):
        DistEnv.detect(environ)


def test_to_environ_round_trips():
    env = DistEnv.detect(TORCHRUN)
    assert DistEnv.detect(env.to_environ()) == env
    slurm = DistEnv.detect(SLURM)
    back = DistEnv.detect(slurm.to_environ())
    assert (back.rank, back.world_size, back.node_rank, back.master_addr, back.master_port) == (5, 7, 2, "gpu01", 31234)
    assert set(DistEnv().to_environ()) >= {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"}
    assert "MASTER_PORT" not in DistEnv().to_environ()


def test_from_values_for_ray_and_is_main():
    env = DistEnv.from_values(rank=0, world_size=4, local_rank=0, local_world_size=2,
                              master_addr="h", master_port=29600, source="ray")
    assert env.is_main and env.distributed and (env.node_rank, env.num_nodes) == (0, 2)
    assert not DistEnv.from_values(rank=3, world_size=4, master_port=1, source="ray").is_main
    with pytest.raises(ClusterError, match="master port"):
        DistEnv.from_values(rank=0, world_size=2, source="ray")
    with pytest.raises(ClusterError, match="source"):
        DistEnv.from_values(rank=0, world_size=1, source="mpi")


def test_detect_reads_os_environ_by_default(monkeypatch):
    for key in list(TORCHRUN) + list(SLURM) + list(RAY):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert DistEnv.detect().source == "torchrun"


def test_init_method_is_env_under_torchrun_and_tcp_elsewhere():
    assert DistEnv.detect(TORCHRUN).init_method == "env://"  # torchrun's rendezvous owns the address
    assert DistEnv.detect(SLURM).init_method == "tcp://gpu01:31234"
    assert DistEnv.detect(RAY).init_method == "tcp://10.0.0.7:30001"
