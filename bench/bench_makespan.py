"""Makespan of a queue of mixed-size jobs on a simulated 8-GPU pool, against the lower bound.

Real code end to end: one ``orch`` submission (``start_supervisor``: job records, the detached
supervisor, GPU-slice leases, queue order from ``queue_order``) whose jobs are ``sleep D``
processes; the pool is 8 GPUs simulated with ``CUDA_VISIBLE_DEVICES=0,...,7``. The lower bound is
total GPU-time / 8; the target is a makespan within 10 % of it.

    .venv/bin/python bench/bench_makespan.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

POOL = 8
SIZES = (1, 1, 2, 2, 4, 8)  # GPUs per job: many small, some wide


def make_jobs(seed: int, n: int, low: float, high: float) -> list[tuple[int, float]]:
    """``n`` jobs (gpus, seconds), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [(rng.choice(SIZES), round(rng.uniform(low, high), 2)) for _ in range(n)]


def ideal(jobs: list[tuple[int, float]], order: list[int]) -> float:
    """Makespan of the same queue policy with zero overhead (event simulation): at every event
    the oldest queued job that fits starts. Separates schedule quality from orch's overhead."""
    import heapq

    now, free, running, queue = 0.0, POOL, [], [jobs[i] for i in order]
    while queue or running:
        started = True
        while started:
            started = False
            for job in queue:
                if job[0] <= free:
                    free -= job[0]
                    heapq.heappush(running, (now + job[1], job[0]))
                    queue.remove(job)
                    started = True
                    break
        now, size = heapq.heappop(running)
        free += size
    return now


def run(jobs: list[tuple[int, float]]) -> dict:
    """Submit ``jobs`` as one local submission and wait; returns the timings."""
    from orchestrator.config.schema import Experiment, Resources
    from orchestrator.jobs import JobHandle
    from orchestrator.launchers.local import LocalLauncher, NodeCommand, NodeJob, NodePlan, NodeRequest, queue_order
    from orchestrator.records import load_record
    from orchestrator.spec import JobSpec

    specs, entries = [], []
    for i, (size, seconds) in enumerate(jobs):
        exp = Experiment(name=f"sleep{i}", resources=Resources(gpus=size))
        specs.append(JobSpec(name=exp.name, experiment=exp, config_path=Path("/dev/null"),
                             output_dir=Path(tempfile.gettempdir()), backend="local"))
    for index in queue_order([s for s, _ in jobs], [d for _, d in jobs]):
        size, seconds = jobs[index]
        entries.append(NodeJob(index=index, name=specs[index].name, slots=size,
                               commands=(NodeCommand(("sleep", str(seconds)), procs=size),)))
    plan = NodePlan("local", tuple(specs), NodeRequest(jobs=tuple(entries)), ())
    start = time.time()
    handles = [JobHandle(job_id) for job_id in LocalLauncher().submit(plan)]
    for handle in handles:
        handle.wait(poll_s=0.5)
    records = [load_record(h.job_id) for h in handles]
    assert all(r.state.value == "SUCCEEDED" for r in records), [r.error for r in records]
    bound = sum(size * seconds for size, seconds in jobs) / POOL
    end = max(r.ended_at for r in records)
    order = queue_order([s for s, _ in jobs], [d for _, d in jobs])
    return {"bound": bound, "makespan": end - start, "ideal": ideal(jobs, order),
            "first_start": min(r.started_at for r in records) - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--min-s", type=float, default=1.0)
    parser.add_argument("--max-s", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(ORCH_HOME=f"{tmp}/home", ORCH_RUNTIME_DIR=f"{tmp}/rt",
                          CUDA_VISIBLE_DEVICES=",".join(map(str, range(POOL))))
        print("| seed | jobs (1/2/4/8 GPUs) | lower bound s | same queue, zero overhead s | makespan s "
              "(submit to last end) | first job started after s | ratio to bound | within 10 % |")
        print("|---|---|---|---|---|---|---|---|")
        worst = 0.0
        for seed in args.seeds:
            jobs = make_jobs(seed, args.jobs, args.min_s, args.max_s)
            result = run(jobs)
            ratio = result["makespan"] / result["bound"]
            worst = max(worst, ratio)
            mix = "/".join(str(sum(1 for s, _ in jobs if s == k)) for k in (1, 2, 4, 8))
            print(f"| {seed} | {len(jobs)} ({mix}) | {result['bound']:.2f} | {result['ideal']:.2f} | "
                  f"{result['makespan']:.2f} | {result['first_start']:.2f} | {ratio:.3f} | "
                  f"{'yes' if ratio <= 1.10 else 'NO'} |", flush=True)
        print(f"\nworst ratio {worst:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
