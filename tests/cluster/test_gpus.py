"""GPU-slice / CPU-slot leases between real processes: disjoint slices, queueing, --no-wait,
reclaim on death, FIFO with backfill. A GPU pool is simulated with CUDA_VISIBLE_DEVICES."""

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from cluster.errors import ClusterError
from cluster.gpus import DeviceRequest, detect_pool, lease_devices, list_device_leases

GPU4 = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}


@pytest.fixture(autouse=True)
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("ORCH_CPU_SLOTS", raising=False)
    return tmp_path


def env(**extra):
    return {"ORCH_RUNTIME_DIR": os.environ["ORCH_RUNTIME_DIR"], **extra}


@pytest.mark.parametrize(
    "environ, cpu_slots, kind, ids",
    [
        ({"CUDA_VISIBLE_DEVICES": "2,5"}, None, "gpu", ("2", "5")),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, 3, "gpu", ("GPU-aa", "GPU-bb")),
        ({"CUDA_VISIBLE_DEVICES": ""}, 3, "cpu", ("cpu0", "cpu1", "cpu2")),
        ({"CUDA_VISIBLE_DEVICES": "", "ORCH_CPU_SLOTS": "2"}, 3, "cpu", ("cpu0", "cpu1")),
        ({}, None, "cpu", tuple(f"cpu{i}" for i in range(os.cpu_count()))),  # no GPU on this machine
    ],
)
def test_pool(environ, cpu_slots, kind, ids):
    pool = detect_pool(environ, cpu_slots)
    assert (pool.kind, pool.ids) == (kind, ids)
    assert pool.threads_per_device >= 1


def test_bad_pool_sizes():
    with pytest.raises(ClusterError, match="ORCH_CPU_SLOTS"):
        detect_pool({"CUDA_VISIBLE_DEVICES": "", "ORCH_CPU_SLOTS": "many"})
    with pytest.raises(ClusterError, match="cpu_slots"):
        detect_pool({"CUDA_VISIBLE_DEVICES": ""}, cpu_slots=0)


def test_disjoint_slices_and_child_environment():
    a = lease_devices(2, environ=env(**GPU4))
    b = lease_devices(2, environ=env(**GPU4))
    assert set(a.devices).isdisjoint(b.devices) and len(a.devices + b.devices) == 4
    assert a.environ(2)["CUDA_VISIBLE_DEVICES"] == ",".join(a.devices)
    with pytest.raises(ClusterError, match="no 1 GPU.*--no-wait"):
        lease_devices(1, queue=False, environ=env(**GPU4))
    a.release()
    c = lease_devices(1, queue=False, environ=env(**GPU4))
    assert c.devices[0] in a.devices
    for lease in (b, c, a):
        lease.release()
    assert list_device_leases("gpu") == []


def test_cpu_slots_give_a_thread_share():
    pool = detect_pool({"CUDA_VISIBLE_DEVICES": ""}, cpu_slots=1)
    with lease_devices(1, environ=env(CUDA_VISIBLE_DEVICES=""), cpu_slots=1) as lease:
        child = lease.environ(1)
        assert "CUDA_VISIBLE_DEVICES" not in child
        assert child["OMP_NUM_THREADS"] == str(os.cpu_count()) == str(pool.threads_per_device)
        assert lease.environ(os.cpu_count() * 4)["OMP_NUM_THREADS"] == "1"


def test_more_than_the_pool_fails_at_once():
    start = time.monotonic()
    with pytest.raises(ClusterError, match="asks for 5 GPUs but this node has 4"):
        lease_devices(5, environ=env(**GPU4))
    with pytest.raises(ClusterError, match="at least 1"):
        lease_devices(0, environ=env(**GPU4))
    assert time.monotonic() - start < 10  # refused, not queued behind a lease


def _use(n, hold_s, barrier, queue):
    barrier.wait()
    with lease_devices(n, environ=env(**GPU4)) as lease:
        start = time.monotonic()
        time.sleep(hold_s)
        queue.put((lease.devices, start, time.monotonic()))


def test_concurrent_processes_never_share_a_device():
    ctx = mp.get_context("fork")
    sizes = [1, 2, 1, 3, 1, 2, 4, 1]
    barrier, queue = ctx.Barrier(len(sizes)), ctx.Queue()
    procs = [ctx.Process(target=_use, args=(n, 0.3, barrier, queue)) for n in sizes]
    for proc in procs:
        proc.start()
    uses = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert sorted(len(d) for d, _, _ in uses) == sorted(sizes)
    for i, (dev_a, s_a, e_a) in enumerate(uses):
        for dev_b, s_b, e_b in uses[i + 1:]:
            if set(dev_a) & set(dev_b):
                assert e_a <= s_b or e_b <= s_a, "two jobs held one device at once"


def _hold(queue):
    lease = lease_devices(4, environ=env(**GPU4))
    queue.put(lease.devices)
    time.sleep(600)


def test_dead_owner_frees_its_devices_and_waiters_get_them():
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    holder = ctx.Process(target=_hold, args=(queue,))
    holder.start()
    try:
        assert len(queue.get(timeout=60)) == 4
        messages, got = [], []
        waiter = threading.Thread(target=lambda: got.append(
            lease_devices(2, environ=env(**GPU4), on_wait=messages.append)))
        waiter.start()
        time.sleep(0.5)
        assert not got and messages and "0 of 4 free" in messages[0]
        os.kill(holder.pid, signal.SIGKILL)  # its lease is reclaimed, the waiter is served
        waiter.join(timeout=30)
        assert len(got[0].devices) == 2
        got[0].release()
    finally:
        holder.kill()


def test_fifo_with_backfill_and_starvation_guard():
    big = lease_devices(3, environ=env(**GPU4))  # 1 free
    first = DeviceRequest(2, detect_pool(GPU4), environ=env(**GPU4))  # does not fit yet
    second = DeviceRequest(1, detect_pool(GPU4), environ=env(**GPU4))
    third = DeviceRequest(1, detect_pool(GPU4), environ=env(**GPU4))
    assert first.try_acquire() is None
    assert third.try_acquire() is None  # an older request that fits (second) goes first
    small = second.try_acquire()  # backfill: passes the 2-GPU request that does not fit
    assert small is not None
    small.release()
    third.cancel()
    passer = DeviceRequest(1, detect_pool(GPU4), environ=env(**GPU4))
    lease = passer.try_acquire()  # first (2) still does not fit in 1 free: backfill allowed
    assert lease is not None
    lease.release()
    # Once the big request has waited past the starvation limit, nobody passes it.
    time.sleep(0.01)
    late = DeviceRequest(1, detect_pool(GPU4), environ=env(**GPU4, ORCH_LEASE_STARVE_S="0"))
    assert late.try_acquire() is None
    big.release()
    granted = first.try_acquire()
    assert granted is not None and len(granted.devices) == 2
    for request in (first, second, late):
        request.cancel()
