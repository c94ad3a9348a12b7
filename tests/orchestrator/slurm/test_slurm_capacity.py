"""Reading Slurm's answers for preflight's capacity check, on literal ``scontrol -o`` outputs
(Slurm 22.05 formats), and the shortfall lines they lead to. No Slurm needed."""

from __future__ import annotations

import pytest

from orchestrator.launchers.slurm.capacity import (
    SlurmAsk,
    SlurmNode,
    SlurmPartition,
    format_minutes,
    parse_fields,
    parse_gres_gpus,
    parse_max_time,
    parse_memory_mb,
    parse_records,
    shortfall,
)
from orchestrator.launchers.slurm.sbatch import parse_time

# `scontrol -a -o show partition` of the local test cluster (scripts/local_slurm.py), and of a
# GPU cluster with limits.
PARTITIONS = """\
PartitionName=dev AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=node[1-2] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=16000M,node=2,billing=8
PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=01:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=node[1-2] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=16000M,node=2,billing=8
PartitionName=gpu AllowGroups=ALL AllowAccounts=vision AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A DefaultTime=04:00:00 DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=YES MaxNodes=4 MaxTime=2-00:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=64 Nodes=gpu[01-16] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=EXCLUSIVE OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=2048 TotalNodes=16 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerCPU=8000 MaxMemPerNode=512000 TRES=cpu=2048,mem=8000G,node=16,billing=2048,gres/gpu=128
"""

# `scontrol -o show node node[1-2]` (22.05: CPUEfctv, spaces in OS=, two spaces before some keys).
NODES = """\
NodeName=node1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=4 CPUTot=4 CPULoad=4.42 AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:2 NodeAddr=127.0.0.1 NodeHostName=vm Port=33839 Version=22.05.8 OS=Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=8000 AllocMem=0 FreeMem=10021 Sockets=4 Boards=1 State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=dev,debug  BootTime=2026-11-25T21:41:25 SlurmdStartTime=2026-11-25T23:36:58 LastBusyTime=2026-11-25T23:36:58 CfgTRES=cpu=4,mem=8000M,billing=4 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
NodeName=node2 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=4 CPUTot=4 CPULoad=4.42 AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:2 NodeAddr=127.0.0.1 NodeHostName=vm Port=51785 Version=22.05.8 OS=Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=8000 AllocMem=0 FreeMem=10018 Sockets=4 Boards=1 State=IDLE+DRAIN ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=dev,debug  BootTime=2026-11-25T21:41:25 SlurmdStartTime=2026-11-25T23:36:58 LastBusyTime=2026-11-25T23:36:58 CfgTRES=cpu=4,mem=8000M,billing=4 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s Reason=disk check x=1 [root@2026-11-25T23:37:04]
"""


def ask(**changes) -> SlurmAsk:
    base = dict(label="job tiny", partition="dev", nodes=1, tasks_per_node=2, cpus_per_task=1, gpus_per_node=2,
                mem_mb=None, time_min=60)
    return SlurmAsk(**{**base, **changes})


def cluster():
    parts = {p.name: p for p in (SlurmPartition.parse(f) for f in parse_records(PARTITIONS))}
    nodes = [SlurmNode.parse(f) for f in parse_records(NODES)]
    return parts, nodes


def test_fields_keep_values_with_spaces():
    node = parse_records(NODES)[1]
    assert node["OS"] == "Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0"
    assert node["CfgTRES"] == "cpu=4,mem=8000M,billing=4" and node["AllocTRES"] == ""
    assert node["Reason"].startswith("disk check") and node["State"] == "IDLE+DRAIN"
    assert parse_fields("PartitionName=p Nodes=(null) TRES=cpu=1")["TRES"] == "cpu=1"


@pytest.mark.parametrize("text, gpus", [
    ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:v100:1", 3), ("gpu:2(S:0,1),mps:400", 2),
    ("(null)", 0), ("mps:100", 0), ("gpu", 1), ("gpu:tesla:no_consume:2", 2), ("gpu:a100:weird", None), (None, None),
])
def test_gres_gpu_counts(text, gpus):
    assert parse_gres_gpus(text) == gpus


def test_partition_limits():
    parts, _ = cluster()
    assert parts["dev"].default and parts["dev"].max_time == (True, None) and parts["dev"].max_nodes == (True, None)
    assert parts["debug"].max_time == (True, 60) and not parts["debug"].default
    gpu = parts["gpu"]
    assert gpu.max_nodes == (True, 4) and gpu.max_time == (True, 2880) and gpu.total_nodes == 16
    assert gpu.max_cpus_per_node == (True, 64) and gpu.max_mem_per_node == (True, 512000) and gpu.nodes_expr == "gpu[01-16]"
    assert parse_max_time("INFINITE") == (True, None) and parse_max_time("soon") == (False, None)
    assert parse_max_time(None) == (False, None)


def test_nodes_and_their_states():
    _, nodes = cluster()
    assert [(n.name, n.cpus, n.mem_mb, n.gpus, n.available) for n in nodes] == [
        ("node1", 4, 8000, 2, True), ("node2", 4, 8000, 2, False)]
    for state, up in [("DOWN+NOT_RESPONDING", False), ("DOWN*", False), ("MIXED+DRAIN", False), ("DRAINED", False),
                      ("ALLOCATED", True), ("IDLE+CLOUD+POWERED_DOWN", True), ("MIXED", True), ("IDLE~", True)]:
        assert SlurmNode("n", state, 1, 1, 0).available is up, state
    # GRES missing: the gpu count of CfgTRES (when AccountingStorageTRES has gres/gpu).
    assert SlurmNode.parse(parse_fields("NodeName=g1 CPUTot=8 CfgTRES=cpu=8,mem=1M,gres/gpu=4 State=IDLE")).gpus == 4


def test_memory_and_time_formats():
    assert parse_memory_mb("16GB") == 16384 and parse_memory_mb("1000MB") == 1000 and parse_memory_mb("500") == 500
    assert parse_memory_mb("2T") == 2 * 1024 ** 2 and parse_memory_mb("lots") is None
    assert format_minutes(60) == "01:00:00" and format_minutes(2 * 1440 + 90) == "2-01:30:00"
    assert parse_time(format_minutes(2 * 1440 + 90)) == 2 * 1440 + 90


def test_asks_from_submitit_parameters():
    params = {"job_name": "tiny", "time": 90, "nodes": 2, "ntasks_per_node": 4, "gpus_per_node": 4,
              "cpus_per_task": 6, "mem": "480GB", "partition": "gpu"}
    got = SlurmAsk.from_params(params, "job tiny", time_given=False)
    assert (got.partition, got.nodes, got.tasks_per_node, got.cpus_per_task, got.gpus_per_node, got.mem_mb,
            got.time_min, got.time_given) == ("gpu", 2, 4, 6, 4, 480 * 1024, 90, False)
    cpu_only = SlurmAsk.from_params({"time": 60, "nodes": 1, "ntasks_per_node": 2}, "job c")
    assert cpu_only.gpus_per_node == 0 and cpu_only.cpus_per_task == 1 and cpu_only.partition is None
    assert SlurmAsk.from_params({"gres": "gpu:a100:3"}, "job g").gpus_per_node == 3


@pytest.mark.parametrize("changes, partition, message", [
    ({"nodes": 3}, "dev", "job tiny asks for 3 nodes but partition dev has 2 nodes; lower --nodes"),
    ({"gpus_per_node": 4, "tasks_per_node": 4}, "dev",
     "asks for 4 GPUs per node but the nodes of partition dev have at most 2 (gres gpu); lower --gpus-per-node"),
    ({"cpus_per_task": 3}, "dev", "asks for 6 CPUs per node (2 tasks, one per rank, x 3 cpus_per_task) but the nodes "
                                  "of partition dev have at most 4; lower --cpus-per-task"),
    ({"mem_mb": 16 * 1024}, "dev", "asks for 16 GB per node (--mem-gb) but the nodes of partition dev have at most "
                                   "7.8 GB (RealMemory 8000 MB); lower --mem-gb"),
    ({"time_min": 120}, "debug", "asks for a time limit of 02:00:00 (--time) but partition debug allows at most "
                                 "01:00:00 (MaxTime); pass --time 01:00:00 or less"),
    ({"time_min": 1440, "time_given": False}, "debug", "1-00:00:00 (orch's default: --time was not given)"),
    ({"nodes": 5}, "gpu", "asks for 5 nodes but partition gpu allows at most 4 per job (MaxNodes)"),
    ({"tasks_per_node": 8, "cpus_per_task": 10}, "gpu", "asks for 80 CPUs per node (8 tasks x 10 cpus_per_task) "
                                                        "but partition gpu allows 64 per node (MaxCPUsPerNode)"),
])
def test_shortfalls_name_ask_have_and_flag(changes, partition, message):
    parts, nodes = cluster()
    got = shortfall(ask(**changes), parts[partition], nodes if partition != "gpu" else None)
    assert got is not None and message in got, got
    assert "\n" not in got


def test_what_fits_passes_and_unknown_values_skip_their_check():
    parts, nodes = cluster()
    assert shortfall(ask(nodes=2, mem_mb=4000), parts["dev"], nodes) is None
    assert shortfall(ask(nodes=2, time_min=30), parts["debug"], nodes) is None
    # Without a node list only the partition's limits count (16 nodes, no per-node data).
    assert shortfall(ask(nodes=4, gpus_per_node=8, tasks_per_node=8), parts["gpu"], None) is None
    # A node whose GRES cannot be read is not taken to have no GPU.
    odd = [SlurmNode("x1", "IDLE", 4, 8000, None), SlurmNode("x2", "IDLE", 4, 8000, 2)]
    assert shortfall(ask(gpus_per_node=4, tasks_per_node=1), parts["dev"], odd) is None
    unknown = SlurmPartition.parse(parse_fields("PartitionName=odd Nodes=x[1-2] MaxTime=whenever MaxNodes=many"))
    assert shortfall(ask(time_min=10 ** 6, nodes=2), unknown, None) is None


def test_no_gpu_partition_says_so():
    parts, _ = cluster()
    cpu_nodes = [SlurmNode("c1", "IDLE", 32, 64000, 0)]
    got = shortfall(ask(gpus_per_node=1, tasks_per_node=1), parts["dev"], cpu_nodes)
    assert "have no GPU (gres gpu)" in got and "runtime.device=cpu" in got


def test_nodes_that_hold_the_whole_share():
    parts, _ = cluster()
    mixed = [SlurmNode("a", "IDLE", 64, 8000, 8), SlurmNode("b", "IDLE", 4, 8000, 8), SlurmNode("c", "IDLE", 64, 8000, 0)]
    got = shortfall(ask(nodes=2, gpus_per_node=8, tasks_per_node=8), parts["dev"], mixed)
    assert "asks for 2 nodes with 8 GPUs, 8 CPUs each but only 1 of the nodes of partition dev hold that much" in got


def test_down_and_drained_nodes_count_for_ever_but_not_for_a_wait():
    parts, nodes = cluster()  # node2 is IDLE+DRAIN
    assert shortfall(ask(nodes=2), parts["dev"], nodes) is None
    got = shortfall(ask(nodes=2), parts["dev"], nodes, up_only=True)
    assert got == ("job tiny asks for 2 nodes but partition dev has 1 node not DOWN/DRAIN (2 in all); "
                   "lower --nodes (or --gpus), or pick a bigger --partition")
