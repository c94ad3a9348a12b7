"""Latency of port leases and GPU-slice leases under 32 concurrent requests (real processes).

32 processes wait on a barrier, then each takes a lease (timed from the barrier's release), holds
it until all have one, and releases it. Ports come from the default range on this host; GPU
leases take 1 device each from a simulated 32-GPU pool (``CUDA_VISIBLE_DEVICES=0..31``), so
nobody waits for a device: the numbers are the cost of the lock-file protocol under contention.

    .venv/bin/python bench/bench_leases.py --rounds 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

N = 32


def _port_worker(barrier, queue):
    from cluster.ports import lease_port

    barrier.wait()
    start = time.perf_counter()
    lease = lease_port()
    queue.put((time.perf_counter() - start, lease.port))
    barrier.wait()
    lease.release()


def _gpu_worker(barrier, queue):
    from cluster.gpus import lease_devices

    barrier.wait()
    start = time.perf_counter()
    lease = lease_devices(1)
    queue.put((time.perf_counter() - start, lease.devices[0]))
    barrier.wait()
    lease.release()


def sequential(kind: str, count: int = 100) -> list[float]:
    """Latencies of ``count`` leases taken one after another (no contention): the protocol's own cost."""
    from cluster.gpus import lease_devices
    from cluster.ports import lease_port

    out = []
    for _ in range(count):
        start = time.perf_counter()
        lease = lease_port() if kind == "port" else lease_devices(1)
        out.append(time.perf_counter() - start)
        lease.release()
    return out


def measure(target, rounds: int) -> tuple[list[float], bool]:
    """Latencies (s) of ``rounds`` x 32 concurrent leases; and whether every round's leases were distinct."""
    ctx = mp.get_context("fork")
    latencies, distinct = [], True
    for _ in range(rounds):
        barrier, queue = ctx.Barrier(N), ctx.Queue()
        procs = [ctx.Process(target=target, args=(barrier, queue)) for _ in range(N)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join()
        latencies += [lat for lat, _ in results]
        distinct &= len({what for _, what in results}) == N
    return latencies, distinct


def row(name: str, latencies: list[float], distinct: bool) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[int(0.95 * (len(ms) - 1))]
    return (f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p95:.1f} | {ms[-1]:.1f} | "
            f"{'yes' if distinct else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(ORCH_RUNTIME_DIR=tmp, CUDA_VISIBLE_DEVICES=",".join(map(str, range(N))))
        os.environ.pop("MASTER_PORT", None)
        print("| lease | requests | p50 ms | p95 ms | max ms | all distinct |")
        print("|---|---|---|---|---|---|")
        print(row("port, 32 concurrent", *measure(_port_worker, args.rounds)), flush=True)
        print(row("GPU slice (1 of 32), 32 concurrent", *measure(_gpu_worker, args.rounds)), flush=True)
        print(row("port, one at a time", sequential("port"), True), flush=True)
        print(row("GPU slice, one at a time", sequential("gpu"), True), flush=True)


if __name__ == "__main__":
    main()
